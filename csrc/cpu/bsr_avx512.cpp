// AVX-512 BSR kernels: bsr_simd.h with 16-wide vectors, panels of 16 samples.
#include "cpu/simd_ops.h"
#include "cpu/bsr_simd.h"

namespace sparsenet::cpu::avx512 {

void bsr_matmul(const BsrView& a, const DenseArgs& d) {
  if (d.batch >= plan::kBsrPanelMinBatch) bsr_panel_matmul<Ops512, 1>(a, d);
  else bsr_small_batch<Ops512>(a, d);
}

}  // namespace sparsenet::cpu::avx512
