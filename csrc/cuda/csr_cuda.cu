#include "cuda/csr_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

namespace sparsenet::cuda {

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kInputsPerPass = 8;  // accumulators per lane

__device__ inline float to_float(float v) { return v; }
__device__ inline float to_float(__half v) { return __half2float(v); }
__device__ inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ inline T from_float(float v);
template <> __device__ inline float from_float<float>(float v) { return v; }
template <> __device__ inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

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
      float s = acc[j];
#pragma unroll
      for (int offset = kWarp / 2; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
      if (lane == 0 && j < n) y[(m0 + j) * ldy + row] = from_float<T>(s + b);
    }
  }
}

template <typename T>
void launch(const CsrDevice& a, const void* values, const DenseDevice& d, cudaStream_t stream) {
  const int64_t blocks = (a.rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const dim3 grid(static_cast<unsigned>(blocks)), block(kWarp * kWarpsPerBlock);
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
  switch (dtype) {
    case DType::kFloat32: launch<float>(a, values, d, stream); break;
    case DType::kFloat16: launch<__half>(a, values, d, stream); break;
    case DType::kBFloat16: launch<__nv_bfloat16>(a, values, d, stream); break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("csr_matmul launch failed: ") + cudaGetErrorString(err));
}

}  // namespace sparsenet::cuda
