// What the CUDA kernels share: value types (loads widen to float, sums are float32, stores round to
// nearest), warp sums, and the frame of the warp-per-row kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "cuda/common.h"

namespace sparsenet::cuda {

__device__ inline float to_float(float v) { return v; }
__device__ inline float to_float(__half v) { return __half2float(v); }
__device__ inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ inline T from_float(float v);
template <> __device__ inline float from_float<float>(float v) { return v; }
template <> __device__ inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

constexpr int kWarp = 32;

// The warp's sum of v, in every lane.
__device__ inline float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

constexpr int kWarpsPerBlock = 8;  // rows per block of the warp-per-row kernels
constexpr int kInputsPerPass = 8;  // inputs per pass over a row: accumulators per lane

// The frame of the warp-per-row kernels: the row this warp owns (kWarpsPerBlock warps per block),
// passes over up to kInputsPerPass inputs at a time, and the warp's sums written with the bias.
// walk(lane, row, xs, n, acc) adds to acc[j] (j < n) this lane's share of row . x[j], xs pointing at
// the pass's first input.
template <typename T, typename Walk>
__device__ inline void warp_per_row(int64_t rows, const T* x, int64_t batch, int64_t ldx, const T* bias, T* y,
                                    int64_t ldy, Walk walk) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;  // whole warps leave together: row is uniform across a warp
  const float b = bias ? to_float(bias[row]) : 0.0f;
  for (int64_t m0 = 0; m0 < batch; m0 += kInputsPerPass) {
    const int n = static_cast<int>(batch - m0 < kInputsPerPass ? batch - m0 : kInputsPerPass);
    float acc[kInputsPerPass];
#pragma unroll
    for (int j = 0; j < kInputsPerPass; ++j) acc[j] = 0.0f;
    walk(lane, row, x + m0 * ldx, n, acc);
#pragma unroll
    for (int j = 0; j < kInputsPerPass; ++j) {
      const float s = warp_sum(acc[j]);
      if (lane == 0 && j < n) y[(m0 + j) * ldy + row] = from_float<T>(s + b);
    }
  }
}

// The grid of a warp-per-row launch over `rows` (std::invalid_argument past the launch limit).
inline dim3 warp_per_row_grid(int64_t rows, const char* what) {
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffff) throw std::invalid_argument(std::string(what) + ": too many rows for one launch: " + std::to_string(rows));
  return dim3(static_cast<unsigned>(blocks));
}

// Calls f(T{}) with T the C++ type of dtype (float, __half, __nv_bfloat16).
template <typename F>
void with_value_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
  }
}

}  // namespace sparsenet::cuda
