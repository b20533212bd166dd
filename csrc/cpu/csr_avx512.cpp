// AVX-512 (F/BW/VL/DQ) kernels: the AVX2 design with 16-wide vectors, masked tails instead of scalar
// ones, and 32 vector registers. Compiled everywhere the compiler allows; run only where the CPU and
// OS report AVX-512.
#include <immintrin.h>
#include <omp.h>

#include "cpu/csr_view.h"
#include "cpu/panel.h"

namespace sparsenet::cpu::avx512 {

namespace {

inline __m512i load_idx16(const uint16_t* p) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512i load_idx16(const int32_t* p) { return _mm512_loadu_si512(p); }
inline __m512i load_idx16_masked(const uint16_t* p, __mmask16 m) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
}
inline __m512i load_idx16_masked(const int32_t* p, __mmask16 m) { return _mm512_maskz_loadu_epi32(m, p); }

template <typename Idx>
void gather_rows(const CsrView& a, const Idx* col, const DenseArgs& d, int64_t r0, int64_t r1) {
  const float* val = a.values;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t begin = a.row_ptr[r], end = a.row_ptr[r + 1];
    for (int64_t m = 0; m < d.batch; ++m) {
      const float* x = d.x + m * d.ldx;
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      int64_t k = begin;
      for (; k + 32 <= end; k += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(val + k),
                               _mm512_i32gather_ps(load_idx16(col + k), x, 4), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(val + k + 16),
                               _mm512_i32gather_ps(load_idx16(col + k + 16), x, 4), acc1);
      }
      for (; k + 16 <= end; k += 16)
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(val + k),
                               _mm512_i32gather_ps(load_idx16(col + k), x, 4), acc0);
      if (k < end) {
        const __mmask16 m16 = static_cast<__mmask16>((1u << (end - k)) - 1u);
        const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m16, load_idx16_masked(col + k, m16), x, 4);
        acc1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m16, val + k), xv, acc1);
      }
      d.y[m * d.ldy + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + (d.bias ? d.bias[r] : 0.f);
    }
  }
}

template <typename Idx, int NV>
inline void panel_row(const Idx* col, const float* val, int64_t begin, int64_t end, const float* xp,
                      float* out) {
  constexpr int64_t W = 16 * NV;
  __m512 a[NV], b[NV];
  for (int v = 0; v < NV; ++v) a[v] = b[v] = _mm512_setzero_ps();
  int64_t k = begin;
  for (; k + 2 <= end; k += 2) {
    const float* p0 = xp + static_cast<int64_t>(col[k]) * W;
    const float* p1 = xp + static_cast<int64_t>(col[k + 1]) * W;
    const __m512 w0 = _mm512_set1_ps(val[k]);
    const __m512 w1 = _mm512_set1_ps(val[k + 1]);
    for (int v = 0; v < NV; ++v) {
      a[v] = _mm512_fmadd_ps(w0, _mm512_load_ps(p0 + 16 * v), a[v]);
      b[v] = _mm512_fmadd_ps(w1, _mm512_load_ps(p1 + 16 * v), b[v]);
    }
  }
  if (k < end) {
    const float* p0 = xp + static_cast<int64_t>(col[k]) * W;
    const __m512 w0 = _mm512_set1_ps(val[k]);
    for (int v = 0; v < NV; ++v) a[v] = _mm512_fmadd_ps(w0, _mm512_load_ps(p0 + 16 * v), a[v]);
  }
  for (int v = 0; v < NV; ++v) _mm512_store_ps(out + 16 * v, _mm512_add_ps(a[v], b[v]));
}

template <typename Idx, int NV>
void panel_rows(const CsrView& a, const Idx* col, const float* xp, int64_t r0, int64_t r1, int64_t b0,
                int64_t valid, const DenseArgs& d) {
  constexpr int64_t W = 16 * NV;
  alignas(64) float tile[8 * W];
  for (int64_t rg = r0; rg < r1; rg += 8) {
    const int64_t nr = std::min<int64_t>(8, r1 - rg);
    for (int64_t i = 0; i < nr; ++i)
      panel_row<Idx, NV>(col, a.values, a.row_ptr[rg + i], a.row_ptr[rg + i + 1], xp, tile + i * W);
    store_tile(tile, W, nr, valid, rg, b0, d.y, d.ldy, d.bias);
  }
}

template <typename Idx>
void run(const CsrView& a, const DenseArgs& d) {
  const Idx* col = static_cast<const Idx*>(a.col_idx);
  const int nt = threads_for(a, d.batch, d.num_threads);
  if (d.batch < kPanelMinBatch) {
#pragma omp parallel num_threads(nt)
    {
      int64_t r0, r1;
      balanced_rows(a, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
      gather_rows(a, col, d, r0, r1);
    }
    return;
  }
  float* xp = scratch_panel(a.cols * kPanelWidth);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    int64_t r0, r1;
    balanced_rows(a, t, T, &r0, &r1);
    const int64_t k0 = a.cols * t / T, k1 = a.cols * (t + 1) / T;
    for (int64_t b0 = 0; b0 < d.batch; b0 += kPanelWidth) {
      const int64_t valid = std::min(kPanelWidth, d.batch - b0);
      const int64_t W = valid <= 16 ? 16 : 32;
      pack_panel(d.x, d.ldx, b0, valid, W, k0, k1, xp);
#pragma omp barrier
      if (W == 16) panel_rows<Idx, 1>(a, col, xp, r0, r1, b0, valid, d);
      else panel_rows<Idx, 2>(a, col, xp, r0, r1, b0, valid, d);
#pragma omp barrier
    }
  }
}

}  // namespace

void csr_matmul(const CsrView& a, const DenseArgs& d) {
  if (a.index_bytes == 2) run<uint16_t>(a, d);
  else run<int32_t>(a, d);
}

}  // namespace sparsenet::cpu::avx512
