// AVX-512 bitmap kernel: a 16-column chunk decodes with one masked load of its stored weights and
// one expand (vexpandps) to their columns; up to 8 samples share each decoded chunk, and from 9 on
// the panels (bitmap_panel.h) take over. (GCC folds the load into the expand's memory form; keeping
// them apart with an asm barrier measured the same on Zen 4, 0.99-1.01x the time at batch 1 and 8,
// so the fold stays.)
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu/bitmap_drive.h"
#include "cpu/bitmap_panel.h"
#include "cpu/panel.h"
#include "cpu/planner.h"
#include "cpu/simd_ops.h"
#include "cpu/simd_tile.h"

// GCC 12's AVX-512 headers initialise their "undefined" vectors as `__m512 __Y = __Y;`, which
// -Wmaybe-uninitialized reports wherever a masked or reducing intrinsic is inlined: a false alarm.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace sparsenet::cpu::avx512 {

namespace {

// The weights of a 16-column chunk with mask `bits`, whose packed values start at v, at their
// columns. kInBounds: the 16 floats from v are all inside the values (then a plain load, which
// saves the count-to-mask arithmetic of a masked one: most rows are followed by 16 more values).
template <bool kInBounds>
inline __m512 decode(unsigned bits, const float* v) {
  const __m512 packed = kInBounds
      ? _mm512_loadu_ps(v)
      : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << __builtin_popcount(bits)) - 1u), v);
  return _mm512_maskz_expand_ps(static_cast<__mmask16>(bits), packed);
}

// Row r for the NB samples. Four chunks per step from one 64-bit read of their masks: their
// value offsets are popcounts of that one word, so the steps do not wait on each other (a pointer
// advanced chunk by chunk made every chunk wait for the previous popcount), and one sample's sums
// alternate between two accumulators (the FMA latency is not a chain either).
template <int NB, bool kInBounds>
inline void row_in(const BitmapView& a, const DenseArgs& d, int64_t r) {
  constexpr int kAcc = NB <= 4 ? 2 : 1;
  const float* x[NB];
#pragma GCC unroll 8
  for (int i = 0; i < NB; ++i) x[i] = d.x + i * d.ldx;
  const uint16_t* mask = a.masks + r * a.chunks;
  const float* v = a.values + a.row_ptr[r];
  const int64_t full = a.cols / kBitmapChunk;  // chunks whose 16 columns all exist
  __m512 acc[NB][kAcc];
#pragma GCC unroll 8
  for (int i = 0; i < NB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < kAcc; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 4 <= full; k += 4) {
    // The values, into L2, as in row_pair_in: batch 2-3 0.79-0.85x the time (T0: 1.01-1.10x T1's).
    _mm_prefetch(reinterpret_cast<const char*>(v + kPrefetchAhead), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(v + kPrefetchAhead + 16), _MM_HINT_T1);
    uint64_t word;
    std::memcpy(&word, mask + k, sizeof word);
    if (!word) continue;
    const int offsets[4] = {0, __builtin_popcountll(word & 0xffffull), __builtin_popcountll(word & 0xffffffffull),
                            __builtin_popcountll(word & 0xffffffffffffull)};
    // Unrolled, so that the accumulators have constant indices and live in registers.
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const unsigned bits = static_cast<unsigned>(word >> (16 * c)) & 0xffffu;
      const __m512 w = decode<kInBounds>(bits, v + offsets[c]);
#pragma GCC unroll 8
      for (int i = 0; i < NB; ++i)
        acc[i][c % kAcc] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x[i] + (k + c) * kBitmapChunk), acc[i][c % kAcc]);
    }
    v += __builtin_popcountll(word);
  }
  for (; k < full; ++k) {
    const unsigned bits = mask[k];
    if (!bits) continue;
    const __m512 w = decode<kInBounds>(bits, v);
    v += __builtin_popcount(bits);
#pragma GCC unroll 8
    for (int i = 0; i < NB; ++i) acc[i][0] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x[i] + k * kBitmapChunk), acc[i][0]);
  }
  if (full < a.chunks && mask[full]) {  // the last chunk, past which x has no columns
    const __mmask16 cols = static_cast<__mmask16>((1u << (a.cols - full * kBitmapChunk)) - 1u);
    const __m512 w = decode<kInBounds>(mask[full], v);
#pragma GCC unroll 8
    for (int i = 0; i < NB; ++i)
      acc[i][0] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(cols, x[i] + full * kBitmapChunk), acc[i][0]);
  }
  const float b = d.bias ? d.bias[r] : 0.0f;
#pragma GCC unroll 8
  for (int i = 0; i < NB; ++i) {
    __m512 sum = acc[i][0];
#pragma GCC unroll 8
    for (int j = 1; j < kAcc; ++j) sum = _mm512_add_ps(sum, acc[i][j]);
    d.y[i * d.ldy + r] = _mm512_reduce_add_ps(sum) + b;
  }
}

// Batches 1-8: rows r and r + 1 together, for all NB samples. The two rows' chunks are independent
// work for the core to overlap (each row alone waits on its own loads and popcounts), and each load
// of x serves both. (Batches 2-7 had run one row at a time, row_in: in pairs they take 0.58-0.60x
// that time at 50%, 0.63-0.76x at 70%, 0.69-0.84x at 90%; 4096 x 4096 from DRAM.) At batch 1 each
// row's sums alternate between two accumulators, so the FMA latency is not one chain; from 2
// samples on, the samples are the chains. row_in serves a part's odd last row.
template <int NB, bool kInBounds, int kLookAheadLines>
inline void row_pair_in(const BitmapView& a, const DenseArgs& d, int64_t r) {
  constexpr int kAlt = NB == 1 ? 2 : 1;
  const float* x[NB];
#pragma GCC unroll 8
  for (int i = 0; i < NB; ++i) x[i] = d.x + i * d.ldx;
  const uint16_t* mask0 = a.masks + r * a.chunks;
  const uint16_t* mask1 = mask0 + a.chunks;
  const float* v0 = a.values + a.row_ptr[r];
  const float* v1 = a.values + a.row_ptr[r + 1];
  const int64_t full = a.cols / kBitmapChunk;
  __m512 acc0[NB][kAlt], acc1[NB][kAlt];  // row r's sums, row r + 1's
#pragma GCC unroll 8
  for (int i = 0; i < NB; ++i)
#pragma GCC unroll 2
    for (int j = 0; j < kAlt; ++j) acc0[i][j] = acc1[i][j] = _mm512_setzero_ps();
  // The values stream from DRAM: asked for a pair ahead (the hardware prefetcher, following four
  // streams of two rows, did not keep up).
  PairLookAhead<kLookAheadLines> ahead(a, r);
  int64_t k = 0, consumed = 0;
  for (; k + 4 <= full; k += 4) {
    ahead.step(k, consumed);
    uint64_t word0, word1;
    std::memcpy(&word0, mask0 + k, sizeof word0);
    std::memcpy(&word1, mask1 + k, sizeof word1);
    const int off0[4] = {0, __builtin_popcountll(word0 & 0xffffull), __builtin_popcountll(word0 & 0xffffffffull),
                         __builtin_popcountll(word0 & 0xffffffffffffull)};
    const int off1[4] = {0, __builtin_popcountll(word1 & 0xffffull), __builtin_popcountll(word1 & 0xffffffffull),
                         __builtin_popcountll(word1 & 0xffffffffffffull)};
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m512 w0 = decode<kInBounds>(static_cast<unsigned>(word0 >> (16 * c)) & 0xffffu, v0 + off0[c]);
      const __m512 w1 = decode<kInBounds>(static_cast<unsigned>(word1 >> (16 * c)) & 0xffffu, v1 + off1[c]);
#pragma GCC unroll 8
      for (int i = 0; i < NB; ++i) {
        const __m512 xv = _mm512_loadu_ps(x[i] + (k + c) * kBitmapChunk);
        acc0[i][c % kAlt] = _mm512_fmadd_ps(w0, xv, acc0[i][c % kAlt]);
        acc1[i][c % kAlt] = _mm512_fmadd_ps(w1, xv, acc1[i][c % kAlt]);
      }
    }
    const int n0 = __builtin_popcountll(word0), n1 = __builtin_popcountll(word1);
    v0 += n0;
    v1 += n1;
    consumed = n0 + n1;
  }
  for (; k < a.chunks; ++k) {  // the rest, the last chunk's x masked to the columns that exist
    const int64_t valid = std::min<int64_t>(kBitmapChunk, a.cols - k * kBitmapChunk);
    const __m512 w0 = decode<kInBounds>(mask0[k], v0), w1 = decode<kInBounds>(mask1[k], v1);
#pragma GCC unroll 8
    for (int i = 0; i < NB; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << valid) - 1u), x[i] + k * kBitmapChunk);
      acc0[i][0] = _mm512_fmadd_ps(w0, xv, acc0[i][0]);
      acc1[i][0] = _mm512_fmadd_ps(w1, xv, acc1[i][0]);
    }
    v0 += __builtin_popcount(mask0[k]);
    v1 += __builtin_popcount(mask1[k]);
  }
  store_pair_sums<Ops512>(d, r, acc0, acc1);
}

template <int NB>
inline void row(const BitmapView& a, const DenseArgs& d, int64_t r) {
  // A chunk's plain 16-float load reads at most 15 floats past the row's last value.
  if (a.nnz - a.row_ptr[r + 1] >= kBitmapChunk) row_in<NB, true>(a, d, r);
  else row_in<NB, false>(a, d, r);
}

}  // namespace

void bitmap_matmul(const BitmapView& a, const DenseArgs& d) {
  if (d.batch >= plan::bitmap_panel_min_batch(density(a))) {
    if (d.batch <= 16) bitmap_panel_matmul<Ops512, 1>(a, d);
    else bitmap_panel_matmul<Ops512, 2>(a, d);
    return;
  }
  // Batches 1-8: rows in pairs. (The pair's plain loads read at most 15 floats past the second
  // row's values.)
  static_assert(plan::kBitmapPanelMinBatch <= 9, "batches 1-8 only here");
  bitmap_pairs<8>(
      a, d, kBitmapChunk,
      [&](auto nb, auto in, auto lines, int64_t r) { row_pair_in<nb(), in(), lines()>(a, d, r); },
      [&](auto nb, int64_t r) { row<nb()>(a, d, r); });
}

}  // namespace sparsenet::cpu::avx512
