// Portable N:M kernel: slot by slot, each column read from the packed indices. The reference the
// SIMD kernels are tested against besides float64, and the kernel of CPUs without AVX2.
#include "cpu/nm_drive.h"

namespace sparsenet::cpu::fallback {

void nm_matmul(const NmView& a, const DenseArgs& d) {
  nm_drive(a, d, [&](const float* x, int64_t r) { return nm_row_tail(a, x, r, 0); });
}

}  // namespace sparsenet::cpu::fallback
