#include "cuda/csr_cuda.h"

#include "cuda/warp_rows.cuh"

namespace sparsenet::cuda {

namespace {

template <typename T, typename Idx>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
csr_rows_kernel(const int64_t* __restrict__ row_ptr, const Idx* __restrict__ col, const T* __restrict__ values,
                const T* __restrict__ x, int64_t batch, int64_t ldx, const T* __restrict__ bias, T* __restrict__ y,
                int64_t ldy, int64_t rows) {
  warp_per_row(rows, x, batch, ldx, bias, y, ldy, [&](int lane, int64_t row, const T* xs, int n, float* acc) {
    for (int64_t k = row_ptr[row] + lane; k < row_ptr[row + 1]; k += kWarp) {
      const float v = to_float(values[k]);
      const int64_t c = static_cast<int64_t>(col[k]);
#pragma unroll
      for (int j = 0; j < kInputsPerPass; ++j)
        if (j < n) acc[j] += v * to_float(xs[j * ldx + c]);
    }
  });
}

}  // namespace

void csr_matmul(const CsrDevice& a, DType dtype, const void* values, const DenseDevice& d, cudaStream_t stream) {
  if (a.rows == 0 || d.batch == 0) return;
  const dim3 grid = warp_per_row_grid(a.rows, "csr_matmul"), block(kWarp * kWarpsPerBlock);
  with_value_type(dtype, [&](auto t) {
    using T = decltype(t);
    const auto* v = static_cast<const T*>(values);
    const auto* x = static_cast<const T*>(d.x);
    const auto* bias = static_cast<const T*>(d.bias);
    auto* y = static_cast<T*>(d.y);
    if (a.index_bytes == 2)
      csr_rows_kernel<T, uint16_t><<<grid, block, 0, stream>>>(a.row_ptr, static_cast<const uint16_t*>(a.col_idx), v,
                                                               x, d.batch, d.ldx, bias, y, d.ldy, a.rows);
    else
      csr_rows_kernel<T, int32_t><<<grid, block, 0, stream>>>(a.row_ptr, static_cast<const int32_t*>(a.col_idx), v,
                                                              x, d.batch, d.ldx, bias, y, d.ldy, a.rows);
  });
  check_launch("csr_matmul");
}

}  // namespace sparsenet::cuda
