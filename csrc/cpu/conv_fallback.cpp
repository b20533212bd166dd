// Portable sparse convolution: every output a sum over its weight row's stored entries, each
// column decoded into (input channel, kernel row, kernel column). The reference the SIMD kernels
// are tested against besides float64, and the kernel of CPUs without AVX2.
#include <omp.h>

#include "cpu/capability.h"
#include "cpu/conv.h"

namespace sparsenet::cpu::fallback {

namespace {

template <typename Idx>
void run(const CsrView& a, const ConvShape& s, const ConvArgs& c) {
  const Idx* col = static_cast<const Idx*>(a.col_idx);
  const int64_t kk = s.kernel_h * s.kernel_w, cg = s.in_channels / s.groups, kg = s.out_channels / s.groups;
  const int64_t planes = s.batch * s.out_channels;
#pragma omp parallel for num_threads(c.num_threads) schedule(dynamic, 1) if (c.num_threads > 1)
  for (int64_t plane = 0; plane < planes; ++plane) {
    const int64_t n = plane / s.out_channels, r = plane % s.out_channels, g = r / kg;
    const float* x = c.x + (n * s.in_channels + g * cg) * s.in_h * s.in_w;
    float* y = c.y + plane * s.out_h * s.out_w;
    for (int64_t oy = 0; oy < s.out_h; ++oy)
      for (int64_t ox = 0; ox < s.out_w; ++ox) {
        float acc = c.bias ? c.bias[r] : 0.0f;
        for (int64_t k = a.row_ptr[r]; k < a.row_ptr[r + 1]; ++k) {
          const int64_t column = static_cast<int64_t>(col[k]);
          const int64_t ci = column / kk, ky = column % kk / s.kernel_w, kx = column % s.kernel_w;
          const int64_t iy = oy * s.stride_h - s.pad_h + ky * s.dil_h, ix = ox * s.stride_w - s.pad_w + kx * s.dil_w;
          if (iy >= 0 && iy < s.in_h && ix >= 0 && ix < s.in_w) acc += a.values[k] * x[(ci * s.in_h + iy) * s.in_w + ix];
        }
        y[oy * s.out_w + ox] = acc;
      }
  }
}

}  // namespace

bool csr_conv2d(const CsrView& a, const ConvShape& s, const ConvArgs& c, const DirectConv&) {
  if (a.index_bytes == 2) run<uint16_t>(a, s, c);
  else run<int32_t>(a, s, c);
  return false;  // (inputs not checked: the caller scans them)
}

}  // namespace sparsenet::cpu::fallback
