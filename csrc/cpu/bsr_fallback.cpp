// Portable BSR kernel: each stored block multiplied entry by entry, one sample at a time. The
// reference the SIMD kernels are tested against besides float64, and the kernel of CPUs without AVX2.
#include <algorithm>

#include "cpu/bsr_drive.h"

namespace sparsenet::cpu::fallback {

void bsr_matmul(const BsrView& a, const DenseArgs& d) {
  bsr_drive(a, d, [&](int64_t R0, int64_t R1) {
    for (int64_t m = 0; m < d.batch; ++m) {
      const float* x = d.x + m * d.ldx;
      float* y = d.y + m * d.ldy;
      for (int64_t R = R0; R < R1; ++R) {
        const int64_t i0 = R * a.r, nr = std::min(a.r, a.rows - i0);
        for (int64_t i = 0; i < nr; ++i) y[i0 + i] = d.bias ? d.bias[i0 + i] : 0.0f;
        for (int64_t b = a.block_ptr[R]; b < a.block_ptr[R + 1]; ++b) {
          const int64_t j0 = int64_t{a.block_cols[b]} * a.c, nc = std::min(a.c, a.cols - j0);
          const float* v = a.values + b * a.r * a.c;
          for (int64_t i = 0; i < nr; ++i) {
            float acc = 0.0f;
            for (int64_t j = 0; j < nc; ++j) acc += v[i * a.c + j] * x[j0 + j];
            y[i0 + i] += acc;
          }
        }
      }
    }
  });
}

}  // namespace sparsenet::cpu::fallback
