#include "cuda/csr_cuda.h"

#include <stdexcept>
#include <string>

#include "cuda/convert.cuh"

namespace sparsenet::cuda {

namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kInputsPerPass = 8;  // accumulators per lane

template <typename T, typename Idx>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
csr_rows_kernel(const int64_t* __restrict__ row_ptr, const Idx* __restrict__ col, const T* __restrict__ values,
                const T* __restrict__ x, int64_t batch, int64_t ldx, const T* __restrict__ bias, T* __restrict__ y,
                int64_t ldy, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;  // whole warps leave together: row is uniform across a warp
  const int64_t begin = row_ptr[row], end = row_ptr[row + 1];
  const float b = bias ? to_float(bias[row]) : 0.0f;
  for (int64_t m0 = 0; m0 < batch; m0 += kInputsPerPass) {
    const int n = static_cast<int>(batch - m0 < kInputsPerPass ? batch - m0 : kInputsPerPass);
    float acc[kInputsPerPass];
#pragma unroll
    for (int j = 0; j < kInputsPerPass; ++j) acc[j] = 0.0f;
    const T* xs = x + m0 * ldx;
    for (int64_t k = begin + lane; k < end; k += kWarp) {
      const float v = to_float(values[k]);
      const int64_t c = static_cast<int64_t>(col[k]);
#pragma unroll
      for (int j = 0; j < kInputsPerPass; ++j)
        if (j < n) acc[j] += v * to_float(xs[j * ldx + c]);
    }
#pragma unroll
    for (int j = 0; j < kInputsPerPass; ++j) {
      const float s = warp_sum(acc[j]);
      if (lane == 0 && j < n) y[(m0 + j) * ldy + row] = from_float<T>(s + b);
    }
  }
}

template <typename T>
void launch(const CsrDevice& a, const void* values, const DenseDevice& d, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.rows + kWarpsPerBlock - 1) / kWarpsPerBlock)), block(kWarp * kWarpsPerBlock);
  const auto* v = static_cast<const T*>(values);
  const auto* x = static_cast<const T*>(d.x);
  const auto* bias = static_cast<const T*>(d.bias);
  auto* y = static_cast<T*>(d.y);
  if (a.index_bytes == 2)
    csr_rows_kernel<T, uint16_t><<<grid, block, 0, stream>>>(a.row_ptr, static_cast<const uint16_t*>(a.col_idx), v, x,
                                                             d.batch, d.ldx, bias, y, d.ldy, a.rows);
  else
    csr_rows_kernel<T, int32_t><<<grid, block, 0, stream>>>(a.row_ptr, static_cast<const int32_t*>(a.col_idx), v, x,
                                                            d.batch, d.ldx, bias, y, d.ldy, a.rows);
}

}  // namespace

void csr_matmul(const CsrDevice& a, DType dtype, const void* values, const DenseDevice& d, cudaStream_t stream) {
  if (a.rows == 0 || d.batch == 0) return;
  if ((a.rows + kWarpsPerBlock - 1) / kWarpsPerBlock > 0x7fffffff)
    throw std::invalid_argument("too many rows for one launch: " + std::to_string(a.rows));
  with_value_type(dtype, [&](auto t) { launch<decltype(t)>(a, values, d, stream); });
  check_launch("csr_matmul");
}

}  // namespace sparsenet::cuda
