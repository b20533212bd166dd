// Sparse 2-D convolution with a CSR weight, without materialising the im2col matrix.
//
// The weight is the convolution's (out_channels, in_channels / groups * kh * kw) matrix in CSR form,
// its columns in PyTorch's (in_channel, kernel row, kernel column) order. Input and output are
// contiguous NCHW float32. Two kernels, both over tiles of output pixels (a few vectors wide), each
// stored weight one broadcast and one FMA per vector of the tile:
//
// * stride 1 ("direct"): the input is copied once into zero-padded planes. On the padded width's
//   grid an output pixel q = oy * wp + ox reads, for weight column (ci, ky, kx), the input at
//   q + offset(ci, ky, kx): so a tile's inputs for one stored weight are one contiguous vector load
//   at a per-column offset (computed once per input size). The grid's columns past out_w are
//   computed and dropped (2 of 58 at 56 x 56 with padding 1).
// * other strides: each tile's receptive fields are gathered into a small panel (one row per
//   weight column, one lane per pixel: an implicit im2col of one tile) and CSR's panel dot products
//   run over it.
#pragma once
#include <cstdint>

#include "cpu/csr_view.h"

namespace sparsenet {

struct ConvShape {
  int64_t batch = 0, in_channels = 0, in_h = 0, in_w = 0;
  int64_t out_channels = 0, kernel_h = 1, kernel_w = 1;
  int64_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dil_h = 1, dil_w = 1, groups = 1;
  int64_t out_h = 0, out_w = 0;  // derived by validate_conv
};

struct ConvArgs {
  const float* x = nullptr;  // (batch, in_channels, in_h, in_w)
  float* y = nullptr;        // (batch, out_channels, out_h, out_w)
  const float* bias = nullptr;
  int num_threads = 1;
};

// Checks the shape against itself and the weight (out_channels rows, in_channels / groups * kh * kw
// columns) and sets out_h, out_w; throws std::invalid_argument naming what does not fit.
void validate_conv(ConvShape& s, const CsrView& a);

// Dense semantics for non-finite inputs (as for CSR): an output becomes NaN where its receptive
// field holds Inf or NaN at a weight position the CSR does not store. Applied after the kernels.
void propagate_nonfinite(const CsrView& a, const ConvShape& s, const ConvArgs& c);

// What the stride-1 kernel needs besides the shape: the padded plane's size and, for each stored
// weight k, the offset of its input from the output pixel on the padded grid (see above).
struct DirectConv {
  int64_t hp = 0, wp = 0;        // padded input height and width
  const int32_t* offsets = nullptr;  // [nnz]
};

// Fills offsets (nnz entries) for a stride-1 convolution of shape s; returns false where they would
// not fit int32 (the caller then uses the panel kernel).
bool direct_offsets(const CsrView& a, const ConvShape& s, int32_t* offsets);

using CsrConvFn = void (*)(const CsrView&, const ConvShape&, const ConvArgs&);
using CsrConvDirectFn = void (*)(const CsrView&, const ConvShape&, const ConvArgs&, const DirectConv&);

namespace cpu {
namespace fallback { void csr_conv2d(const CsrView&, const ConvShape&, const ConvArgs&); }
#ifdef SPARSENET_BUILD_AVX2
namespace avx2 {
void csr_conv2d(const CsrView&, const ConvShape&, const ConvArgs&);
void csr_conv2d_direct(const CsrView&, const ConvShape&, const ConvArgs&, const DirectConv&);
}  // namespace avx2
#endif
#ifdef SPARSENET_BUILD_AVX512
namespace avx512 {
void csr_conv2d(const CsrView&, const ConvShape&, const ConvArgs&);
void csr_conv2d_direct(const CsrView&, const ConvShape&, const ConvArgs&, const DirectConv&);
}  // namespace avx512
#endif
}  // namespace cpu

}  // namespace sparsenet
