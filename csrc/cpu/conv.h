// Sparse 2-D convolution with a CSR weight, without materialising the im2col matrix.
//
// The weight is the convolution's (out_channels, in_channels / groups * kh * kw) matrix in CSR form,
// its columns in PyTorch's (in_channel, kernel row, kernel column) order. Input and output are
// contiguous NCHW float32.
//
// The SIMD kernels copy the input once into zero-padded planes split by stride phase: padded
// position (iy, ix) goes to phase plane (iy % sh, ix % sw) at (iy / sh, ix / sw), planes hq x wq.
// Output pixel (oy, ox) then reads, for weight column (ci, ky, kx), the phase plane
// (ky * dh % sh, kx * dw % sw) at (oy + ky * dh / sh, ox + kx * dw / sw): on the grid q = oy * wq + ox
// that is q plus a per-column offset. So a tile of consecutive grid pixels reads, for each weight
// column, one contiguous run of input, which the kernels pack once per tile (see DirectConv); the
// offsets are computed once per input size. Grid columns past out_w are computed and dropped (2 of 58
// for a 56 x 56 output with padding 1 at stride 1).
//
// At stride 1 (where out_w <= in_w and the kernel has at most kConvMaxTaps taps) nothing is copied:
// the grid is the input's own (hq x wq = in_h x in_w), column (ci, ky, kx) reads the input at q + (ky *
// dh - pad_h) * in_w + kx * dw - pad_w, and the tile's packing loads each column's pixels masked to
// those whose input lies inside the image (the padding's zeros are the masked lanes). A pointwise
// convolution (1 x 1, no padding) needs no masks.
#pragma once
#include <cstdint>
#include <vector>

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
  // Write y with streaming stores where a tile's outputs fill whole lines (plan::streams_conv_output).
  bool stream_output = false;
  // A pointwise layer read in place asks for each input column's lines kConvInputAheadFloats ahead
  // as it packs a tile (plan::prefetches_conv_input): its threads' runs of consecutive tiles read
  // every input channel's plane front to back, a line or two a tile, more streams than the hardware
  // prefetcher follows.
  bool prefetch_input = false;
};

// The shape of a convolution of an (batch, in_channels, in_h, in_w) input with `out_channels`
// filters and geometry (kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups), as the
// bindings receive them; std::invalid_argument unless geometry holds 9 values. Not yet validated.
ConvShape conv_shape(int64_t batch, int64_t in_channels, int64_t in_h, int64_t in_w, int64_t out_channels,
                     const std::vector<int64_t>& geometry);

// Checks the shape against itself and the weight (out_channels rows, in_channels / groups * kh * kw
// columns) and sets out_h, out_w; throws std::invalid_argument naming what does not fit.
void validate_conv(ConvShape& s, const CsrView& a);

// Dense semantics for non-finite inputs (as for CSR): an output becomes NaN where its receptive
// field holds Inf or NaN at a weight position the CSR does not store. Applied after the kernels.
void propagate_nonfinite(const CsrView& a, const ConvShape& s, const ConvArgs& c);

// What the SIMD kernels need besides the shape (see above): the phase planes' size, where each weight
// column's input starts relative to the output pixel, and each stored weight's place in a packed tile.
//
// A tile runs the weight columns in blocks. For each block it first packs, for every column, the W
// grid pixels' inputs into a W-float aligned slot (two unaligned loads and two aligned stores per
// column with AVX-512); then every output channel of the item runs over the block's stored weights,
// each one broadcast and multiplied over its column's slot with aligned loads. Read where it lies,
// almost every load straddled two cache lines (offsets are arbitrary), which halved the loads a
// cycle; packed, each column's slot is read by every output channel that stores it (19 of 64 at
// 70%). A block's slots take up to kConvPackBytes (planner.h).
struct DirectConv {
  int64_t hq = 0, wq = 0;                // phase plane height and width (the input's, in place)
  bool in_place = false;                 // stride 1: the input is read where it lies (see above)
  const int32_t* sources = nullptr;      // [cols]: column c's input, from the pixel, within the group's planes
  // [nnz]: stored weight k's slot in its block's packed tile, in floats (below kConvPackBytes / 4, so
  // 16 bits: of the 8 bytes per weight the kernel streamed with 32-bit offsets, half were offsets).
  const uint16_t* offsets = nullptr;
  int64_t block_cols = 1, blocks = 1;    // weight columns per block, blocks
  const int64_t* block_start = nullptr;  // [rows * (blocks + 1)]: where row r's weights of block b start
  // [rows]: how many rows from r on (r included, at most kConvMaxSameRows) store exactly r's columns.
  // Such rows run together: each slot load then feeds one FMA per row, where a row alone pays a
  // broadcast, an offset and NV loads for its NV FMAs (weights pruned in blocks of output channels,
  // structure="block" with block=(4, 1), give runs of 4).
  const uint8_t* same_rows = nullptr;
};
constexpr int64_t kConvMaxSameRows = 4;
// Kernel taps (kh * kw) up to which a stride-1 convolution reads its input in place: a tile keeps one
// lane mask per tap.
constexpr int64_t kConvMaxTaps = 64;

// DirectConv::same_rows for a weight (its structure alone decides it).
void same_rows(const CsrView& a, std::vector<uint8_t>* runs);

// The share of a's rows that the kernels run with others (same_rows, taken 4 and then 2 at a time):
// 0 for unstructured weights, 1 for weights pruned in blocks of 4 output channels. format="auto"
// keys its timings by it; share_run_together: the same from same_rows' runs.
double rows_run_together(const CsrView& a);
double share_run_together(const std::vector<uint8_t>& runs);

// Sets hq, wq and the blocks, and fills sources, offsets (nnz entries), block_start and same_rows for
// shape s; returns false where a group's planes would not be addressable with int32 offsets (the
// caller then runs the portable kernel).
bool direct_offsets(const CsrView& a, const ConvShape& s, DirectConv* d, uint16_t* offsets,
                    std::vector<int64_t>* block_start, std::vector<int32_t>* sources,
                    std::vector<uint8_t>* same_rows);

// A kernel returns whether it checked, as it loaded them, that every input it read is finite: then
// no output needs propagate_nonfinite, whose own scan (a second pass over the input from L3 or
// memory) had been 40% of a pointwise layer's time at 90% sparsity (144->24 at 56x56). False where
// it found Inf or NaN, or did not look (the portable kernel): the caller then runs
// propagate_nonfinite. An input no output reads, which dense ignores too, need not be checked.
using CsrConvFn = bool (*)(const CsrView&, const ConvShape&, const ConvArgs&, const DirectConv&);

namespace cpu {
// (The portable kernel reads the input as it is and ignores the DirectConv.)
namespace fallback { bool csr_conv2d(const CsrView&, const ConvShape&, const ConvArgs&, const DirectConv&); }
#ifdef SPARSENET_BUILD_AVX2
namespace avx2 { bool csr_conv2d(const CsrView&, const ConvShape&, const ConvArgs&, const DirectConv&); }
#endif
#ifdef SPARSENET_BUILD_AVX512
namespace avx512 { bool csr_conv2d(const CsrView&, const ConvShape&, const ConvArgs&, const DirectConv&); }
#endif
}  // namespace cpu

}  // namespace sparsenet
