#include "cpu/nonfinite.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace sparsenet {

bool any_nonfinite(const float* x, int64_t n) {
  uint32_t any = 0;
  for (int64_t k = 0; k < n; ++k) {  // branch-free, so it vectorises: the common case finds nothing
    uint32_t bits;
    std::memcpy(&bits, x + k, 4);
    any |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
  }
  return any != 0;
}

bool any_nonfinite_rows(const float* x, int64_t rows, int64_t cols, int64_t ld, int threads) {
  if (rows <= 0 || cols <= 0) return false;
  if (ld == cols) {  // one contiguous range: scanned in equal pieces whatever the row count
    cols *= rows;
    rows = 1;
  }
  // Below a few hundred KB a second thread costs more to wake than it saves.
  constexpr int64_t kFloatsPerThread = int64_t{1} << 16;
  const int64_t total = rows * cols;
  const int64_t pieces = std::max<int64_t>(1, std::min<int64_t>(threads, total / kFloatsPerThread));
  int any = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(static_cast<int>(pieces)) reduction(| : any) schedule(static, 1)
#endif
  for (int64_t p = 0; p < pieces; ++p) {
    const int64_t begin = total * p / pieces, end = total * (p + 1) / pieces;  // in floats of the rows
    for (int64_t k = begin; k < end;) {
      const int64_t r = k / cols, c = k % cols, n = std::min(cols - c, end - k);
      any |= static_cast<int>(any_nonfinite(x + r * ld + c, n));
      k += n;
    }
  }
  return any != 0;
}

void record_x_check(const DenseArgs& d, bool nonfinite) {
  if (!d.x_check) return;
  d.x_check->nonfinite.store(nonfinite, std::memory_order_relaxed);
  d.x_check->checked.store(true, std::memory_order_relaxed);
}

void nonfinite_columns(const float* x, int64_t n, std::vector<int64_t>* out) {
  out->clear();
  if (!any_nonfinite(x, n)) return;
  for (int64_t k = 0; k < n; ++k)
    if (!(std::abs(x[k]) <= std::numeric_limits<float>::max())) out->push_back(k);
}

}  // namespace sparsenet
