// CUDA kernel for a block-sparse (BSR) weight (the layout of cpu/bsr_view.h, held in device memory):
// y[m, :] = A x[m, :] (+ bias), value types and rules of cuda/common.h.
#pragma once
#include "cuda/common.h"

namespace sparsenet::cuda {

struct BsrDevice {
  int64_t rows = 0, cols = 0, r = 1, c = 1, block_rows = 0, nnzb = 0;
  int64_t nnz = 0;                      // stored values: nnzb * r * c
  const int64_t* block_ptr = nullptr;   // device, [block_rows + 1]
  const int32_t* block_cols = nullptr;  // device, [nnzb]
};

// One thread block per (block row, 64 inputs): each stored block of the row and the inputs' matching
// columns are staged in shared memory, zero-padded to multiples of 16, and multiplied on the tensor
// cores (WMMA 16x16x16, float32 sums) for float16 and bfloat16; float32 runs the same tiles on the
// CUDA cores. Empty blocks cost nothing: only stored ones are visited.
void bsr_matmul(const BsrDevice& a, DType dtype, const void* values, const DenseDevice& d, cudaStream_t stream);

}  // namespace sparsenet::cuda
