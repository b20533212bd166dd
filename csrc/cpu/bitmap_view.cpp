#include "cpu/bitmap_view.h"

#include "cpu/nonfinite.h"

#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace sparsenet {

void validate_bitmap(const BitmapView& a) {
  if (a.rows < 0 || a.cols < 0 || a.nnz < 0) throw std::invalid_argument("rows, cols and nnz must be non-negative");
  if (a.chunks != bitmap_chunks(a.cols))
    throw std::invalid_argument("masks must hold ceil(cols / 16) = " + std::to_string(bitmap_chunks(a.cols)) +
                                " chunks per row");
  if (a.row_ptr[0] != 0) throw std::invalid_argument("row_ptr[0] must be 0");
  const int tail = static_cast<int>(a.cols % kBitmapChunk);
  const uint16_t past_end = tail ? static_cast<uint16_t>(~((1u << tail) - 1u)) : 0;
  for (int64_t r = 0; r < a.rows; ++r) {
    const uint16_t* m = a.masks + r * a.chunks;
    int64_t count = 0;
    for (int64_t k = 0; k < a.chunks; ++k) count += __builtin_popcount(m[k]);
    if (a.chunks > 0 && (m[a.chunks - 1] & past_end))
      throw std::invalid_argument("row " + std::to_string(r) + " has bits set past the last column");
    if (a.row_ptr[r + 1] - a.row_ptr[r] != count)
      throw std::invalid_argument("row " + std::to_string(r) + " stores " + std::to_string(count) +
                                  " weights by its masks, but row_ptr gives it " +
                                  std::to_string(a.row_ptr[r + 1] - a.row_ptr[r]));
  }
  if (a.row_ptr[a.rows] != a.nnz)
    throw std::invalid_argument("row_ptr[-1] = " + std::to_string(a.row_ptr[a.rows]) + " does not match nnz = " +
                                std::to_string(a.nnz));
}

void bitmap_to_csr(const BitmapView& a, void* col_idx, int index_bytes) {
  int64_t n = 0;
  for (int64_t r = 0; r < a.rows; ++r)
    for (int64_t k = 0; k < a.chunks; ++k)
      for (unsigned bits = a.masks[r * a.chunks + k]; bits; bits &= bits - 1, ++n) {
        const int64_t c = k * kBitmapChunk + __builtin_ctz(bits);
        if (index_bytes == 2) static_cast<uint16_t*>(col_idx)[n] = static_cast<uint16_t>(c);
        else static_cast<int32_t*>(col_idx)[n] = static_cast<int32_t>(c);
      }
}

void propagate_nonfinite(const BitmapView& a, const DenseArgs& d) {
  for_each_nonfinite_sample(d, a.cols, [&](float* y, const std::vector<int64_t>& bad) {
    for (int64_t r = 0; r < a.rows; ++r) {
      const uint16_t* mask = a.masks + r * a.chunks;
      for (int64_t c : bad)
        if (!((mask[c / kBitmapChunk] >> (c % kBitmapChunk)) & 1u)) {
          y[r] = std::numeric_limits<float>::quiet_NaN();
          break;
        }
    }
  });
}

}  // namespace sparsenet
