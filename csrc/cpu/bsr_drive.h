// The threading skeleton of the BSR kernels (compiled into each ISA's namespace: capability.h).
// Block rows are cut into parts holding equal numbers of stored blocks (plus a share per block row
// for its outputs), several per thread, handed out dynamically.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "cpu/bsr_view.h"
#include "cpu/capability.h"
#include "cpu/work_split.h"

namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY {

inline int64_t bsr_cost_before(const BsrView& a, int64_t block_row) { return a.block_ptr[block_row] + block_row; }

// The first block row of part p of `parts`.
inline int64_t bsr_part_start(const BsrView& a, int p, int parts) {
  return part_start(a.block_rows, p, parts, [&](int64_t block_row) { return bsr_cost_before(a, block_row); });
}

// Threads worth waking: below ~25k multiply-adds a second thread costs more than it saves (as for CSR).
inline int bsr_threads(const BsrView& a, const DenseArgs& d) {
  const int64_t work = (a.nnzb * a.r * a.c + a.rows) * d.batch;
  return (d.num_threads <= 1 || work < 24576) ? 1 : d.num_threads;
}

inline int bsr_parts(const BsrView& a, int nt) {
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(a.block_rows, 1), int64_t{nt} * 8));
}

// rows(R0, R1): block rows [R0, R1) for every batch entry.
template <typename RowsFn>
void bsr_drive(const BsrView& a, const DenseArgs& d, RowsFn rows) {
  const int nt = bsr_threads(a, d);
  if (nt == 1) {
    rows(int64_t{0}, a.block_rows);
    return;
  }
  const int parts = bsr_parts(a, nt);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int p = 0; p < parts; ++p) rows(bsr_part_start(a, p, parts), bsr_part_start(a, p + 1, parts));
}

}  // namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY
