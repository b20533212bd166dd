// The panel kernel over the column-tiled copy (cpu/tiled.h), written once for any vector width.
// Include only from a file compiled with AVX2 + FMA or more, after defining the vector traits:
//   struct Ops { using V = ...; static constexpr int kWidth; zero(), load(p), set1(f),
//                fma(a, b, c), add(a, b), store(p, v) };
// Each ISA file gets its own copy, compiled with its own flags into its own namespace (capability.h).
#pragma once
#include <omp.h>

#include <algorithm>
#include <utility>

#include "cpu/csr_view.h"
#include "cpu/nonfinite.h"
#include "cpu/panel.h"
#include "cpu/panel_simd.h"
#include "cpu/simd_tile.h"
#include "cpu/tiled.h"
#include "cpu/work_split.h"

namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY {

// Chunks [c0, c1) of kRows rows (at most plan::kTiledMaxChunksPerJob), tile by tile: the panel's
// slice for a tile (kCols x W floats) is read by every row of the chunks while it is in L1; their
// sums stay in `acc` (L1 too).
template <typename Ops, int NV>
void tiled_chunks(const sparsenet::cpu::TiledCsr& t, int64_t c0, int64_t c1, const float* xp, int64_t b0,
                  int64_t valid, const sparsenet::DenseArgs& d) {
  using V = typename Ops::V;
  using sparsenet::cpu::TiledCsr;
  constexpr int64_t W = Ops::kWidth * NV, R = TiledCsr::kRows;
  alignas(64) float acc[sparsenet::cpu::plan::kTiledMaxChunksPerJob * R * W];
  const int64_t r0 = c0 * R, nr = std::min(c1 * R, t.rows) - r0;
  std::fill(acc, acc + nr * W, 0.0f);
  for (int64_t tile = 0; tile < t.tiles; ++tile) {
    const float* xt = xp + tile * TiledCsr::kCols * W;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t block = c * t.tiles + tile;
      const uint16_t* starts = &t.row_start[block * (R + 1)];
      if (starts[R] == 0) continue;
      const uint8_t* col = t.col.data() + t.block_start[block];
      const float* val = t.values.data() + t.block_start[block];
      float* chunk_acc = acc + (c - c0) * R * W;
      const uint8_t* row_of = &t.row_of[block * R];  // (rows past the last: empty shares)
      for (int64_t i = 0; i < R; ++i) {
        if (starts[i] == starts[i + 1]) continue;
        float* out = chunk_acc + row_of[i] * W;
        V sum[NV];
        for (int v = 0; v < NV; ++v) sum[v] = Ops::load(out + Ops::kWidth * v);
        panel_dot<Ops, NV>(col, val, starts[i], starts[i + 1], xt, sum);
        for (int v = 0; v < NV; ++v) Ops::store(out + Ops::kWidth * v, sum[v]);
      }
    }
  }
  for (int64_t g = 0; g < nr; g += 8)
    store_tile_simd(acc + g * W, W, std::min<int64_t>(8, nr - g), valid, r0 + g, b0, d.y, d.ldy, d.bias);
}

template <typename Ops, int NV>
void tiled_chunks_any(const sparsenet::cpu::TiledCsr& t, int64_t c0, int64_t c1, const float* xp, int64_t W,
                      int64_t b0, int64_t valid, const sparsenet::DenseArgs& d) {
  if constexpr (NV > 1) {
    if (W < Ops::kWidth * NV) return tiled_chunks_any<Ops, NV - 1>(t, c0, c1, xp, W, b0, valid, d);
  }
  tiled_chunks<Ops, NV>(t, c0, c1, xp, b0, valid, d);
}

// The panel driver of driver.h, with the tiled copy's fixed 64-row chunks instead of row ranges
// balanced by non-zeros (several chunks per thread under dynamic scheduling even them out), and a
// group of panels per pass (plan::tiled_panel_group): a chunk's blocks (about 130 KB at 4096
// columns, 90% sparse) are read from DRAM once and from cache for the other panels of the group.
template <typename Ops, int MaxNV>
void run_tiled(const sparsenet::CsrView& a, const sparsenet::DenseArgs& d) {
  using sparsenet::cpu::TiledCsr;
  const TiledCsr& t = *a.tiled;
  const int64_t group = sparsenet::cpu::plan::tiled_panel_group(
      static_cast<int64_t>(t.values.size() * sizeof(float) + t.col.size()));
  const int nt = threads_for(a, d.batch, d.num_threads);
  constexpr int64_t max_width = Ops::kWidth * MaxNV;
  const int64_t panel_floats = t.tiles * TiledCsr::kCols * max_width;  // past `cols`: never read
  const int64_t panels_total = (d.batch + max_width - 1) / max_width;
  float* xp = scratch_panel(panel_floats * std::min(group, panels_total));
  const int64_t kblocks = std::max<int64_t>(1, std::min<int64_t>(int64_t{nt} * 8, a.cols / 64));
  auto width = [&](int64_t b0) {
    const int64_t valid = std::min(max_width, d.batch - b0);
    return std::pair<int64_t, int64_t>{valid, (valid + Ops::kWidth - 1) / Ops::kWidth * Ops::kWidth};
  };
  const int64_t per_job = sparsenet::cpu::plan::tiled_chunks_per_job(
      Ops::kWidth, d.batch >= max_width ? max_width : 0, t.chunks, std::min(group, panels_total), nt);
  const int64_t chunk_jobs = (t.chunks + per_job - 1) / per_job;
  bool nonfinite = false;
#pragma omp parallel num_threads(nt) reduction(|| : nonfinite)
  {
    for (int64_t g0 = 0; g0 < d.batch; g0 += group * max_width) {
      const int64_t panels = std::min(group, (d.batch - g0 + max_width - 1) / max_width);
#pragma omp for schedule(dynamic, 1)
      for (int64_t job = 0; job < panels * kblocks; ++job) {
        const int64_t p = job / kblocks, kb = job % kblocks, b0 = g0 + p * max_width;
        const auto [valid, W] = width(b0);
        nonfinite |= pack_panel_simd(d.x, d.ldx, b0, valid, W, a.cols * kb / kblocks, a.cols * (kb + 1) / kblocks,
                                     xp + p * panel_floats);
      }
      // (implicit barrier: the panels are complete)
      // A job is one chunk on one panel, where it had been one chunk on every panel of the group: a
      // 384-row weight has 6 chunks, and 6 jobs of a quarter group each left a thread waiting at
      // the barrier (2 threads, 384x1536 at 70%, 256 and 1,024 rows: 0.93-0.94x the time; 768x768
      // 0.97x; 4096x4096, 64 chunks, level). A chunk's blocks still come from DRAM once: the
      // thread that takes its next panel finds them in the last-level cache.
#pragma omp for schedule(dynamic, 1)
      for (int64_t job = 0; job < chunk_jobs * panels; ++job) {
        const int64_t c0 = job / panels * per_job, p = job % panels;
        const int64_t b0 = g0 + p * max_width;
        const auto [valid, W] = width(b0);
        tiled_chunks_any<Ops, MaxNV>(t, c0, std::min(c0 + per_job, t.chunks), xp + p * panel_floats, W, b0, valid,
                                     d);
      }
      // (implicit barrier: nobody overwrites the panels while they are read)
    }
  }
  record_x_check(d, nonfinite);
}

}  // namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY
