// CUDA kernel for an N:M weight (the layout of cpu/nm_view.h, held in device memory):
// y[m, :] = A x[m, :] (+ bias), value types and rules of cuda/common.h.
#pragma once
#include "cuda/common.h"

namespace sparsenet::cuda {

struct NmDevice {
  int64_t rows = 0, cols = 0, n = 2, m = 4, bits = 2, groups = 0, row_bytes = 0;
  int64_t nnz = 0;                   // stored slots: rows * groups * n
  const uint8_t* indices = nullptr;  // device, [rows * row_bytes]
};

// Small batches: one warp per weight row, its lanes striding over the row's slots (column = the
// slot's group * m + its in-group index); up to 8 inputs per pass. (No sparse tensor-core path yet.)
void nm_matmul(const NmDevice& a, DType dtype, const void* values, const DenseDevice& d, cudaStream_t stream);

}  // namespace sparsenet::cuda
