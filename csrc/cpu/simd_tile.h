// AVX2 8x8 transposes for the two layout changes around the panel kernels: x rows -> panel
// (pack) and the row-major accumulator tile -> batch-major y (store). Include only from files
// compiled with AVX2 or more; each ISA file keeps its own copy in its own namespace
// (capability.h).
#pragma once
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "cpu/csr_view.h"
#include "cpu/nonfinite.h"
#include "cpu/panel.h"
#include "cpu/simd_ops.h"

namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY {

inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Same contract as pack_panel (the Inf/NaN check included); W is a multiple of 8.
inline bool pack_panel_simd(const float* x, int64_t ldx, int64_t b0, int64_t valid, int64_t W, int64_t k0,
                            int64_t k1, float* xp) {
  __m256 seen = _mm256_setzero_ps();  // NaN lanes where a value loaded was Inf or NaN
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) {
    for (int64_t jb = 0; jb < W; jb += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        r[i] = jb + i < valid ? _mm256_loadu_ps(x + (b0 + jb + i) * ldx + k) : _mm256_setzero_ps();
        seen = Ops256::mark_nonfinite(seen, r[i]);
      }
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_store_ps(xp + (k + i) * W + jb, r[i]);
    }
  }
  bool nonfinite = Ops256::any_nan(seen);
  if (k < k1) nonfinite |= pack_panel(x, ldx, b0, valid, W, k, k1, xp);
  return nonfinite;
}

// Same contract as sparsenet::cpu::store_tile; full blocks of 8 rows go through the transpose.
inline void store_tile_simd(const float* t, int64_t W, int64_t nrows, int64_t valid, int64_t r0, int64_t b0,
                            float* y, int64_t ldy, const float* bias) {
  if (nrows != 8) {
    store_tile(t, W, nrows, valid, r0, b0, y, ldy, bias);
    return;
  }
  const __m256 b = bias ? _mm256_loadu_ps(bias + r0) : _mm256_setzero_ps();
  for (int64_t jb = 0; jb < valid; jb += 8) {
    __m256 r[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_load_ps(t + i * W + jb);
    transpose8(r);
    const int64_t n = std::min<int64_t>(8, valid - jb);
    for (int64_t j = 0; j < n; ++j) _mm256_storeu_ps(y + (b0 + jb + j) * ldy + r0, _mm256_add_ps(r[j], b));
  }
}

// The batch in panels of W samples (a multiple of 8), each packed by the team of nt threads
// together into the calling thread's scratch panel, then work(xp, part, b0, valid) for parts
// [0, parts) shared out dynamically; barriers keep a panel whole while it is read. Records the
// packing's Inf/NaN check in d.x_check.
template <typename WorkFn>
void team_panels(const DenseArgs& d, int64_t cols, int64_t W, int nt, int parts, WorkFn work) {
  const int64_t kblocks = std::max<int64_t>(1, std::min<int64_t>(int64_t{nt} * 8, cols / 64));
  float* xp = scratch_panel(cols * W);
  bool nonfinite = false;
#pragma omp parallel num_threads(nt) reduction(|| : nonfinite)
  for (int64_t b0 = 0; b0 < d.batch; b0 += W) {
    const int64_t valid = std::min(W, d.batch - b0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t kb = 0; kb < kblocks; ++kb)
      nonfinite |= pack_panel_simd(d.x, d.ldx, b0, valid, W, cols * kb / kblocks, cols * (kb + 1) / kblocks, xp);
    // (implicit barrier: the panel is complete)
#pragma omp for schedule(dynamic, 1)
    for (int p = 0; p < parts; ++p) work(xp, p, b0, valid);
    // (implicit barrier: nobody overwrites the panel while it is read)
  }
  record_x_check(d, nonfinite);
}

}  // namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY
