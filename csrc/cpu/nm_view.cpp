#include "cpu/nm_view.h"

#include "cpu/nonfinite.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace sparsenet {

void validate_nm(const NmView& a) {
  if (a.rows < 0 || a.cols < 0) throw std::invalid_argument("rows and cols must be non-negative");
  if (a.m < 2 || a.m > kNmMaxM || a.n < 1 || a.n >= a.m)
    throw std::invalid_argument("pattern must be N:M with 1 <= N < M <= 16, got " + std::to_string(a.n) + ":" +
                                std::to_string(a.m));
  if (a.cols % a.m != 0 && a.cols % a.m < a.n)
    throw std::invalid_argument("the last group of a row has " + std::to_string(a.cols % a.m) + " columns, fewer than n = " +
                                std::to_string(a.n));
  if (a.bits != nm_index_bits(a.m) || a.groups != nm_groups(a.cols, a.m) || a.row_bytes != nm_row_bytes(a.cols, a.n, a.m))
    throw std::invalid_argument("N:M view sizes do not follow from its shape and pattern");
  for (int64_t r = 0; r < a.rows; ++r) {
    for (int64_t g = 0; g < a.groups; ++g) {
      const int64_t width = std::min(a.m, a.cols - g * a.m);
      int64_t prev = -1;
      for (int64_t k = 0; k < a.n; ++k) {
        const int64_t c = a.column(r, g * a.n + k) - g * a.m;
        if (c >= width)
          throw std::invalid_argument("row " + std::to_string(r) + ", group " + std::to_string(g) + ": index " +
                                      std::to_string(c) + " is outside the group's " + std::to_string(width) +
                                      " columns");
        if (c <= prev)
          throw std::invalid_argument("row " + std::to_string(r) + ", group " + std::to_string(g) +
                                      ": indices must be strictly increasing");
        prev = c;
      }
    }
  }
}

void nm_to_csr(const NmView& a, int64_t* row_ptr, void* col_idx, int index_bytes) {
  const int64_t slots = a.slots();
  for (int64_t r = 0; r <= a.rows; ++r) row_ptr[r] = r * slots;
  for (int64_t r = 0; r < a.rows; ++r)
    for (int64_t s = 0; s < slots; ++s) {
      const int64_t c = a.column(r, s);
      if (index_bytes == 2) static_cast<uint16_t*>(col_idx)[r * slots + s] = static_cast<uint16_t>(c);
      else static_cast<int32_t*>(col_idx)[r * slots + s] = static_cast<int32_t>(c);
    }
}

void propagate_nonfinite(const NmView& a, const DenseArgs& d) {
  for_each_nonfinite_sample(d, a.cols, [&](float* y, const std::vector<int64_t>& bad) {
    for (int64_t r = 0; r < a.rows; ++r)
      for (int64_t c : bad) {
        const int64_t g = c / a.m;
        bool stored = false;
        for (int64_t k = 0; k < a.n && !stored; ++k) stored = a.column(r, g * a.n + k) == c;
        if (!stored) {
          y[r] = std::numeric_limits<float>::quiet_NaN();
          break;
        }
      }
  });
}

}  // namespace sparsenet
