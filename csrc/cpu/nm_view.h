// A validated, non-owning view of an N:M weight, and the kernel entry points that read it.
//
// Packed layout (the contract with sparsenet/formats/nm.py, pinned by tests/formats):
//   pattern  (n, m): every group of m consecutive columns of a row stores n slots, 1 <= n < m <= 16;
//            a row has ceil(cols / m) groups, the last one partial where m does not divide cols (it
//            still has at least n columns)
//   indices  uint8[rows * row_bytes]: slot s of a row (s = group * n + k) keeps its column within
//            its group in `bits` bits (2 when m <= 4, else 4) at bit s * bits of the row's bytes
//            (least significant first); row_bytes = ceil(groups * n * bits / 8). Within a group the
//            columns are strictly increasing and inside the group (a group keeping fewer than n
//            weights fills its spare slots with zeros at unused columns)
//   values   float32[rows * groups * n], slot after slot
// Two bits per stored weight instead of CSR's sixteen: 2:4 reads 4.25 bytes per stored weight, 2.13 per
// position against dense's 4.
#pragma once
#include <cstdint>

#include "cpu/csr_view.h"  // DenseArgs

namespace sparsenet {

struct NmView {
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t n = 2;
  int64_t m = 4;
  int64_t bits = 2;       // per index
  int64_t groups = 0;     // per row
  int64_t row_bytes = 0;  // index bytes per row
  const uint8_t* indices = nullptr;
  const float* values = nullptr;

  int64_t slots() const { return groups * n; }  // per row
  // The column slot s of row r stores.
  int64_t column(int64_t r, int64_t s) const {
    const int64_t bit = s * bits;
    const int64_t field = (indices[r * row_bytes + bit / 8] >> (bit % 8)) & ((1 << bits) - 1);
    return (s / n) * m + field;
  }
};

constexpr int64_t kNmMaxM = 16;

inline int64_t nm_index_bits(int64_t m) { return m <= 4 ? 2 : 4; }
inline int64_t nm_groups(int64_t cols, int64_t m) { return m > 0 ? (cols + m - 1) / m : 0; }
inline int64_t nm_row_bytes(int64_t cols, int64_t n, int64_t m) {
  return (nm_groups(cols, m) * n * nm_index_bits(m) + 7) / 8;
}

// Throws std::invalid_argument naming the first broken invariant. O(rows * cols), once per handle.
void validate_nm(const NmView& a);

// The structure as CSR (row pointers, and each slot's column, padding slots included): the batch
// kernels run the CSR panels on it, whose values are the N:M values themselves (same order).
void nm_to_csr(const NmView& a, int64_t* row_ptr, void* col_idx, int index_bytes);

// Dense semantics for non-finite inputs (as for CSR): y[m, r] becomes NaN where sample m has Inf
// or NaN in a column that row r has no slot for. Applied after the kernels.
void propagate_nonfinite(const NmView& a, const DenseArgs& d);

using NmMatmulFn = void (*)(const NmView&, const DenseArgs&);

namespace cpu {
namespace fallback { void nm_matmul(const NmView&, const DenseArgs&); }
#ifdef SPARSENET_BUILD_AVX2
namespace avx2 { void nm_matmul(const NmView&, const DenseArgs&); }
#endif
#ifdef SPARSENET_BUILD_AVX512
namespace avx512 { void nm_matmul(const NmView&, const DenseArgs&); }
#endif
}  // namespace cpu

}  // namespace sparsenet
