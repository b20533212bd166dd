// The shared skeleton of the N:M small-batch kernels (compiled into each ISA's namespace:
// capability.h): every row costs the same, so rows are cut into equal parts, several per thread.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "cpu/capability.h"
#include "cpu/nm_view.h"

namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY {

// A row's slots [s, slots) for sample x, one at a time: the tail the vector loops leave.
inline float nm_row_tail(const NmView& a, const float* x, int64_t r, int64_t s) {
  const float* v = a.values + r * a.slots();
  float acc = 0.0f;
  for (; s < a.slots(); ++s) acc += v[s] * x[a.column(r, s)];
  return acc;
}

// dot(x, r) -> float: row r's output for sample x; run for every row and sample, bias added.
template <typename DotFn>
void nm_drive(const NmView& a, const DenseArgs& d, DotFn dot) {
  const int64_t work = a.rows * (a.slots() + 1) * d.batch;
  const int nt = (d.num_threads <= 1 || work < 24576) ? 1 : d.num_threads;
  const int64_t parts = std::min<int64_t>(std::max<int64_t>(a.rows, 1), int64_t{nt} * 8);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1)
  for (int64_t p = 0; p < parts; ++p)
    for (int64_t r = a.rows * p / parts; r < a.rows * (p + 1) / parts; ++r)
      for (int64_t s = 0; s < d.batch; ++s)
        d.y[s * d.ldy + r] = dot(d.x + s * d.ldx, r) + (d.bias ? d.bias[r] : 0.0f);
}

// An ISA's vector row kernels where M = 2N (dot2 for 2-bit indices, dot4 for 4-bit), slot by slot
// for other patterns.
template <typename Dot2, typename Dot4>
void nm_run(const NmView& a, const DenseArgs& d, Dot2 dot2, Dot4 dot4) {
  if (a.m != 2 * a.n) nm_drive(a, d, [&](const float* x, int64_t r) { return nm_row_tail(a, x, r, 0); });
  else if (a.bits == 2) nm_drive(a, d, dot2);
  else nm_drive(a, d, dot4);
}

}  // namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY
