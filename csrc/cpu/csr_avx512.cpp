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
#include "cpu/panel_simd.h"
#include "cpu/simd_ops.h"
#include "cpu/simd_tile.h"
#include "cpu/tiled_kernel.h"

#ifndef SPARSENET_AVX512_PANEL
#define SPARSENET_AVX512_PANEL 32  // row-by-row panels: 64 measured no faster (the panel then fills L2)
#endif

namespace sparsenet::cpu::avx512 {

namespace {

template <typename Idx>
void run(const CsrView& a, const DenseArgs& d) {
  const Idx* col = static_cast<const Idx*>(a.col_idx);
  drive(
      a, d, 16, SPARSENET_AVX512_PANEL, /*use_panel=*/true,
      [](int64_t, int64_t) {},  // no small-batch path: batches below 16 went to the AVX2 kernels
      [&](const float* xp, int64_t W, int64_t r0, int64_t r1, int64_t b0, int64_t valid) {
        panel_rows_any<Ops512, SPARSENET_AVX512_PANEL / 16>(a, col, xp, W, r0, r1, b0, valid, d);
      },
      pack_panel_simd);
}

}  // namespace

void csr_matmul(const CsrView& a, const DenseArgs& d) {
  if (d.batch < plan::kAvx512MinBatch) return avx2::csr_matmul(a, d);
  if (a.tiled != nullptr) {
    if (density(a) <= plan::kWidePanelMaxDensity) return run_tiled<Ops512, 4>(a, d);
    return run_tiled<Ops512, SPARSENET_AVX512_PANEL / 16>(a, d);
  }
  if (a.index_bytes == 2) run<uint16_t>(a, d);
  else run<int32_t>(a, d);
}

}  // namespace sparsenet::cpu::avx512
