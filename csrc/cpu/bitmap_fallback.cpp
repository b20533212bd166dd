// Portable bitmap kernel: walks the set bits of each chunk (count-trailing-zeros), one sample at a
// time. The reference the SIMD kernels are tested against besides float64, and the kernel of CPUs
// without AVX2.
#include "cpu/bitmap_drive.h"

namespace sparsenet::cpu::fallback {

void bitmap_matmul(const BitmapView& a, const DenseArgs& d) {
  bitmap_drive(a, d, [&](int64_t r0, int64_t r1) {
    for (int64_t m = 0; m < d.batch; ++m) {
      const float* x = d.x + m * d.ldx;
      float* y = d.y + m * d.ldy;
      for (int64_t r = r0; r < r1; ++r) {
        const uint16_t* mask = a.masks + r * a.chunks;
        const float* v = a.values + a.row_ptr[r];
        float acc = 0.0f;
        for (int64_t k = 0; k < a.chunks; ++k) {
          for (unsigned bits = mask[k]; bits; bits &= bits - 1) acc += *v++ * x[k * kBitmapChunk + __builtin_ctz(bits)];
        }
        y[r] = d.bias ? acc + d.bias[r] : acc;
      }
    }
  });
}

}  // namespace sparsenet::cpu::fallback
