// AVX2 + FMA BSR kernels: bsr_simd.h with 8-wide vectors.
#include "cpu/simd_ops.h"
#include "cpu/bsr_simd.h"

namespace sparsenet::cpu::avx2 {

void bsr_matmul(const BsrView& a, const DenseArgs& d) {
  if (a.values_t && a.slice == 16) bsr_direct_matmul<Ops256, 2>(a, d);
  else if (d.batch >= plan::kBsrWidePanelMinBatchAvx2) bsr_panel_matmul<Ops256, 2>(a, d);
  else if (d.batch >= plan::kBsrPanelMinBatch) bsr_panel_matmul<Ops256, 1>(a, d);
  else bsr_small_batch<Ops256>(a, d);
}

}  // namespace sparsenet::cpu::avx2
