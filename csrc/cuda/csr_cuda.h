// CUDA kernels for a packed CSR weight (the layout of cpu/csr_view.h, held in device memory):
// y[m, :] = A x[m, :] (+ bias) for float32, float16 and bfloat16 values and inputs, accumulated in
// float32 (cuda/common.h).
#pragma once
#include "cuda/common.h"

namespace sparsenet::cuda {

struct CsrDevice {
  int64_t rows = 0, cols = 0, nnz = 0;
  const int64_t* row_ptr = nullptr;  // device, [rows + 1]
  const void* col_idx = nullptr;     // device, uint16 or int32 [nnz]
  int index_bytes = 2;
};

// Small batches (the memory-bound regime): one warp per weight row, its lanes striding over the
// row's stored weights, up to 8 inputs per pass so the row's values and indices are read once per 8.
void csr_matmul(const CsrDevice& a, DType dtype, const void* values, const DenseDevice& d, cudaStream_t stream);

}  // namespace sparsenet::cuda
