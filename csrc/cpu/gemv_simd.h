// Small-batch rows for the SIMD kernels (include only from a file compiled with AVX2 + FMA or more).
//
// Each output is a dot product of a row's non-zeros with x gathered through the column indices.
// Hardware gathers (vgatherdps) measured 1.7x slower here (AMD Zen 4) than building the 8-wide x
// vector from scalar loads, so that is what this does. Each ISA file gets its own copy, compiled
// with its own flags into its own namespace (capability.h).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <type_traits>

#include "cpu/csr_view.h"
#include "cpu/panel.h"  // kPrefetchAhead

namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY {

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// x[c[0..7]] as one vector, from scalar loads. The loop is short of load slots (each non-zero also
// loads its x value), so 16-bit indices are read four at a time (WordIndices): 8-12% faster than a
// zero-extending load per index at 50%, 90% and 95% sparsity, weights from DRAM (4096x4096, batch
// 1, interleaved A/B, AMD Zen 4).
template <typename Idx>
inline __m256 gather8(const float* x, const Idx* c) {
  using Indices = std::conditional_t<sizeof(Idx) == 2, WordIndices<Idx, 8>, LoadedIndices<Idx>>;
  const Indices i(c);
  return _mm256_setr_ps(x[i[0]], x[i[1]], x[i[2]], x[i[3]], x[i[4]], x[i[5]], x[i[6]], x[i[7]]);
}

// One row's non-zeros [begin, end) dotted with the NB samples x[0..NB) into out (nnz: the array
// length, for the masked tail). Each non-zero's value and column are read once for all the samples:
// from batch 2 on, a sample at a time had repeated the index and value loads per sample.
template <int NB, typename Idx>
inline void row_dots(const float* val, const Idx* col, const float* const* x, int64_t begin, int64_t end,
                     int64_t nnz, float* out) {
  __m256 acc0[NB], acc1[NB];
#pragma GCC unroll 4
  for (int i = 0; i < NB; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  int64_t k = begin;
  for (; k + 16 <= end; k += 16) {
    // Weights stream from DRAM: ask for them well ahead, one prefetch per new 64 B line of each
    // stream (16 non-zeros span one line of values but half a line of 16-bit indices). Without
    // the index prefetch the kernel was 20% slower at 50-80% sparsity; prefetching the indices
    // every step instead cost 5-8% at 85-90%, where the loop is short of load slots, not bytes.
    _mm_prefetch(reinterpret_cast<const char*>(val + k + kPrefetchAhead), _MM_HINT_T0);
    if (sizeof(Idx) == 4 || ((k - begin) & 16) == 0)
      _mm_prefetch(reinterpret_cast<const char*>(col + k + kPrefetchAhead), _MM_HINT_T0);
    const __m256 v0 = _mm256_loadu_ps(val + k), v1 = _mm256_loadu_ps(val + k + 8);
#pragma GCC unroll 4
    for (int i = 0; i < NB; ++i) {
      acc0[i] = _mm256_fmadd_ps(v0, gather8(x[i], col + k), acc0[i]);
      acc1[i] = _mm256_fmadd_ps(v1, gather8(x[i], col + k + 8), acc1[i]);
    }
  }
  if (k + 8 <= end) {
    const __m256 v0 = _mm256_loadu_ps(val + k);
#pragma GCC unroll 4
    for (int i = 0; i < NB; ++i) acc0[i] = _mm256_fmadd_ps(v0, gather8(x[i], col + k), acc0[i]);
    k += 8;
  }
  if (k < end && k + 8 <= nnz) {
    // Tail of 1-7: one masked step instead of a scalar loop (a large share of the time at 90%
    // sparsity, ~400 non-zeros a row). The 8 indices read may run into the next row; they are
    // valid columns all the same. Both the values and the x gathered through them are masked to
    // zero: 0 x (the next row's x) would be NaN where that x is Inf or NaN, a column this row
    // does not hold.
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(end - k)), lanes);
    const __m256 v = _mm256_maskload_ps(val + k, live);
#pragma GCC unroll 4
    for (int i = 0; i < NB; ++i)
      acc1[i] = _mm256_fmadd_ps(v, _mm256_and_ps(gather8(x[i], col + k), _mm256_castsi256_ps(live)), acc1[i]);
    k = end;
  }
#pragma GCC unroll 4
  for (int i = 0; i < NB; ++i) {
    float s = hsum256(_mm256_add_ps(acc0[i], acc1[i]));
    for (int64_t j = k; j < end; ++j) s += val[j] * x[i][col[j]];  // only at the very end of the arrays
    out[i] = s;
  }
}

// Rows [r0, r1) for samples [m0, m0 + NB). Kept out of line on purpose, one copy per sample count:
// inlined into the OpenMP-outlined driver, the row loop ran short of registers and spilled index
// temporaries to the stack every iteration (1.2x slower at 90% sparsity, batch 1, one thread: 0.547
// vs 0.448 ms).
template <int NB, typename Idx>
__attribute__((noinline)) void rows_for_samples(const sparsenet::CsrView& a, const Idx* col,
                                                const sparsenet::DenseArgs& d, int64_t r0, int64_t r1, int64_t m0) {
  const float* x[NB];
#pragma GCC unroll 4
  for (int i = 0; i < NB; ++i) x[i] = d.x + (m0 + i) * d.ldx;
  for (int64_t r = r0; r < r1; ++r) {
    float out[NB];
    row_dots<NB>(a.values, col, x, a.row_ptr[r], a.row_ptr[r + 1], a.nnz, out);
    const float b = d.bias ? d.bias[r] : 0.f;
#pragma GCC unroll 4
    for (int i = 0; i < NB; ++i) d.y[(m0 + i) * d.ldy + r] = out[i] + b;
  }
}

// The small batches (below the panels' kPanelMinBatch): up to three samples share each pass over a
// row's weights; a larger batch, should one come here, in passes of three.
template <typename Idx>
void small_batch_rows(const sparsenet::CsrView& a, const Idx* col, const sparsenet::DenseArgs& d, int64_t r0,
                      int64_t r1) {
  for (int64_t m0 = 0; m0 < d.batch; m0 += 3) {
    const int64_t n = std::min<int64_t>(3, d.batch - m0);
    if (n == 3) rows_for_samples<3>(a, col, d, r0, r1, m0);
    else if (n == 2) rows_for_samples<2>(a, col, d, r0, r1, m0);
    else rows_for_samples<1>(a, col, d, r0, r1, m0);
  }
}

}  // namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY
