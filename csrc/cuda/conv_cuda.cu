#include "cuda/conv_cuda.h"

#include "cuda/warp_rows.cuh"

namespace sparsenet::cuda {

namespace {

constexpr int kThreads = 256;

struct Geometry {
  int64_t batch, in_channels, in_h, in_w, out_channels, out_h, out_w;
  int kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t cg, kg;  // input and output channels per group
};

template <typename T, typename Idx>
__global__ void __launch_bounds__(kThreads)
csr_conv2d_kernel(const int64_t* __restrict__ row_ptr, const Idx* __restrict__ col, const T* __restrict__ values,
                  const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y, Geometry g) {
  const int64_t total = g.batch * g.out_channels * g.out_h * g.out_w;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t ox = i % g.out_w, oy = i / g.out_w % g.out_h, oc = i / (g.out_w * g.out_h) % g.out_channels;
    const int64_t n = i / (g.out_w * g.out_h * g.out_channels);
    const T* image = x + (n * g.in_channels + oc / g.kg * g.cg) * g.in_h * g.in_w;  // the group's first channel
    const int taps = g.kh * g.kw;
    float acc = bias ? to_float(bias[oc]) : 0.0f;
    for (int64_t k = row_ptr[oc]; k < row_ptr[oc + 1]; ++k) {
      const int64_t c = static_cast<int64_t>(col[k]);
      const int64_t ci = c / taps, ky = c % taps / g.kw, kx = c % g.kw;
      const int64_t iy = oy * g.sh - g.ph + ky * g.dh, ix = ox * g.sw - g.pw + kx * g.dw;
      if (iy >= 0 && iy < g.in_h && ix >= 0 && ix < g.in_w)
        acc += to_float(values[k]) * to_float(image[(ci * g.in_h + iy) * g.in_w + ix]);
    }
    y[i] = from_float<T>(acc);
  }
}

}  // namespace

void csr_conv2d(const CsrDevice& a, const ConvShape& s, DType dtype, const void* values, const void* x, void* y,
                const void* bias, cudaStream_t stream) {
  const int64_t total = s.batch * s.out_channels * s.out_h * s.out_w;
  if (total == 0) return;
  const Geometry g{s.batch, s.in_channels, s.in_h, s.in_w, s.out_channels, s.out_h, s.out_w,
                   static_cast<int>(s.kernel_h), static_cast<int>(s.kernel_w), static_cast<int>(s.stride_h),
                   static_cast<int>(s.stride_w), static_cast<int>(s.pad_h), static_cast<int>(s.pad_w),
                   static_cast<int>(s.dil_h), static_cast<int>(s.dil_w), s.in_channels / s.groups,
                   s.out_channels / s.groups};
  // A grid-stride loop: enough blocks to fill any GPU, never more than the launch limit.
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const dim3 grid(static_cast<unsigned>(blocks < 65536 ? blocks : 65536)), block(kThreads);
  with_value_type(dtype, [&](auto t) {
    using T = decltype(t);
    if (a.index_bytes == 2)
      csr_conv2d_kernel<T, uint16_t><<<grid, block, 0, stream>>>(
          a.row_ptr, static_cast<const uint16_t*>(a.col_idx), static_cast<const T*>(values), static_cast<const T*>(x),
          static_cast<const T*>(bias), static_cast<T*>(y), g);
    else
      csr_conv2d_kernel<T, int32_t><<<grid, block, 0, stream>>>(
          a.row_ptr, static_cast<const int32_t*>(a.col_idx), static_cast<const T*>(values), static_cast<const T*>(x),
          static_cast<const T*>(bias), static_cast<T*>(y), g);
  });
  check_launch("csr_conv2d");
}

}  // namespace sparsenet::cuda
