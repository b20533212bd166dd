// How the kernels split a CSR weight's work between threads: shared by every kernel family, and
// compiled into each one's own namespace (see capability.h).
#pragma once
#include <cstdint>
#include <type_traits>

#include "cpu/capability.h"
#include "cpu/csr_view.h"

namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY {

// f(std::integral_constant<int, n>{}) for n in [kLow, kHigh] (kHigh for anything above): a count
// known at run time (a batch, a block's rows) as a constant, so that a kernel keeps its
// accumulators in registers.
template <int kLow, int kHigh, typename F>
inline void with_count(int64_t n, F f) {
  if constexpr (kLow == kHigh) {
    f(std::integral_constant<int, kLow>{});
  } else {
    if (n == kLow) f(std::integral_constant<int, kLow>{});
    else with_count<kLow + 1, kHigh>(n, f);
  }
}

// Row range [begin, end) of part `part` out of `parts`, balanced by non-zeros (a row is never split).
inline void balanced_rows(const CsrView& a, int part, int parts, int64_t* begin, int64_t* end) {
  auto row_at = [&](int p) -> int64_t {
    if (p <= 0) return 0;
    if (p >= parts) return a.rows;
    const int64_t target = (a.nnz * p) / parts;
    // first row whose start offset is >= target
    int64_t lo = 0, hi = a.rows;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (a.row_ptr[mid] < target) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  *begin = row_at(part);
  *end = row_at(part + 1);
}

// The first of n items whose cost before it, cost_before(i) (non-decreasing, cost_before(n) the
// total), reaches part p's share when the items are cut into `parts` parts of equal cost.
template <typename CostFn>
inline int64_t part_start(int64_t n, int p, int parts, CostFn cost_before) {
  if (p <= 0) return 0;
  if (p >= parts) return n;
  const int64_t total = cost_before(n);
  const int64_t target = total / parts * p + total % parts * p / parts;
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (cost_before(mid) < target) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Fraction of entries that are non-zero (0 for an empty shape) of any format's view with rows, cols
// and nnz: kernels pick layouts by it.
template <typename View>
inline double density(const View& a) {
  const double total = static_cast<double>(a.rows) * static_cast<double>(a.cols);
  return total > 0 ? static_cast<double>(a.nnz) / total : 0.0;
}

#ifndef SPARSENET_MIN_PARALLEL_WORK
#define SPARSENET_MIN_PARALLEL_WORK 24576
#endif

// Threads worth waking for this much work: below ~10 us of single-thread work (about 25k non-zero
// multiply-adds) the fork/join costs more than the second thread saves. With a warm pool (layers
// run back to back) two threads win from there on: measured on 384x1536 / 1536x384 at 90-95%
// sparsity, batch 1 (benchmarks/speedup_table.py), against a threshold five times higher.
inline int threads_for(const CsrView& a, int64_t batch, int requested) {
  const int64_t work = (a.nnz + a.rows) * batch;
  if (requested <= 1 || work < SPARSENET_MIN_PARALLEL_WORK) return 1;
  return requested;
}

}  // namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY
