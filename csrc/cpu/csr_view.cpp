#include "cpu/csr_view.h"

#include "cpu/nonfinite.h"

#include <algorithm>
#include <limits>
#include <vector>

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
// True if row r stores every column in `cols` (sorted ascending).
template <typename Idx>
bool row_holds_all(const CsrView& a, const Idx* col, int64_t r, const std::vector<int64_t>& cols) {
  const Idx* begin = col + a.row_ptr[r];
  const Idx* end = col + a.row_ptr[r + 1];
  if (static_cast<size_t>(end - begin) < cols.size()) return false;
  for (const int64_t c : cols) {
    begin = std::lower_bound(begin, end, static_cast<Idx>(c));
    if (begin == end || static_cast<int64_t>(*begin) != c) return false;
  }
  return true;
}

template <typename Idx>
void propagate(const CsrView& a, const DenseArgs& d) {
  const Idx* col = static_cast<const Idx*>(a.col_idx);
  for_each_nonfinite_sample(d, a.cols, [&](float* y, const std::vector<int64_t>& bad) {
    for (int64_t r = 0; r < a.rows; ++r)
      if (!row_holds_all(a, col, r, bad)) y[r] = std::numeric_limits<float>::quiet_NaN();
  });
}

}  // namespace

void propagate_nonfinite(const CsrView& a, const DenseArgs& d) {
  if (a.index_bytes == 2) propagate<uint16_t>(a, d);
  else propagate<int32_t>(a, d);
}

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
