// AVX-512 (F/BW/VL/DQ) kernels: the batch panel with 16-wide vectors, from batch 16 up. Smaller
// batches run the AVX2 kernels (see csr_matmul below); in particular the small-batch path is the
// AVX2 one: the same source compiled with AVX-512 flags measured 1.4x slower on Zen 4, and 16-wide
// vectors give it nothing (its limit is the scalar loads of x). Compiled where the compiler allows
// (CMake builds it only together with AVX2, which it calls); run only where the CPU and OS report
// AVX-512.
#include <immintrin.h>

#include "cpu/csr_view.h"
#include "cpu/driver.h"
#include "cpu/panel.h"
#include "cpu/simd_tile.h"
#include "cpu/tiled.h"

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

// One chunk of kRows rows of the tiled copy, tile by tile: the panel tile (kCols x W floats) is
// read by every row of the chunk while it is in L1; the chunk's sums stay in `acc` (L1 too).
template <int NV>
void tiled_chunk(const TiledCsr& t, int64_t c, const float* xp, int64_t b0, int64_t valid,
                 const DenseArgs& d) {
  constexpr int64_t W = 16 * NV, R = TiledCsr::kRows;
  alignas(64) float acc[R * W];
  const int64_t r0 = c * R, nr = std::min(R, t.rows - r0);
  std::fill(acc, acc + nr * W, 0.0f);
  for (int64_t tile = 0; tile < t.tiles; ++tile) {
    const int64_t block = c * t.tiles + tile;
    const uint16_t* starts = &t.row_start[block * (R + 1)];
    if (starts[R] == 0) continue;
    const uint8_t* col = t.col.data() + t.block_start[block];
    const float* val = t.values.data() + t.block_start[block];
    const float* xt = xp + tile * TiledCsr::kCols * W;
    for (int64_t i = 0; i < nr; ++i) {
      const int s = starts[i], e = starts[i + 1];
      if (s == e) continue;
      float* out = acc + i * W;
      __m512 p[NV], q[NV];  // two chains per vector
      for (int v = 0; v < NV; ++v) p[v] = _mm512_load_ps(out + 16 * v), q[v] = _mm512_setzero_ps();
      int k = s;
      for (; k + 2 <= e; k += 2) {
        const float* x0 = xt + static_cast<int64_t>(col[k]) * W;
        const float* x1 = xt + static_cast<int64_t>(col[k + 1]) * W;
        const __m512 w0 = _mm512_set1_ps(val[k]), w1 = _mm512_set1_ps(val[k + 1]);
        for (int v = 0; v < NV; ++v) {
          p[v] = _mm512_fmadd_ps(w0, _mm512_load_ps(x0 + 16 * v), p[v]);
          q[v] = _mm512_fmadd_ps(w1, _mm512_load_ps(x1 + 16 * v), q[v]);
        }
      }
      if (k < e) {
        const float* x0 = xt + static_cast<int64_t>(col[k]) * W;
        const __m512 w0 = _mm512_set1_ps(val[k]);
        for (int v = 0; v < NV; ++v) p[v] = _mm512_fmadd_ps(w0, _mm512_load_ps(x0 + 16 * v), p[v]);
      }
      for (int v = 0; v < NV; ++v) _mm512_store_ps(out + 16 * v, _mm512_add_ps(p[v], q[v]));
    }
  }
  for (int64_t g = 0; g < nr; g += 8)
    store_tile_simd(acc + g * W, W, std::min<int64_t>(8, nr - g), valid, r0 + g, b0, d.y, d.ldy, d.bias);
}

// The panel driver of driver.h, with chunks of the tiled copy instead of balanced row ranges (a
// chunk is a fixed 64 rows; with several chunks per thread, dynamic scheduling evens them out).
void run_tiled(const CsrView& a, const DenseArgs& d) {
  const TiledCsr& t = *a.tiled;
  const int nt = threads_for(a, d.batch, d.num_threads);
  constexpr int64_t max_width = SPARSENET_AVX512_PANEL;
  float* xp = scratch_panel(t.tiles * TiledCsr::kCols * max_width);  // columns past `cols` never read
  const int64_t kblocks = std::max<int64_t>(1, std::min<int64_t>(int64_t{nt} * 8, a.cols / 64));
#pragma omp parallel num_threads(nt)
  {
    for (int64_t b0 = 0; b0 < d.batch; b0 += max_width) {
      const int64_t valid = std::min(max_width, d.batch - b0);
      const int64_t W = (valid + 15) / 16 * 16;
#pragma omp for schedule(dynamic, 1)
      for (int64_t kb = 0; kb < kblocks; ++kb)
        pack_panel_simd(d.x, d.ldx, b0, valid, W, a.cols * kb / kblocks, a.cols * (kb + 1) / kblocks, xp);
#pragma omp for schedule(dynamic, 1)
      for (int64_t c = 0; c < t.chunks; ++c) {
        if (W == 16) tiled_chunk<1>(t, c, xp, b0, valid, d);
        else tiled_chunk<2>(t, c, xp, b0, valid, d);
      }
    }
  }
}

static_assert(SPARSENET_AVX512_PANEL == 32, "tiled_chunk handles panels of 16 and 32 floats");

}  // namespace

void csr_matmul(const CsrView& a, const DenseArgs& d) {
  // Below 16 inputs a 16-wide panel would be mostly padding: the AVX2 kernels' 8-wide panels
  // measured 1.3x faster there (4096x4096, 50%, batch 4 and 8).
  if (d.batch < 16) return avx2::csr_matmul(a, d);
  if (a.tiled != nullptr) return run_tiled(a, d);
  if (a.index_bytes == 2) run<uint16_t>(a, d);
  else run<int32_t>(a, d);
}

}  // namespace sparsenet::cpu::avx512
