#include "cuda/bitmap_cuda.h"

#include "cuda/warp_rows.cuh"

namespace sparsenet::cuda {

namespace {

constexpr int kChunk = 16;

template <typename T>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
bitmap_rows_kernel(const int64_t* __restrict__ row_ptr, const uint16_t* __restrict__ masks, int64_t chunks,
                   const T* __restrict__ values, const T* __restrict__ x, int64_t batch, int64_t ldx,
                   const T* __restrict__ bias, T* __restrict__ y, int64_t ldy, int64_t rows) {
  warp_per_row(rows, x, batch, ldx, bias, y, ldy, [&](int lane, int64_t row, const T* xs, int n, float* acc) {
    const uint16_t* words = masks + row * chunks;
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
  });
}

}  // namespace

void bitmap_matmul(const BitmapDevice& a, DType dtype, const void* values, const DenseDevice& d, cudaStream_t stream) {
  if (a.rows == 0 || d.batch == 0) return;
  const dim3 grid = warp_per_row_grid(a.rows, "bitmap_matmul"), block(kWarp * kWarpsPerBlock);
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
