// A validated, non-owning view of a bitmap-compressed weight, and the kernel entry points that read it.
//
// Packed layout (the contract with sparsenet/formats/bitmap.py, pinned by tests/formats):
//   masks    uint16[rows * chunks], chunks = ceil(cols / 16): bit j of masks[r * chunks + k] is set
//            when W[r, 16 k + j] is stored; bits past the last column are 0
//   row_ptr  int64[rows + 1]: where row r's values start; row_ptr[0] == 0 and
//            row_ptr[r + 1] - row_ptr[r] == the number of bits set in row r's masks
//   values   float32[nnz]: the stored weights row by row, in column order
// One bit per position plus the values: at 30-80% density the 16-bit column indices of CSR cost
// more than the bitmap (2 bytes per stored weight against 1/8 byte per position), and a 16-column
// chunk decodes in one instruction on AVX-512 (vexpandps) or a table lookup on AVX2.
#pragma once
#include <cstdint>

#include "cpu/csr_view.h"  // DenseArgs

namespace sparsenet {

struct BitmapView {
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t chunks = 0;  // 16-column chunks per row
  int64_t nnz = 0;
  const uint16_t* masks = nullptr;
  const int64_t* row_ptr = nullptr;
  const float* values = nullptr;
};

constexpr int64_t kBitmapChunk = 16;

inline int64_t bitmap_chunks(int64_t cols) { return (cols + kBitmapChunk - 1) / kBitmapChunk; }

// Throws std::invalid_argument naming the first broken invariant. O(rows * chunks), once per handle.
void validate_bitmap(const BitmapView& a);

// Dense semantics for non-finite inputs, as propagate_nonfinite does for CSR: y[m, r] becomes NaN
// where sample m has Inf or NaN in a column that row r does not store (a dense layer multiplies it
// by a zero weight). Kernels may skip chunks without stored weights, so this is applied after them.
void propagate_nonfinite(const BitmapView& a, const DenseArgs& d);

// The column of each stored weight, row by row (the values' order, so a CSR structure over the same
// values with the same row_ptr): index_bytes 2 (uint16, cols <= 65536) or 4 (int32) each, to col_idx.
void bitmap_to_csr(const BitmapView& a, void* col_idx, int index_bytes);

using BitmapMatmulFn = void (*)(const BitmapView&, const DenseArgs&);

namespace cpu {
namespace fallback { void bitmap_matmul(const BitmapView&, const DenseArgs&); }
#ifdef SPARSENET_BUILD_AVX2
namespace avx2 { void bitmap_matmul(const BitmapView&, const DenseArgs&); }
#endif
#ifdef SPARSENET_BUILD_AVX512
namespace avx512 { void bitmap_matmul(const BitmapView&, const DenseArgs&); }
#endif
}  // namespace cpu

}  // namespace sparsenet
