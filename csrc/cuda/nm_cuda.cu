#include "cuda/nm_cuda.h"

#include "cuda/warp_rows.cuh"

namespace sparsenet::cuda {

namespace {

template <typename T>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
nm_rows_kernel(const uint8_t* __restrict__ indices, int n, int m, int bits, int64_t slots, int64_t row_bytes,
               const T* __restrict__ values, const T* __restrict__ x, int64_t batch, int64_t ldx,
               const T* __restrict__ bias, T* __restrict__ y, int64_t ldy, int64_t rows) {
  warp_per_row(rows, x, batch, ldx, bias, y, ldy, [&](int lane, int64_t row, const T* xs, int count, float* acc) {
    const uint8_t* own = indices + row * row_bytes;
    const T* v = values + row * slots;
    for (int64_t s = lane; s < slots; s += kWarp) {
      const int64_t bit = s * bits;
      const int field = (own[bit / 8] >> (bit % 8)) & ((1 << bits) - 1);
      const int64_t column = s / n * m + field;
      const float w = to_float(v[s]);
#pragma unroll
      for (int j = 0; j < kInputsPerPass; ++j)
        if (j < count) acc[j] += w * to_float(xs[j * ldx + column]);
    }
  });
}

}  // namespace

void nm_matmul(const NmDevice& a, DType dtype, const void* values, const DenseDevice& d, cudaStream_t stream) {
  if (a.rows == 0 || d.batch == 0) return;
  const dim3 grid = warp_per_row_grid(a.rows, "nm_matmul"), block(kWarp * kWarpsPerBlock);
  with_value_type(dtype, [&](auto t) {
    using T = decltype(t);
    nm_rows_kernel<T><<<grid, block, 0, stream>>>(a.indices, static_cast<int>(a.n), static_cast<int>(a.m),
                                                  static_cast<int>(a.bits), a.groups * a.n, a.row_bytes,
                                                  static_cast<const T*>(values), static_cast<const T*>(d.x), d.batch,
                                                  d.ldx, static_cast<const T*>(d.bias), static_cast<T*>(d.y), d.ldy,
                                                  a.rows);
  });
  check_launch("nm_matmul");
}

}  // namespace sparsenet::cuda
