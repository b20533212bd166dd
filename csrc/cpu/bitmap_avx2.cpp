// AVX2 bitmap kernel: each 16-column chunk as two 8-column halves. AVX2 has no expand, so a half's
// stored weights are loaded (masked to their count) and moved to their columns by a permutation
// from a 256-entry table whose sign bits also zero the lanes without a weight; up to 4 samples
// share each decoded half (from 5 the handle runs CSR's kernels over a derived structure:
// plan::kBitmapCsrMinBatchAvx2). Rows run in pairs, 64 columns a step (row_pair_in: at batch 1
// 0.55-0.59x the time of one row at a time, half by half, on 4096 x 4096 at 50-70% from DRAM). The
// tables are constant-initialised (no code runs at load: this file is compiled with AVX2 flags, and
// must be harmless on a CPU without them until it is chosen).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu/bitmap_drive.h"
#include "cpu/panel.h"  // kPrefetchAhead
#include "cpu/planner.h"
#include "cpu/simd_ops.h"

namespace sparsenet::cpu::avx2 {

namespace {

struct Tables {
  // Lane j of half `bits`: the number of its packed weight (bits set below j) in the low 3 bits,
  // the sign bit set where bit j is set. One table serves the permutation (vpermps reads the low 3
  // bits) and the zeroing of lanes without a weight (a blend on the sign bit); as bytes,
  // sign-extended on load, it takes 2 KB of L1 where two tables of int32 (a permutation and a
  // mask) took 16 KB beside a 16 KB row of x and the streaming values. ab_native.py, 4096 x 4096
  // from DRAM, AMD EPYC Zen 3 (AVX2 only): 0.88x the time at 50% batch 1, 0.83x batch 4; 0.92x and
  // 0.87x at 70%.
  int8_t place[256][8];
  int32_t prefix[9][8];  // the first n lanes: a masked load of n packed weights
};

constexpr Tables make_tables() {
  Tables t{};
  for (int m = 0; m < 256; ++m) {
    int n = 0;
    for (int j = 0; j < 8; ++j) {
      const bool set = (m >> j) & 1;
      t.place[m][j] = static_cast<int8_t>(set ? n - 128 : 0);  // n - 128: sign bit and n
      n += set;
    }
  }
  for (int n = 0; n <= 8; ++n)
    for (int j = 0; j < 8; ++j) t.prefix[n][j] = j < n ? -1 : 0;
  return t;
}

alignas(32) constexpr Tables kTables = make_tables();

inline __m256i lanes(const int32_t (&row)[8]) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(row)); }

// The 8 weights of half `bits`, read from v, at their columns (zero where no bit is set); advances
// v. kInBounds: the 8 floats from v are inside the values, so a plain load serves (a masked load,
// vmaskmovps, is slow on AMD cores).
template <bool kInBounds>
inline __m256 place(unsigned bits, const float* v) {
  const __m256 packed =
      kInBounds ? _mm256_loadu_ps(v) : _mm256_maskload_ps(v, lanes(kTables.prefix[__builtin_popcount(bits)]));
  // (GCC folds the 8-byte load into vpmovsxbd's memory form.)
  const __m256i index = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kTables.place[bits])));
  const __m256 placed = Ops256::permute(packed, index);
  return _mm256_blendv_ps(_mm256_setzero_ps(), placed, _mm256_castsi256_ps(index));
}

template <bool kInBounds>
inline __m256 decode(unsigned bits, const float*& v) {
  const __m256 w = place<kInBounds>(bits, v);
  v += __builtin_popcount(bits);
  return w;
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// Batches 1-4: rows r and r + 1 together, for all NB samples, 64 columns (one 64-bit read of each
// row's masks) a step. The halves' value offsets are popcounts of that word, so they do not wait on
// each other (advanced half by half, each waited on the previous popcount); each load of x serves
// both rows; values and the next pair's masks are prefetched into L2, as in the AVX-512 kernel. At
// batch 1 each row's sums alternate between two accumulators (the FMA latency is not one chain);
// from 2 samples on, the samples are the chains. (Batches 2-5 had run one row at a time, row_in: in
// pairs 0.58-0.72x that time at 50%, 0.77-0.88x at 70%, 0.87-0.98x at 90%, 4096 x 4096 from DRAM;
// batch 6 in pairs 1.00-1.28x slower: its 12 accumulators and the decode no longer fit 16 registers;
// batch 5's 10 spilled too, and it runs on CSR's kernels: planner.h.)
template <int NB, bool kInBounds, int kLookAheadLines>
inline void row_pair_in(const BitmapView& a, const DenseArgs& d, int64_t r) {
  constexpr int kAlt = NB == 1 ? 2 : 1;
  const float* x[NB];
#pragma GCC unroll 4
  for (int i = 0; i < NB; ++i) x[i] = d.x + i * d.ldx;
  const uint16_t* mask0 = a.masks + r * a.chunks;
  const uint16_t* mask1 = mask0 + a.chunks;
  const float* v0 = a.values + a.row_ptr[r];
  const float* v1 = a.values + a.row_ptr[r + 1];
  __m256 acc0[NB][kAlt], acc1[NB][kAlt];  // row r's sums, row r + 1's
#pragma GCC unroll 4
  for (int i = 0; i < NB; ++i)
#pragma GCC unroll 2
    for (int j = 0; j < kAlt; ++j) acc0[i][j] = acc1[i][j] = _mm256_setzero_ps();
  const int64_t steps = a.cols / 64;
  PairLookAhead<kLookAheadLines> ahead(a, r);
  int64_t consumed = 0;
  for (int64_t t = 0; t < steps; ++t) {
    const int64_t k = 4 * t;  // the step's first 16-column chunk
    ahead.step(k, consumed);
    uint64_t word0, word1;
    std::memcpy(&word0, mask0 + k, sizeof word0);
    std::memcpy(&word1, mask1 + k, sizeof word1);
#pragma GCC unroll 8
    for (int h = 0; h < 8; ++h) {
      const uint64_t below = h ? (uint64_t{1} << (8 * h)) - 1 : 0;
      const __m256 w0 = place<kInBounds>((word0 >> (8 * h)) & 0xffu, v0 + __builtin_popcountll(word0 & below));
      const __m256 w1 = place<kInBounds>((word1 >> (8 * h)) & 0xffu, v1 + __builtin_popcountll(word1 & below));
#pragma GCC unroll 4
      for (int i = 0; i < NB; ++i) {
        const __m256 xv = _mm256_loadu_ps(x[i] + k * 16 + h * 8);
        acc0[i][h % kAlt] = _mm256_fmadd_ps(w0, xv, acc0[i][h % kAlt]);
        acc1[i][h % kAlt] = _mm256_fmadd_ps(w1, xv, acc1[i][h % kAlt]);
      }
    }
    const int n0 = __builtin_popcountll(word0), n1 = __builtin_popcountll(word1);
    v0 += n0;
    v1 += n1;
    consumed = n0 + n1;
  }
  // The rest, half by half; the last half's x masked to the columns that exist.
  const int64_t full = a.cols / 8;
  for (int64_t h = 8 * steps; h < a.cols / 8 + (a.cols % 8 != 0); ++h) {
    const __m256 w0 = decode<kInBounds>((mask0[h / 2] >> (8 * (h % 2))) & 0xffu, v0);
    const __m256 w1 = decode<kInBounds>((mask1[h / 2] >> (8 * (h % 2))) & 0xffu, v1);
#pragma GCC unroll 4
    for (int i = 0; i < NB; ++i) {
      const __m256 xv = h < full ? _mm256_loadu_ps(x[i] + h * 8)
                                 : _mm256_maskload_ps(x[i] + h * 8, lanes(kTables.prefix[a.cols - full * 8]));
      acc0[i][0] = _mm256_fmadd_ps(w0, xv, acc0[i][0]);
      acc1[i][0] = _mm256_fmadd_ps(w1, xv, acc1[i][0]);
    }
  }
  store_pair_sums<Ops256>(d, r, acc0, acc1);
}

// Row r for the NB samples. Halves without a stored weight are not skipped: at the
// densities this format is for, the branch would mispredict more often than it saves work.
template <int NB, bool kInBounds>
inline void row_in(const BitmapView& a, const DenseArgs& d, int64_t r) {
  const float* x[NB];
#pragma GCC unroll 8
  for (int i = 0; i < NB; ++i) x[i] = d.x + i * d.ldx;
  const uint16_t* mask = a.masks + r * a.chunks;
  const float* v = a.values + a.row_ptr[r];
  const int64_t full = a.cols / 8;  // 8-column halves whose columns all exist
  __m256 acc[NB];
#pragma GCC unroll 8
  for (int i = 0; i < NB; ++i) acc[i] = _mm256_setzero_ps();
  // 64 columns a step, each half's offset a popcount of the step's mask word (as row_pair_in).
  const int64_t steps = a.cols / 64;
  for (int64_t t = 0; t < steps; ++t) {
    _mm_prefetch(reinterpret_cast<const char*>(v + kPrefetchAhead), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(v + kPrefetchAhead + 16), _MM_HINT_T1);
    uint64_t word;
    std::memcpy(&word, mask + 4 * t, sizeof word);
#pragma GCC unroll 8
    for (int h = 0; h < 8; ++h) {
      const uint64_t below = h ? (uint64_t{1} << (8 * h)) - 1 : 0;
      const __m256 w = place<kInBounds>((word >> (8 * h)) & 0xffu, v + __builtin_popcountll(word & below));
#pragma GCC unroll 8
      for (int i = 0; i < NB; ++i) acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x[i] + t * 64 + h * 8), acc[i]);
    }
    v += __builtin_popcountll(word);
  }
  for (int64_t h = 8 * steps; h < full; ++h) {
    const __m256 w = decode<kInBounds>((mask[h / 2] >> (8 * (h % 2))) & 0xffu, v);
#pragma GCC unroll 8
    for (int i = 0; i < NB; ++i) acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x[i] + h * 8), acc[i]);
  }
  const int64_t rest = a.cols - full * 8;  // columns of a last, partial half
  if (rest) {
    const __m256 w = decode<kInBounds>((mask[full / 2] >> (8 * (full % 2))) & 0xffu, v);
#pragma GCC unroll 8
    for (int i = 0; i < NB; ++i)
      acc[i] = _mm256_fmadd_ps(w, _mm256_maskload_ps(x[i] + full * 8, lanes(kTables.prefix[rest])), acc[i]);
  }
  const float b = d.bias ? d.bias[r] : 0.0f;
#pragma GCC unroll 8
  for (int i = 0; i < NB; ++i) d.y[i * d.ldy + r] = hsum(acc[i]) + b;
}

template <int NB>
inline void row(const BitmapView& a, const DenseArgs& d, int64_t r) {
  // A half's plain 8-float load reads at most 7 floats past the row's last value.
  if (a.nnz - a.row_ptr[r + 1] >= 8) row_in<NB, true>(a, d, r);
  else row_in<NB, false>(a, d, r);
}

}  // namespace

// Rows in pairs for up to 4 inputs at a time (their plain loads read at most 7 floats past the second
// row's values). From plan::kBitmapCsrMinBatchAvx2 inputs the handle runs CSR's kernels over a
// derived structure instead, so larger batches, served here in slices of 4, are not a case to tune.
void bitmap_matmul(const BitmapView& a, const DenseArgs& d) {
  constexpr int kSlice = plan::kBitmapCsrMinBatchAvx2 - 1;
  for (int64_t m0 = 0; m0 < d.batch; m0 += kSlice) {
    DenseArgs slice = d;
    slice.batch = std::min<int64_t>(kSlice, d.batch - m0);
    slice.x = d.x + m0 * d.ldx;
    slice.y = d.y + m0 * d.ldy;
    bitmap_pairs<kSlice>(
        a, slice, 8, [&](auto nb, auto in, auto lines, int64_t r) { row_pair_in<nb(), in(), lines()>(a, slice, r); },
        [&](auto nb, int64_t r) { row<nb()>(a, slice, r); });
  }
}

}  // namespace sparsenet::cpu::avx2
