// Finding Inf and NaN in x, for every format's propagate_nonfinite (dense semantics: a pruned, zero
// weight times a non-finite x is NaN, which a sparse kernel never computes).
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/csr_view.h"  // DenseArgs

namespace sparsenet {

// Whether x[0, n) holds an Inf or NaN: one branch-free (vectorised) pass.
bool any_nonfinite(const float* x, int64_t n);

// Whether any of `rows` rows of `cols` floats, `ld` apart, holds an Inf or NaN; big inputs are
// scanned by up to `threads` threads, since a serial scan of a large batch of rows cost as much as
// the multiply that came before it.
bool any_nonfinite_rows(const float* x, int64_t rows, int64_t cols, int64_t ld, int threads);

// The columns of x[0, n) that hold Inf or NaN, ascending; a finite row costs one any_nonfinite pass.
void nonfinite_columns(const float* x, int64_t n, std::vector<int64_t>* out);

// Records in d.x_check (if any) that a kernel loaded and checked every value of x, and whether one
// was Inf or NaN. (Out of line, in a file without ISA flags: capability.h.)
void record_x_check(const DenseArgs& d, bool nonfinite);

// Calls fn(y_row, columns) for each sample of d whose x row holds a non-finite value, with that
// sample's output row and the columns of x it is non-finite in. Nothing else is visited, so the
// common all-finite call costs one vectorised (and, when large, threaded) scan of x, or none where
// the kernel recorded in d.x_check that it found x finite.
template <typename Fn>
void for_each_nonfinite_sample(const DenseArgs& d, int64_t cols, Fn&& fn) {
  if (d.x_check && d.x_check->checked.load(std::memory_order_relaxed)) {
    if (!d.x_check->nonfinite.load(std::memory_order_relaxed)) return;  // the kernel saw all of x finite
  } else if (!any_nonfinite_rows(d.x, d.batch, cols, d.ldx, d.num_threads)) {
    return;
  }
  std::vector<int64_t> bad;
  for (int64_t m = 0; m < d.batch; ++m) {
    nonfinite_columns(d.x + m * d.ldx, cols, &bad);
    if (!bad.empty()) fn(d.y + m * d.ldy, bad);
  }
}

}  // namespace sparsenet
