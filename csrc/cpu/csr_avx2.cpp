// AVX2 + FMA kernels (compiled with -mavx2 -mfma, run only where the CPU reports both).
#include <immintrin.h>

#include "cpu/csr_view.h"
#include "cpu/driver.h"
#include "cpu/gemv_simd.h"
#include "cpu/panel.h"
#include "cpu/simd_tile.h"
#include "cpu/tiled_kernel.h"

namespace sparsenet::cpu::avx2 {

namespace {

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
    if ((k & 14) == 0) {  // once per 16 (k steps by 2 from either parity): the weights stream from
      // DRAM, so ask well ahead, as the small-batch rows do.
      _mm_prefetch(reinterpret_cast<const char*>(val + k + kPrefetchAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(col + k + kPrefetchAhead), _MM_HINT_T0);
    }
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
    store_tile_simd(tile, W, nr, valid, rg, b0, d.y, d.ldy, d.bias);
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
  drive(
      a, d, 8, 32, d.batch >= sparsenet::cpu::kPanelMinBatch,
      [&](int64_t r0, int64_t r1) { small_batch_rows(a, col, d, r0, r1); },
      [&](const float* xp, int64_t W, int64_t r0, int64_t r1, int64_t b0, int64_t valid) {
        panel_dispatch(a, col, xp, W, r0, r1, b0, valid, d);
      },
      pack_panel_simd);
}

struct Ops256 {
  using V = __m256;
  static constexpr int kWidth = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_load_ps(p); }
  static V set1(float f) { return _mm256_set1_ps(f); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static void store(float* p, V v) { _mm256_store_ps(p, v); }
};

}  // namespace

void csr_matmul(const CsrView& a, const DenseArgs& d) {
  if (a.tiled != nullptr && d.batch >= sparsenet::cpu::kPanelMinBatch) return run_tiled<Ops256, 4>(a, d);
  if (a.index_bytes == 2) run<uint16_t>(a, d);
  else run<int32_t>(a, d);
}

}  // namespace sparsenet::cpu::avx2
