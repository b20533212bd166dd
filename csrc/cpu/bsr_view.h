// A validated, non-owning view of a block-sparse (BSR) weight, and the kernel entry points that read it.
//
// Packed layout (the contract with sparsenet/formats/bsr.py, pinned by tests/formats):
//   block shape  r x c (1..64 each); the weight's rows and columns are cut into ceil(rows / r) block
//                rows and ceil(cols / c) block columns, the last ones partial where r or c does not divide
//   block_ptr    int64[block_rows + 1]: block_ptr[0] == 0, non-decreasing, block_ptr[-1] == nnzb
//   block_cols   int32[nnzb]: each stored block's block column, strictly increasing within a block row
//   values       float32[nnzb * r * c]: block after block, each r x c row-major; entries of a partial
//                block that fall past the weight's edge are stored but never read
// Each stored block is computed densely, zeros included: the format for weights pruned in blocks,
// where it reads one index per block and runs register-blocked dense micro-kernels.
#pragma once
#include <cstdint>

#include "cpu/csr_view.h"  // DenseArgs

namespace sparsenet {

struct BsrView {
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t r = 1;  // block height
  int64_t c = 1;  // block width
  int64_t block_rows = 0;
  int64_t nnzb = 0;  // stored blocks
  const int64_t* block_ptr = nullptr;
  const int32_t* block_cols = nullptr;
  const float* values = nullptr;
  // Optional: the values again, each block column by column in slices of `slice` rows
  // (values_t[b * r * c + s * slice * c + j * slice + i] is row s * slice + i, column j of block b),
  // where the kernel wants the weights as its vector operand (bsr_transpose_blocks). Null: none.
  const float* values_t = nullptr;
  int64_t slice = 0;
};

constexpr int64_t kBsrMaxBlock = 64;

inline int64_t bsr_block_rows(int64_t rows, int64_t r) { return r > 0 ? (rows + r - 1) / r : 0; }

// Throws std::invalid_argument naming the first broken invariant. O(block_rows + nnzb), once per handle.
void validate_bsr(const BsrView& a);

// Writes a's values (r a multiple of slice) in the block-transposed layout of BsrView::values_t to
// out (nnzb * r * c floats).
void bsr_transpose_blocks(const BsrView& a, int64_t slice, float* out);

// Dense semantics for non-finite inputs (as for CSR): y[m, i] becomes NaN where sample m has Inf or
// NaN in a column that no stored block of row i's block row covers. Applied after the kernels.
void propagate_nonfinite(const BsrView& a, const DenseArgs& d);

using BsrMatmulFn = void (*)(const BsrView&, const DenseArgs&);

namespace cpu {
namespace fallback { void bsr_matmul(const BsrView&, const DenseArgs&); }
#ifdef SPARSENET_BUILD_AVX2
namespace avx2 { void bsr_matmul(const BsrView&, const DenseArgs&); }
#endif
#ifdef SPARSENET_BUILD_AVX512
namespace avx512 { void bsr_matmul(const BsrView&, const DenseArgs&); }
#endif
}  // namespace cpu

}  // namespace sparsenet
