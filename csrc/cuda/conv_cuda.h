// CUDA kernel for a sparse 2-D convolution whose weight is a CSR matrix (the layout and geometry of
// cpu/conv.h: rows = output channels, columns = (input channel of the group, kernel row, kernel
// column)); NCHW input and output, value types and rules of cuda/common.h.
#pragma once
#include "cpu/conv.h"
#include "cuda/csr_cuda.h"

namespace sparsenet::cuda {

// A thread per output element (consecutive threads: consecutive output columns of one channel, so a
// warp reads one weight row, its loads broadcast), summing over the row's stored weights the input
// each one reaches (zero where that falls in the padding). Direct: no im2col buffer.
void csr_conv2d(const CsrDevice& a, const ConvShape& s, DType dtype, const void* values, const void* x, void* y,
                const void* bias, cudaStream_t stream);

}  // namespace sparsenet::cuda
