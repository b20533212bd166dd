// CUDA kernel for a bitmap-compressed weight (the layout of cpu/bitmap_view.h, held in device
// memory): y[m, :] = A x[m, :] (+ bias), value types and rules of cuda/common.h.
#pragma once
#include "cuda/common.h"

namespace sparsenet::cuda {

struct BitmapDevice {
  int64_t rows = 0, cols = 0, chunks = 0, nnz = 0;
  const uint16_t* masks = nullptr;   // device, [rows * chunks], bit j of word k: column 16 k + j stored
  const int64_t* row_ptr = nullptr;  // device, [rows + 1]
};

// Small batches: one warp per weight row. Each lane takes one 16-column mask word of a 512-column
// stretch, finds where its values start by a warp prefix sum of the words' popcounts, and walks its
// set bits; up to 8 inputs per pass, so masks and values are read once per 8 inputs.
void bitmap_matmul(const BitmapDevice& a, DType dtype, const void* values, const DenseDevice& d, cudaStream_t stream);

}  // namespace sparsenet::cuda
