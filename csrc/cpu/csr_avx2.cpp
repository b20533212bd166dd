// AVX2 + FMA kernels (compiled with -mavx2 -mfma, run only where the CPU reports both).
#include <immintrin.h>

#include "cpu/csr_view.h"
#include "cpu/driver.h"
#include "cpu/gemv_simd.h"
#include "cpu/panel.h"
#include "cpu/panel_simd.h"
#include "cpu/simd_ops.h"
#include "cpu/simd_tile.h"
#include "cpu/tiled_kernel.h"

namespace sparsenet::cpu::avx2 {

namespace {

template <typename Idx>
void run(const CsrView& a, const DenseArgs& d) {
  const Idx* col = static_cast<const Idx*>(a.col_idx);
  drive(
      a, d, 8, 32, d.batch >= plan::kPanelMinBatch,
      [&](int64_t r0, int64_t r1) { small_batch_rows(a, col, d, r0, r1); },
      [&](const float* xp, int64_t W, int64_t r0, int64_t r1, int64_t b0, int64_t valid) {
        panel_rows_any<Ops256, 4>(a, col, xp, W, r0, r1, b0, valid, d);
      },
      pack_panel_simd);
}

}  // namespace

void csr_matmul(const CsrView& a, const DenseArgs& d) {
  if (a.tiled != nullptr && d.batch >= plan::kPanelMinBatch) return run_tiled<Ops256, 4>(a, d);
  if (a.index_bytes == 2) run<uint16_t>(a, d);
  else run<int32_t>(a, d);
}

}  // namespace sparsenet::cpu::avx2
