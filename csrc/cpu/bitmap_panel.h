// The bitmap batch-panel kernel, written once for any vector width: x transposed into panels of
// W = kWidth * NV inputs (team_panels), then one broadcast and NV FMAs per stored weight. Include
// only from ISA-flagged files, after simd_ops.h; each gets its own copy in its own namespace
// (capability.h).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/bitmap_drive.h"
#include "cpu/simd_tile.h"

namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY {

// Rows [r0, r1) for the W inputs of panel xp (W floats per column), written to y through a tile of 8
// rows. A row's set bits are walked two at a time into two accumulator sets, so that consecutive
// FMAs do not wait on each other.
template <typename Ops, int NV>
void bitmap_panel_rows(const BitmapView& a, const float* xp, int64_t r0, int64_t r1, int64_t b0, int64_t valid,
                       const DenseArgs& d) {
  using V = typename Ops::V;
  constexpr int64_t kW = Ops::kWidth, W = kW * NV;
  alignas(64) float tile[8 * W];
  for (int64_t rb = r0; rb < r1; rb += 8) {
    const int64_t nrows = std::min<int64_t>(8, r1 - rb);
    for (int64_t i = 0; i < nrows; ++i) {
      const int64_t r = rb + i;
      const uint16_t* mask = a.masks + r * a.chunks;
      const float* v = a.values + a.row_ptr[r];
      V acc0[NV], acc1[NV];
#pragma GCC unroll 4
      for (int n = 0; n < NV; ++n) acc0[n] = acc1[n] = Ops::zero();
      // Walked four chunks (64 columns) per mask word: a loop that ended with every chunk's last
      // bit mispredicted its exit about once per 8 weights at 50% density.
      const auto walk = [&](uint64_t bits, const float* base) {
        while (bits) {
          const float* p0 = base + __builtin_ctzll(bits) * W;
          const V w0 = Ops::set1(*v++);
          bits &= bits - 1;
#pragma GCC unroll 4
          for (int n = 0; n < NV; ++n) acc0[n] = Ops::fma(w0, Ops::load(p0 + kW * n), acc0[n]);
          if (!bits) break;
          const float* p1 = base + __builtin_ctzll(bits) * W;
          const V w1 = Ops::set1(*v++);
          bits &= bits - 1;
#pragma GCC unroll 4
          for (int n = 0; n < NV; ++n) acc1[n] = Ops::fma(w1, Ops::load(p1 + kW * n), acc1[n]);
        }
      };
      int64_t k = 0;
      for (; k + 4 <= a.chunks; k += 4) {
        uint64_t word;
        std::memcpy(&word, mask + k, sizeof word);
        walk(word, xp + k * kBitmapChunk * W);
      }
      for (; k < a.chunks; ++k) walk(mask[k], xp + k * kBitmapChunk * W);
#pragma GCC unroll 4
      for (int n = 0; n < NV; ++n) Ops::store(tile + i * W + kW * n, Ops::add(acc0[n], acc1[n]));
    }
    store_tile_simd(tile, W, nrows, valid, rb, b0, d.y, d.ldy, d.bias);
  }
}

// The whole batch in panels of W inputs, rows shared out in parts of equal cost.
template <typename Ops, int NV>
void bitmap_panel_matmul(const BitmapView& a, const DenseArgs& d) {
  const int nt = bitmap_threads(a, d);
  const int parts = static_cast<int>(std::min<int64_t>(std::max<int64_t>(a.rows, 1), int64_t{nt} * 8));
  team_panels(d, a.cols, Ops::kWidth * NV, nt, parts, [&](const float* xp, int p, int64_t b0, int64_t valid) {
    bitmap_panel_rows<Ops, NV>(a, xp, bitmap_part_start(a, p, parts), bitmap_part_start(a, p + 1, parts), b0, valid,
                               d);
  });
}

}  // namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY
