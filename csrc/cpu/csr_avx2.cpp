// AVX2 + FMA kernels (compiled with -mavx2 -mfma, run only where the CPU reports both).
#include <immintrin.h>
#include <omp.h>

#include "cpu/csr_view.h"
#include "cpu/panel.h"

namespace sparsenet::cpu::avx2 {

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256i load_idx8(const uint16_t* p) {
  return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256i load_idx8(const int32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// Small batch: one dot product per (row, batch entry), gathering x through the column indices.
// Four accumulators keep four gathers in flight.
template <typename Idx>
void gather_rows(const CsrView& a, const Idx* col, const DenseArgs& d, int64_t r0, int64_t r1) {
  const float* val = a.values;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t begin = a.row_ptr[r], end = a.row_ptr[r + 1];
    for (int64_t m = 0; m < d.batch; ++m) {
      const float* x = d.x + m * d.ldx;
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
      int64_t k = begin;
      for (; k + 32 <= end; k += 32) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k),
                               _mm256_i32gather_ps(x, load_idx8(col + k), 4), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k + 8),
                               _mm256_i32gather_ps(x, load_idx8(col + k + 8), 4), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k + 16),
                               _mm256_i32gather_ps(x, load_idx8(col + k + 16), 4), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k + 24),
                               _mm256_i32gather_ps(x, load_idx8(col + k + 24), 4), acc3);
      }
      for (; k + 8 <= end; k += 8)
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k),
                               _mm256_i32gather_ps(x, load_idx8(col + k), 4), acc0);
      float s = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
      for (; k < end; ++k) s += val[k] * x[col[k]];
      d.y[m * d.ldy + r] = s + (d.bias ? d.bias[r] : 0.f);
    }
  }
}

// One output row against a panel of width 8 * NV: two interleaved chains of NV accumulators
// (even / odd non-zeros) so 2 * NV FMAs are independent.
template <typename Idx, int NV>
inline void panel_row(const Idx* col, const float* val, int64_t begin, int64_t end, const float* xp,
                      float* out) {
  constexpr int64_t W = 8 * NV;
  __m256 a[NV], b[NV];
  for (int v = 0; v < NV; ++v) a[v] = b[v] = _mm256_setzero_ps();
  int64_t k = begin;
  for (; k + 2 <= end; k += 2) {
    const float* p0 = xp + static_cast<int64_t>(col[k]) * W;
    const float* p1 = xp + static_cast<int64_t>(col[k + 1]) * W;
    const __m256 w0 = _mm256_broadcast_ss(val + k);
    const __m256 w1 = _mm256_broadcast_ss(val + k + 1);
    for (int v = 0; v < NV; ++v) {
      a[v] = _mm256_fmadd_ps(w0, _mm256_load_ps(p0 + 8 * v), a[v]);
      b[v] = _mm256_fmadd_ps(w1, _mm256_load_ps(p1 + 8 * v), b[v]);
    }
  }
  if (k < end) {
    const float* p0 = xp + static_cast<int64_t>(col[k]) * W;
    const __m256 w0 = _mm256_broadcast_ss(val + k);
    for (int v = 0; v < NV; ++v) a[v] = _mm256_fmadd_ps(w0, _mm256_load_ps(p0 + 8 * v), a[v]);
  }
  for (int v = 0; v < NV; ++v) _mm256_store_ps(out + 8 * v, _mm256_add_ps(a[v], b[v]));
}

template <typename Idx, int NV>
void panel_rows(const CsrView& a, const Idx* col, const float* xp, int64_t r0, int64_t r1, int64_t b0,
                int64_t valid, const DenseArgs& d) {
  constexpr int64_t W = 8 * NV;
  alignas(64) float tile[8 * W];
  for (int64_t rg = r0; rg < r1; rg += 8) {
    const int64_t nr = std::min<int64_t>(8, r1 - rg);
    for (int64_t i = 0; i < nr; ++i)
      panel_row<Idx, NV>(col, a.values, a.row_ptr[rg + i], a.row_ptr[rg + i + 1], xp, tile + i * W);
    store_tile(tile, W, nr, valid, rg, b0, d.y, d.ldy, d.bias);
  }
}

template <typename Idx>
void panel_dispatch(const CsrView& a, const Idx* col, const float* xp, int64_t W, int64_t r0, int64_t r1,
                    int64_t b0, int64_t valid, const DenseArgs& d) {
  switch (W) {
    case 8: panel_rows<Idx, 1>(a, col, xp, r0, r1, b0, valid, d); break;
    case 16: panel_rows<Idx, 2>(a, col, xp, r0, r1, b0, valid, d); break;
    case 24: panel_rows<Idx, 3>(a, col, xp, r0, r1, b0, valid, d); break;
    default: panel_rows<Idx, 4>(a, col, xp, r0, r1, b0, valid, d); break;
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
      const int64_t W = (valid + 7) / 8 * 8;
      pack_panel(d.x, d.ldx, b0, valid, W, k0, k1, xp);
#pragma omp barrier
      panel_dispatch(a, col, xp, W, r0, r1, b0, valid, d);
#pragma omp barrier
    }
  }
}

}  // namespace

void csr_matmul(const CsrView& a, const DenseArgs& d) {
  if (a.index_bytes == 2) run<uint16_t>(a, d);
  else run<int32_t>(a, d);
}

}  // namespace sparsenet::cpu::avx2
