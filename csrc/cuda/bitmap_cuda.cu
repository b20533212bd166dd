#include "cuda/bitmap_cuda.h"

#include "cuda/convert.cuh"

namespace sparsenet::cuda {

namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kInputsPerPass = 8;
constexpr int kChunk = 16;

template <typename T>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
bitmap_rows_kernel(const int64_t* __restrict__ row_ptr, const uint16_t* __restrict__ masks, int64_t chunks,
                   const T* __restrict__ values, const T* __restrict__ x, int64_t batch, int64_t ldx,
                   const T* __restrict__ bias, T* __restrict__ y, int64_t ldy, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;  // whole warps leave together
  const uint16_t* words = masks + row * chunks;
  const float b = bias ? to_float(bias[row]) : 0.0f;
  for (int64_t m0 = 0; m0 < batch; m0 += kInputsPerPass) {
    const int n = static_cast<int>(batch - m0 < kInputsPerPass ? batch - m0 : kInputsPerPass);
    float acc[kInputsPerPass];
#pragma unroll
    for (int j = 0; j < kInputsPerPass; ++j) acc[j] = 0.0f;
    const T* xs = x + m0 * ldx;
    int64_t base = row_ptr[row];  // the row's next value, at this stretch's start
    for (int64_t c0 = 0; c0 < chunks; c0 += kWarp) {
      const int64_t c = c0 + lane;
      unsigned word = c < chunks ? words[c] : 0u;
      const int count = __popc(word);
      int inclusive = count;  // the warp's inclusive prefix sum of the counts
#pragma unroll
      for (int offset = 1; offset < kWarp; offset *= 2) {
        const int below = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += below;
      }
      int64_t at = base + inclusive - count;
      while (word) {
        const int bit = __ffs(word) - 1;
        word &= word - 1;
        const float v = to_float(values[at++]);
        const int64_t column = c * kChunk + bit;
#pragma unroll
        for (int j = 0; j < kInputsPerPass; ++j)
          if (j < n) acc[j] += v * to_float(xs[j * ldx + column]);
      }
      base += __shfl_sync(0xffffffffu, inclusive, kWarp - 1);
    }
#pragma unroll
    for (int j = 0; j < kInputsPerPass; ++j) {
      const float s = warp_sum(acc[j]);
      if (lane == 0 && j < n) y[(m0 + j) * ldy + row] = from_float<T>(s + b);
    }
  }
}

}  // namespace

void bitmap_matmul(const BitmapDevice& a, DType dtype, const void* values, const DenseDevice& d, cudaStream_t stream) {
  if (a.rows == 0 || d.batch == 0) return;
  if ((a.rows + kWarpsPerBlock - 1) / kWarpsPerBlock > 0x7fffffff)
    throw std::invalid_argument("too many rows for one launch: " + std::to_string(a.rows));
  const dim3 grid(static_cast<unsigned>((a.rows + kWarpsPerBlock - 1) / kWarpsPerBlock)), block(kWarp * kWarpsPerBlock);
  with_value_type(dtype, [&](auto t) {
    using T = decltype(t);
    bitmap_rows_kernel<T><<<grid, block, 0, stream>>>(a.row_ptr, a.masks, a.chunks, static_cast<const T*>(values),
                                                      static_cast<const T*>(d.x), d.batch, d.ldx,
                                                      static_cast<const T*>(d.bias), static_cast<T*>(d.y), d.ldy,
                                                      a.rows);
  });
  check_launch("bitmap_matmul");
}

}  // namespace sparsenet::cuda
