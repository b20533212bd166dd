// AVX-512 (F/BW/VL/DQ) kernels: the batch panel with 16-wide vectors, from batch 16 up. Smaller
// batches run the AVX2 kernels (see csr_matmul below); in particular the small-batch path is the
// AVX2 one: the same source compiled with AVX-512 flags measured 1.4x slower on Zen 4, and 16-wide
// vectors give it nothing (its limit is the scalar loads of x). Compiled where the compiler allows
// (CMake builds it only together with AVX2, which it calls); run only where the CPU and OS report
// AVX-512.
#include <immintrin.h>

#include "cpu/csr_view.h"
#include "cpu/driver.h"
#include "cpu/gemv_simd.h"  // kPrefetchAhead
#include "cpu/panel.h"
#include "cpu/simd_tile.h"
#include "cpu/tiled_kernel.h"

#ifndef SPARSENET_AVX512_PANEL
#define SPARSENET_AVX512_PANEL 32  // 64 measured no faster (the panel then fills L2)
#endif

namespace sparsenet::cpu::avx512 {

namespace {

template <typename Idx, int NV>
inline void panel_row(const Idx* col, const float* val, int64_t begin, int64_t end, const float* xp,
                      float* out) {
  constexpr int64_t W = 16 * NV;
  __m512 a[NV], b[NV];
  for (int v = 0; v < NV; ++v) a[v] = b[v] = _mm512_setzero_ps();
  int64_t k = begin;
  for (; k + 2 <= end; k += 2) {
    if ((k & 14) == 0) {  // once per 16: the weights stream from DRAM, so ask well ahead
      _mm_prefetch(reinterpret_cast<const char*>(val + k + kPrefetchAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(col + k + kPrefetchAhead), _MM_HINT_T0);
    }
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
    store_tile_simd(tile, W, nr, valid, rg, b0, d.y, d.ldy, d.bias);
  }
}

template <typename Idx>
void run(const CsrView& a, const DenseArgs& d) {
  const Idx* col = static_cast<const Idx*>(a.col_idx);
  drive(
      a, d, 16, SPARSENET_AVX512_PANEL, /*use_panel=*/true,
      [](int64_t, int64_t) {},  // no small-batch path: batches below 16 went to the AVX2 kernels
      [&](const float* xp, int64_t W, int64_t r0, int64_t r1, int64_t b0, int64_t valid) {
        switch (W) {
          case 16: panel_rows<Idx, 1>(a, col, xp, r0, r1, b0, valid, d); break;
          case 32: panel_rows<Idx, 2>(a, col, xp, r0, r1, b0, valid, d); break;
          case 48: panel_rows<Idx, 3>(a, col, xp, r0, r1, b0, valid, d); break;
          default: panel_rows<Idx, 4>(a, col, xp, r0, r1, b0, valid, d); break;
        }
      },
      pack_panel_simd);
}

struct Ops512 {
  using V = __m512;
  static constexpr int kWidth = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_load_ps(p); }
  static V set1(float f) { return _mm512_set1_ps(f); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static void store(float* p, V v) { _mm512_store_ps(p, v); }
};

}  // namespace

void csr_matmul(const CsrView& a, const DenseArgs& d) {
  // Below 16 inputs a 16-wide panel would be mostly padding: the AVX2 kernels' 8-wide panels
  // measured 1.3x faster there (4096x4096, 50%, batch 4 and 8).
  if (d.batch < 16) return avx2::csr_matmul(a, d);
  if (a.tiled != nullptr) return run_tiled<Ops512, SPARSENET_AVX512_PANEL / 16>(a, d);
  if (a.index_bytes == 2) run<uint16_t>(a, d);
  else run<int32_t>(a, d);
}

}  // namespace sparsenet::cpu::avx512
