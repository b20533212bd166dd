// AVX2 bitmap kernel: each 16-column chunk as two 8-column halves. AVX2 has no expand, so a half's
// stored weights are loaded (masked to their count) and moved to their columns by a permutation
// from a 256-entry table, lanes without a weight zeroed by a second table; up to 8 samples share
// each decoded half. The tables are constant-initialised (no code runs at load: this file is
// compiled with AVX2 flags, and must be harmless on a CPU without them until it is chosen).
#include <immintrin.h>

#include "cpu/bitmap_drive.h"

namespace sparsenet::cpu::avx2 {

namespace {

struct Tables {
  int32_t perm[256][8];    // lane j takes packed weight number (bits set below j)
  int32_t keep[256][8];    // all ones where bit j is set
  int32_t prefix[9][8];    // the first n lanes: a masked load of n packed weights
};

constexpr Tables make_tables() {
  Tables t{};
  for (int m = 0; m < 256; ++m) {
    int n = 0;
    for (int j = 0; j < 8; ++j) {
      const bool set = (m >> j) & 1;
      t.perm[m][j] = set ? n : 0;
      t.keep[m][j] = set ? -1 : 0;
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
inline __m256 decode(unsigned bits, const float*& v) {
  const int count = __builtin_popcount(bits);
  const __m256 packed = kInBounds ? _mm256_loadu_ps(v) : _mm256_maskload_ps(v, lanes(kTables.prefix[count]));
  v += count;
  const __m256 placed = _mm256_permutevar8x32_ps(packed, lanes(kTables.perm[bits]));
  return _mm256_and_ps(placed, _mm256_castsi256_ps(lanes(kTables.keep[bits])));
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// Row r for samples [m0, m0 + NB). Halves without a stored weight are not skipped: at the
// densities this format is for, the branch would mispredict more often than it saves work.
template <int NB, bool kInBounds>
inline void row_in(const BitmapView& a, const DenseArgs& d, int64_t r, int64_t m0) {
  const float* x[NB];
#pragma GCC unroll 8
  for (int i = 0; i < NB; ++i) x[i] = d.x + (m0 + i) * d.ldx;
  const uint16_t* mask = a.masks + r * a.chunks;
  const float* v = a.values + a.row_ptr[r];
  const int64_t full = a.cols / 8;  // 8-column halves whose columns all exist
  __m256 acc[NB];
#pragma GCC unroll 8
  for (int i = 0; i < NB; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t h = 0; h < full; ++h) {
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
  for (int i = 0; i < NB; ++i) d.y[(m0 + i) * d.ldy + r] = hsum(acc[i]) + b;
}

template <int NB>
inline void row(const BitmapView& a, const DenseArgs& d, int64_t r, int64_t m0) {
  // A half's plain 8-float load reads at most 7 floats past the row's last value.
  if (a.nnz - a.row_ptr[r + 1] >= 8) row_in<NB, true>(a, d, r, m0);
  else row_in<NB, false>(a, d, r, m0);
}

}  // namespace

void bitmap_matmul(const BitmapView& a, const DenseArgs& d) {
  bitmap_drive(a, d, [&](int64_t r0, int64_t r1) {
    rows_in_sample_blocks(r0, r1, d.batch, [&](auto nb, int64_t r, int64_t m0) { row<decltype(nb)::value>(a, d, r, m0); });
  });
}

}  // namespace sparsenet::cpu::avx2
