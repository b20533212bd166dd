#include "cpu/bsr_view.h"

#include "cpu/nonfinite.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace sparsenet {

void validate_bsr(const BsrView& a) {
  if (a.rows < 0 || a.cols < 0 || a.nnzb < 0) throw std::invalid_argument("rows, cols and nnzb must be non-negative");
  if (a.r < 1 || a.c < 1 || a.r > kBsrMaxBlock || a.c > kBsrMaxBlock)
    throw std::invalid_argument("block shape must be 1..64 x 1..64, got " + std::to_string(a.r) + "x" +
                                std::to_string(a.c));
  if (a.block_rows != bsr_block_rows(a.rows, a.r))
    throw std::invalid_argument("block_ptr must have ceil(rows / r) + 1 = " +
                                std::to_string(bsr_block_rows(a.rows, a.r) + 1) + " entries");
  const int64_t block_cols = bsr_block_rows(a.cols, a.c);
  if (a.block_ptr[0] != 0) throw std::invalid_argument("block_ptr[0] must be 0");
  for (int64_t R = 0; R < a.block_rows; ++R) {
    const int64_t b0 = a.block_ptr[R], b1 = a.block_ptr[R + 1];
    if (b1 < b0) throw std::invalid_argument("block_ptr must be non-decreasing (block row " + std::to_string(R) + ")");
    if (b1 > a.nnzb)
      throw std::invalid_argument("block_ptr[" + std::to_string(R + 1) + "] = " + std::to_string(b1) +
                                  " exceeds the " + std::to_string(a.nnzb) + " stored blocks");
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t col = a.block_cols[b];
      if (col < 0 || col >= block_cols)
        throw std::invalid_argument("block row " + std::to_string(R) + " has block column " + std::to_string(col) +
                                    ", outside [0, " + std::to_string(block_cols) + ")");
      if (b > b0 && col <= a.block_cols[b - 1])
        throw std::invalid_argument("block columns of block row " + std::to_string(R) +
                                    " must be strictly increasing");
    }
  }
  if (a.block_ptr[a.block_rows] != a.nnzb)
    throw std::invalid_argument("block_ptr[-1] = " + std::to_string(a.block_ptr[a.block_rows]) +
                                " does not match the " + std::to_string(a.nnzb) + " stored blocks");
}

void bsr_transpose_blocks(const BsrView& a, int64_t slice, float* out) {
  const int64_t block = a.r * a.c;
  for (int64_t b = 0; b < a.nnzb; ++b) {
    const float* v = a.values + b * block;
    float* t = out + b * block;
    for (int64_t i = 0; i < a.r; ++i)
      for (int64_t j = 0; j < a.c; ++j) t[(i / slice) * slice * a.c + j * slice + i % slice] = v[i * a.c + j];
  }
}

void propagate_nonfinite(const BsrView& a, const DenseArgs& d) {
  std::vector<int64_t> bad;
  for_each_nonfinite_sample(d, a.cols, [&](float* y, const std::vector<int64_t>& columns) {
    bad.clear();  // the block columns they fall in
    for (const int64_t k : columns)
      if (bad.empty() || bad.back() != k / a.c) bad.push_back(k / a.c);
    for (int64_t R = 0; R < a.block_rows; ++R) {
      bool all_covered = true;
      for (int64_t col : bad) {  // a binary search of the block row's sorted block columns
        const int32_t* lo = a.block_cols + a.block_ptr[R];
        const int32_t* hi = a.block_cols + a.block_ptr[R + 1];
        while (lo < hi) {
          const int32_t* mid = lo + (hi - lo) / 2;
          if (*mid < col) lo = mid + 1; else hi = mid;
        }
        if (lo == a.block_cols + a.block_ptr[R + 1] || *lo != col) {
          all_covered = false;
          break;
        }
      }
      if (all_covered) continue;
      for (int64_t i = R * a.r; i < std::min(a.rows, (R + 1) * a.r); ++i) y[i] = std::numeric_limits<float>::quiet_NaN();
    }
  });
}

}  // namespace sparsenet
