// CUDA kernels for a packed CSR weight (the layout of cpu/csr_view.h, held in device memory):
// y[m, :] = A x[m, :] (+ bias) for float32, float16 and bfloat16 values and inputs, accumulated in
// float32. Raw device pointers and the caller's stream; nothing here synchronises the device, and
// every launch is checked (std::runtime_error naming the CUDA error). No torch headers.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace sparsenet::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

struct CsrDevice {
  int64_t rows = 0, cols = 0, nnz = 0;
  const int64_t* row_ptr = nullptr;  // device, [rows + 1]
  const void* col_idx = nullptr;     // device, uint16 or int32 [nnz]
  int index_bytes = 2;
};

struct DenseDevice {
  const void* x = nullptr;  // (batch, cols), rows ldx elements apart
  int64_t batch = 0, ldx = 0;
  void* y = nullptr;  // (batch, rows), rows ldy elements apart
  int64_t ldy = 0;
  const void* bias = nullptr;  // [rows] or null
};

// Small batches (the memory-bound regime): one warp per weight row, its lanes striding over the
// row's stored weights, up to 8 inputs per pass so the row's values and indices are read once per 8.
void csr_matmul(const CsrDevice& a, DType dtype, const void* values, const DenseDevice& d, cudaStream_t stream);

}  // namespace sparsenet::cuda
