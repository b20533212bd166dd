// Small-batch rows for the SIMD kernels (include only from a file compiled with AVX2 + FMA or more).
//
// Each output is a dot product of a row's non-zeros with x gathered through the column indices.
// Hardware gathers (vgatherdps) measured 1.7x slower here (AMD Zen 4) than building the 8-wide x
// vector from scalar loads, so that is what this does. Each ISA file gets its own copy, compiled
// with its own flags into its own namespace (capability.h).
#pragma once
#include <immintrin.h>

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
// loads its x value), so 16-bit indices are read four at a time through a 64-bit load and shifted
// out on the integer units, which have slots to spare: 8-12% faster than a zero-extending load per
// index at 50%, 90% and 95% sparsity, weights from DRAM (4096x4096, batch 1, interleaved A/B).
template <typename Idx>
inline __m256 gather8(const float* x, const Idx* c) {
  if constexpr (sizeof(Idx) == 2) {
    uint64_t lo, hi;
    __builtin_memcpy(&lo, c, 8);  // unaligned loads, no aliasing assumptions
    __builtin_memcpy(&hi, c + 4, 8);
    return _mm256_setr_ps(x[lo & 0xFFFF], x[(lo >> 16) & 0xFFFF], x[(lo >> 32) & 0xFFFF], x[lo >> 48],
                          x[hi & 0xFFFF], x[(hi >> 16) & 0xFFFF], x[(hi >> 32) & 0xFFFF], x[hi >> 48]);
  }
  return _mm256_setr_ps(x[c[0]], x[c[1]], x[c[2]], x[c[3]], x[c[4]], x[c[5]], x[c[6]], x[c[7]]);
}

// One row's non-zeros [begin, end) dotted with x (nnz: the array length, for the masked tail).
template <typename Idx>
inline float row_dot(const float* val, const Idx* col, const float* x, int64_t begin, int64_t end,
                     int64_t nnz) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t k = begin;
  for (; k + 16 <= end; k += 16) {
    // Weights stream from DRAM: ask for them well ahead, one prefetch per new 64 B line of each
    // stream (16 non-zeros span one line of values but half a line of 16-bit indices). Without
    // the index prefetch the kernel was 20% slower at 50-80% sparsity; prefetching the indices
    // every step instead cost 5-8% at 85-90%, where the loop is short of load slots, not bytes.
    _mm_prefetch(reinterpret_cast<const char*>(val + k + kPrefetchAhead), _MM_HINT_T0);
    if (sizeof(Idx) == 4 || ((k - begin) & 16) == 0)
      _mm_prefetch(reinterpret_cast<const char*>(col + k + kPrefetchAhead), _MM_HINT_T0);
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k), gather8(x, col + k), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k + 8), gather8(x, col + k + 8), acc1);
  }
  if (k + 8 <= end) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k), gather8(x, col + k), acc0);
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
    const __m256 xs = _mm256_and_ps(gather8(x, col + k), _mm256_castsi256_ps(live));
    acc1 = _mm256_fmadd_ps(_mm256_maskload_ps(val + k, live), xs, acc1);
    k = end;
  }
  float s = hsum256(_mm256_add_ps(acc0, acc1));
  for (; k < end; ++k) s += val[k] * x[col[k]];  // only at the very end of the arrays
  return s;
}

// Kept out of line on purpose: inlined into the OpenMP-outlined driver, the row loop ran short of
// registers and spilled index temporaries to the stack every iteration (1.2x slower at 90%
// sparsity, batch 1, one thread: 0.547 vs 0.448 ms).
template <typename Idx>
__attribute__((noinline)) void small_batch_rows(const sparsenet::CsrView& a, const Idx* col,
                                                const sparsenet::DenseArgs& d, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t begin = a.row_ptr[r], end = a.row_ptr[r + 1];
    const float b = d.bias ? d.bias[r] : 0.f;
    for (int64_t m = 0; m < d.batch; ++m)
      d.y[m * d.ldy + r] = row_dot(a.values, col, d.x + m * d.ldx, begin, end, a.nnz) + b;
  }
}

}  // namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY
