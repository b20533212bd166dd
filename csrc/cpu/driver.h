// The threading skeleton every kernel family shares (each ISA file compiles its own copy, with its
// own flags, into its own namespace: capability.h).
//
// Work is cut into chunks of rows holding equal numbers of non-zeros (a row is never split), several
// per thread, handed out dynamically: on a shared machine a thread that loses its core for a while
// does not hold up the others, which take over its remaining chunks.
#pragma once
#include <omp.h>

#include <algorithm>

#include "cpu/csr_view.h"
#include "cpu/nonfinite.h"
#include "cpu/panel.h"
#include "cpu/work_split.h"

namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY {

constexpr int kChunksPerThread = 8;

// small(r0, r1): rows [r0, r1) for all batch entries, reading x directly.
// panel(xp, W, r0, r1, b0, valid): rows [r0, r1) for batch entries [b0, b0 + valid) from a panel
// of width W (a multiple of `vec`, the kernel's vector width in floats, at most `max_width`).
// pack: the x -> panel transpose (pack_panel or a SIMD version of it).
template <typename SmallFn, typename PanelFn, typename PackFn = decltype(&pack_panel)>
void drive(const sparsenet::CsrView& a, const sparsenet::DenseArgs& d, int64_t vec, int64_t max_width,
           bool use_panel, SmallFn small, PanelFn panel, PackFn pack = &pack_panel) {
  const int nt = threads_for(a, d.batch, d.num_threads);
  const int chunks = static_cast<int>(std::min<int64_t>(std::max<int64_t>(a.rows, 1), int64_t{nt} * kChunksPerThread));
  if (!use_panel) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int c = 0; c < chunks; ++c) {
      int64_t r0, r1;
      balanced_rows(a, c, chunks, &r0, &r1);
      small(r0, r1);
    }
    return;
  }
  float* xp = scratch_panel(a.cols * max_width);
  const int64_t kblocks = std::max<int64_t>(1, std::min<int64_t>(int64_t{nt} * kChunksPerThread, a.cols / 64));
  bool nonfinite = false;
#pragma omp parallel num_threads(nt) reduction(|| : nonfinite)
  {
    for (int64_t b0 = 0; b0 < d.batch; b0 += max_width) {
      const int64_t valid = std::min(max_width, d.batch - b0);
      const int64_t W = (valid + vec - 1) / vec * vec;
#pragma omp for schedule(dynamic, 1)
      for (int64_t kb = 0; kb < kblocks; ++kb)
        nonfinite |= pack(d.x, d.ldx, b0, valid, W, a.cols * kb / kblocks, a.cols * (kb + 1) / kblocks, xp);
      // (implicit barrier: the panel is complete)
#pragma omp for schedule(dynamic, 1)
      for (int c = 0; c < chunks; ++c) {
        int64_t r0, r1;
        balanced_rows(a, c, chunks, &r0, &r1);
        panel(xp, W, r0, r1, b0, valid);
      }
      // (implicit barrier: nobody overwrites the panel while it is read)
    }
  }
  record_x_check(d, nonfinite);
}

}  // namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY
