#include "cpu/csr_view.h"

namespace sparsenet {

namespace {
template <typename Idx>
void validate_indices(const CsrView& a, const Idx* col) {
  for (int64_t r = 0; r < a.rows; ++r) {
    const int64_t begin = a.row_ptr[r], end = a.row_ptr[r + 1];
    int64_t prev = -1;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t c = static_cast<int64_t>(col[k]);
      if (c < 0 || c >= a.cols)
        throw std::invalid_argument("col_indices[" + std::to_string(k) + "] = " + std::to_string(c) +
                                    " is out of range for " + std::to_string(a.cols) + " columns");
      if (c <= prev)
        throw std::invalid_argument("col_indices of row " + std::to_string(r) +
                                    " are not strictly increasing (at position " + std::to_string(k) + ")");
      prev = c;
    }
  }
}
}  // namespace

void validate_csr(const CsrView& a) {
  if (a.rows < 0 || a.cols < 0 || a.nnz < 0)
    throw std::invalid_argument("rows, cols and nnz must be non-negative");
  if (a.index_bytes != 2 && a.index_bytes != 4)
    throw std::invalid_argument("col_indices must be uint16 or int32");
  if (a.index_bytes == 2 && a.cols > 65536)
    throw std::invalid_argument("uint16 col_indices cannot address " + std::to_string(a.cols) + " columns");
  if (a.cols > INT32_MAX) throw std::invalid_argument("too many columns for int32 col_indices");
  if (a.row_ptr[0] != 0) throw std::invalid_argument("crow_indices[0] must be 0");
  for (int64_t r = 0; r < a.rows; ++r)
    if (a.row_ptr[r + 1] < a.row_ptr[r])
      throw std::invalid_argument("crow_indices must be non-decreasing (row " + std::to_string(r) + ")");
  if (a.row_ptr[a.rows] != a.nnz)
    throw std::invalid_argument("crow_indices[-1] = " + std::to_string(a.row_ptr[a.rows]) +
                                " does not match nnz = " + std::to_string(a.nnz));
  if (a.index_bytes == 2) validate_indices(a, static_cast<const uint16_t*>(a.col_idx));
  else validate_indices(a, static_cast<const int32_t*>(a.col_idx));
}

}  // namespace sparsenet
