// The BSR kernels, written once against the vector traits of simd_ops.h (Ops256, Ops512). Include
// only from ISA-flagged files; each gets its own copy in its own namespace (capability.h).
//
// Below plan::kBsrPanelMinBatch samples each sample runs on its own:
// * blocks at least 2 wide: the rows of a block row, up to kMaxRows at once, are dot products over
//   the stored blocks' columns, a vector at a time (the last one masked), so every block is read
//   once, front to back, for all its rows;
// * blocks 1 wide (k x 1): a block is k outputs of one column, one broadcast of x and ceil(k / width)
//   FMAs.
// From there x is transposed into a panel (W samples per column) and each stored weight becomes one
// broadcast and W / width FMAs into a register tile of up to 16 rows x W samples: a block of r rows
// reuses every panel vector it loads r times (up to 16), as a dense micro-kernel does.
// AVX2, blocks 16k high and at least 8 wide, every batch: direct tiles (bsr_direct_matmul), the
// weights (a block-transposed copy) as the vector operand and x broadcast in place.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "cpu/bsr_drive.h"
#include "cpu/nonfinite.h"
#include "cpu/panel.h"
#include "cpu/planner.h"
#include "cpu/simd_tile.h"

namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY {

// Rows [i, i + NR) of block row R (block-relative) against sample x: their sums into out.
template <typename Ops, int NR>
inline void bsr_dot_rows(const BsrView& a, const float* x, int64_t R, int64_t i, float* out) {
  using V = typename Ops::V;
  constexpr int64_t kW = Ops::kWidth;
  V acc[NR];
#pragma GCC unroll 16
  for (int k = 0; k < NR; ++k) acc[k] = Ops::zero();
  const int64_t block = a.r * a.c;
  for (int64_t b = a.block_ptr[R]; b < a.block_ptr[R + 1]; ++b) {
    const int64_t j0 = int64_t{a.block_cols[b]} * a.c, nc = std::min(a.c, a.cols - j0);
    const float* v = a.values + b * block + i * a.c;
    _mm_prefetch(reinterpret_cast<const char*>(v + kPrefetchAhead), _MM_HINT_T0);
    int64_t j = 0;
    for (; j + kW <= nc; j += kW) {
      const V xv = Ops::loadu(x + j0 + j);
#pragma GCC unroll 16
      for (int k = 0; k < NR; ++k) acc[k] = Ops::fma(Ops::loadu(v + k * a.c + j), xv, acc[k]);
    }
    if (j < nc) {
      const V xv = Ops::load_first(x + j0 + j, nc - j);
#pragma GCC unroll 16
      for (int k = 0; k < NR; ++k) acc[k] = Ops::fma(Ops::load_first(v + k * a.c + j, nc - j), xv, acc[k]);
    }
  }
#pragma GCC unroll 16
  for (int k = 0; k < NR; ++k) out[k] = Ops::sum(acc[k]);
}

// Block row R for sample x into y (its first output at y[R * r]), blocks at least 2 wide.
template <typename Ops>
inline void bsr_row_dots(const BsrView& a, const float* x, float* y, const float* bias, int64_t R) {
  constexpr int kMaxRows = Ops::kWidth == 16 ? 16 : 8;  // accumulators that fit the register file
  const int64_t i0 = R * a.r, nr = std::min(a.r, a.rows - i0);
  float sums[kMaxRows];
  for (int64_t i = 0; i < nr;) {
    const int64_t left = nr - i;
    int n;
    if (left >= kMaxRows) { bsr_dot_rows<Ops, kMaxRows>(a, x, R, i, sums); n = kMaxRows; }
    else if (left >= 8) { bsr_dot_rows<Ops, 8>(a, x, R, i, sums); n = 8; }
    else if (left >= 4) { bsr_dot_rows<Ops, 4>(a, x, R, i, sums); n = 4; }
    else if (left >= 2) { bsr_dot_rows<Ops, 2>(a, x, R, i, sums); n = 2; }
    else { bsr_dot_rows<Ops, 1>(a, x, R, i, sums); n = 1; }
    for (int k = 0; k < n; ++k) y[i0 + i + k] = sums[k] + (bias ? bias[i0 + i + k] : 0.0f);
    i += n;
  }
}

// Block row R for sample x, blocks 1 wide: NQ vectors of outputs (r <= NQ * width).
template <typename Ops, int NQ>
inline void bsr_row_columns(const BsrView& a, const float* x, float* y, const float* bias, int64_t R) {
  using V = typename Ops::V;
  constexpr int64_t kW = Ops::kWidth;
  V acc[NQ];
#pragma GCC unroll 8
  for (int q = 0; q < NQ; ++q) acc[q] = Ops::zero();
  const int64_t full = a.r / kW;  // whole vectors of the block's r values
  for (int64_t b = a.block_ptr[R]; b < a.block_ptr[R + 1]; ++b) {
    const float* v = a.values + b * a.r;
    const typename Ops::V xv = Ops::set1(x[a.block_cols[b]]);
#pragma GCC unroll 8
    for (int q = 0; q < NQ; ++q)
      acc[q] = Ops::fma(q < full ? Ops::loadu(v + q * kW) : Ops::load_first(v + q * kW, a.r - q * kW), xv, acc[q]);
  }
  const int64_t i0 = R * a.r, nr = std::min(a.r, a.rows - i0);
  alignas(64) float out[NQ * kW];
#pragma GCC unroll 8
  for (int q = 0; q < NQ; ++q) Ops::store(out + q * kW, acc[q]);
  for (int64_t i = 0; i < nr; ++i) y[i0 + i] = out[i] + (bias ? bias[i0 + i] : 0.0f);
}

template <typename Ops>
void bsr_small_batch(const BsrView& a, const DenseArgs& d) {
  constexpr int64_t kW = Ops::kWidth;
  const int64_t nq = (a.r + kW - 1) / kW;
  // Block row by block row, each for every sample in turn: the block row's weights then come from
  // DRAM once and from cache for the other samples (sample by sample over all block rows, each sample
  // streamed the whole weight again).
  bsr_drive(a, d, [&](int64_t R0, int64_t R1) {
    for (int64_t R = R0; R < R1; ++R)
      for (int64_t m = 0; m < d.batch; ++m) {
        const float* x = d.x + m * d.ldx;
        float* y = d.y + m * d.ldy;
        if (a.c > 1) bsr_row_dots<Ops>(a, x, y, d.bias, R);
        else if (nq == 1) bsr_row_columns<Ops, 1>(a, x, y, d.bias, R);
        else if (nq == 2) bsr_row_columns<Ops, 2>(a, x, y, d.bias, R);
        else if (nq <= 4) bsr_row_columns<Ops, 4>(a, x, y, d.bias, R);
        else bsr_row_columns<Ops, kBsrMaxBlock / kW>(a, x, y, d.bias, R);
      }
  });
}

// ---- batch panels ---------------------------------------------------------------------------------

// Rows [g, g + NR) of block row R (block-relative) for the W = width * NV samples of panel xp,
// through a tile into y.
template <typename Ops, int NR, int NV>
inline void bsr_panel_rows(const BsrView& a, const float* xp, int64_t R, int64_t g, int64_t b0, int64_t valid,
                           const DenseArgs& d) {
  using V = typename Ops::V;
  constexpr int64_t kW = Ops::kWidth, W = kW * NV;
  V acc[NR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) acc[i][n] = Ops::zero();
  const int64_t block = a.r * a.c;
  for (int64_t b = a.block_ptr[R]; b < a.block_ptr[R + 1]; ++b) {
    const int64_t j0 = int64_t{a.block_cols[b]} * a.c, nc = std::min(a.c, a.cols - j0);
    const float* v = a.values + b * block + g * a.c;
    _mm_prefetch(reinterpret_cast<const char*>(v + block), _MM_HINT_T0);
    for (int64_t j = 0; j < nc; ++j) {
      const float* p = xp + (j0 + j) * W;
      V pv[NV];
#pragma GCC unroll 4
      for (int n = 0; n < NV; ++n) pv[n] = Ops::load(p + n * kW);
      // Fully unrolled, so that the accumulators have constant indices and stay in registers.
#pragma GCC unroll 16
      for (int i = 0; i < NR; ++i) {
        const V w = Ops::set1(v[i * a.c + j]);
#pragma GCC unroll 4
        for (int n = 0; n < NV; ++n) acc[i][n] = Ops::fma(w, pv[n], acc[i][n]);
      }
    }
  }
  alignas(64) float tile[NR * W];
#pragma GCC unroll 16
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) Ops::store(tile + i * W + n * kW, acc[i][n]);
  for (int i = 0; i < NR; i += 8)  // the tile store transposes 8 rows at a time
    store_tile_simd(tile + i * W, W, std::min(8, NR - i), valid, R * a.r + g + i, b0, d.y, d.ldy, d.bias);
}

// Rows of a register tile: its rows x NV accumulators, the NV panel vectors of a column and one
// broadcast weight within the register file (AVX-512's 32 vectors: 16 x 1, 8 x 2; AVX2's 16:
// 8 x 1, 6 x 2).
template <typename Ops, int NV>
constexpr int bsr_tile_rows() {
  if constexpr (Ops::kWidth == 16) return NV == 1 ? 16 : 8;
  else return NV == 1 ? 8 : 6;
}

// Block row R in groups of up to bsr_tile_rows rows: a group walks the block row's blocks once, so
// the more rows it holds the fewer times each panel vector is loaded.
template <typename Ops, int NV>
inline void bsr_panel_block_row(const BsrView& a, const float* xp, int64_t R, int64_t b0, int64_t valid,
                                const DenseArgs& d) {
  constexpr int kGroup = bsr_tile_rows<Ops, NV>();
  const int64_t nr = std::min(a.r, a.rows - R * a.r);
  for (int64_t g = 0; g < nr; g += kGroup)
    with_count<1, kGroup>(std::min<int64_t>(kGroup, nr - g),
                          [&](auto n) { bsr_panel_rows<Ops, n(), NV>(a, xp, R, g, b0, valid, d); });
}

// Panels of W = width * NV samples. With many panels' worth of samples, each thread takes whole
// panels (packs its own, runs every block row on it): equal work per panel and no barrier, where
// sharing out block rows left threads waiting at every panel (a few dozen block rows of uneven
// block counts). With few, the team packs each panel together and shares out its block rows.
template <typename Ops, int NV>
void bsr_panel_matmul(const BsrView& a, const DenseArgs& d) {
  constexpr int64_t W = Ops::kWidth * NV;
  const int nt = bsr_threads(a, d);
  const int64_t panels = (d.batch + W - 1) / W;
  if (nt > 1 && panels >= int64_t{plan::kBsrPanelsPerThread} * nt) {
    bool nonfinite = false;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) reduction(|| : nonfinite)
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t b0 = p * W, valid = std::min(W, d.batch - b0);
      float* xp = scratch_panel(a.cols * W);  // this thread's own
      nonfinite |= pack_panel_simd(d.x, d.ldx, b0, valid, W, 0, a.cols, xp);
      for (int64_t R = 0; R < a.block_rows; ++R) bsr_panel_block_row<Ops, NV>(a, xp, R, b0, valid, d);
    }
    record_x_check(d, nonfinite);
    return;
  }
  const int parts = bsr_parts(a, nt);
  team_panels(d, a.cols, W, nt, parts, [&](const float* xp, int p, int64_t b0, int64_t valid) {
    for (int64_t R = bsr_part_start(a, p, parts); R < bsr_part_start(a, p + 1, parts); ++R)
      bsr_panel_block_row<Ops, NV>(a, xp, R, b0, valid, d);
  });
}

// ---- direct tiles: the weights as the vector operand ------------------------------------------------

// Samples of a direct tile: 6 rows x 2 vectors of outputs, one broadcast of x a row and 2 weight
// vectors a column within AVX2's 16 registers (the sgemm shape). Only that shape is tuned (planner).
template <typename Ops, int NV>
constexpr int bsr_direct_samples() {
  static_assert(Ops::kWidth == 8 && NV == 2, "direct BSR tiles are measured on AVX2's 6 x 2 only");
  return 6;
}

// Samples [m0, m0 + MR) against slice s (rows [s * S, s * S + S) of every block) of block row R,
// from the block-transposed copy a.values_t: y's rows get the slice's outputs (+ bias) directly.
// x's lines for a block are asked for plan::kBsrDirectAhead blocks ahead (a block's 16 columns are
// one line of each of MR rows, wherever its block column falls: no hardware prefetcher follows
// that), running on into the first blocks of the next tile's `next` samples.
template <typename Ops, int MR, int NV>
inline void bsr_direct_tile(const BsrView& a, const DenseArgs& d, int64_t m0, int64_t next, int64_t R, int64_t s) {
  using V = typename Ops::V;
  constexpr int64_t kW = Ops::kWidth, S = kW * NV, kAhead = plan::kBsrDirectAhead;
  const int64_t i0 = R * a.r + s * S, nr = std::min(S, a.rows - i0);
  V acc[MR][NV];
  {
    V bias[NV];
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) bias[n] = d.bias ? Ops::load_first(d.bias + i0 + n * kW, nr - n * kW) : Ops::zero();
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int n = 0; n < NV; ++n) acc[i][n] = bias[n];
  }
  const int64_t block = a.r * a.c, ldx = d.ldx, b0 = a.block_ptr[R], b1 = a.block_ptr[R + 1];
  const float* x = d.x + m0 * ldx;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t j0 = int64_t{a.block_cols[b]} * a.c, nc = std::min(a.c, a.cols - j0);
    const float* w = a.values_t + b * block + s * S * a.c;
    const float* xb = x + j0;
    if (b + kAhead < b1) {
      const float* xa = x + int64_t{a.block_cols[b + kAhead]} * a.c;
#pragma GCC unroll 32
      for (int i = 0; i < MR; ++i) _mm_prefetch(reinterpret_cast<const char*>(xa + i * ldx), _MM_HINT_T0);
    } else if (b0 + (b + kAhead - b1) < b1) {
      const float* xa = x + MR * ldx + int64_t{a.block_cols[b0 + (b + kAhead - b1)]} * a.c;
      for (int64_t i = 0; i < next; ++i) _mm_prefetch(reinterpret_cast<const char*>(xa + i * ldx), _MM_HINT_T0);
    }
    for (int64_t j = 0; j < nc; ++j) {
      V wv[NV];
#pragma GCC unroll 4
      for (int n = 0; n < NV; ++n) wv[n] = Ops::load(w + j * S + n * kW);
      // Fully unrolled, so that the accumulators have constant indices and stay in registers.
#pragma GCC unroll 32
      for (int i = 0; i < MR; ++i) {
        const V xv = Ops::set1(xb[i * ldx + j]);
#pragma GCC unroll 4
        for (int n = 0; n < NV; ++n) acc[i][n] = Ops::fma(wv[n], xv, acc[i][n]);
      }
    }
  }
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i) {
    float* y = d.y + (m0 + i) * d.ldy + i0;
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) {
      if (nr >= (n + 1) * kW) Ops::storeu(y + n * kW, acc[i][n]);
      else Ops::store_first(y + n * kW, acc[i][n], nr - n * kW);
    }
  }
}

// Samples [m0, m1) against block rows [R0, R1): a block row's slice of weights is read from L1 by
// all the tiles in turn.
template <typename Ops, int NV>
inline void bsr_direct_rows(const BsrView& a, const DenseArgs& d, int64_t m0, int64_t m1, int64_t R0, int64_t R1) {
  constexpr int MR = bsr_direct_samples<Ops, NV>();
  constexpr int64_t S = Ops::kWidth * NV;
  for (int64_t R = R0; R < R1; ++R)
    for (int64_t s = 0; s * S < a.r && R * a.r + s * S < a.rows; ++s)
      for (int64_t m = m0; m < m1; m += MR) {
        const int64_t next = std::clamp<int64_t>(m1 - m - MR, 0, MR);
        with_count<1, MR>(std::min<int64_t>(MR, m1 - m),
                          [&](auto n) { bsr_direct_tile<Ops, n(), NV>(a, d, m, next, R, s); });
      }
}

// Whether samples [m0, m1) of x hold an Inf or NaN (nonfinite.h's scan, on this thread): it reads
// them front to back, row after row, so they are also in this core's L2 ahead of the tiles (whose
// broadcasts hop from row to row and block to block, beyond any hardware prefetcher), and
// propagate_nonfinite is spared its own pass over x.
inline bool samples_nonfinite(const DenseArgs& d, int64_t cols, int64_t m0, int64_t m1) {
  return any_nonfinite_rows(d.x + m0 * d.ldx, m1 - m0, cols, d.ldx, 1);
}

// y = A x over the block-transposed copy (a.slice == width * NV), x read in place. Samples run in
// groups whose x rows fill about plan::kBsrDirectSlabBytes (L2; more where the weights pass from
// DRAM each time: planner); a group meets every block row in turn, once each thread that works on it
// has read its rows through (samples_nonfinite). With many groups' worth of samples each thread
// takes whole groups; with few, the team shares out each group's block rows.
template <typename Ops, int NV>
void bsr_direct_matmul(const BsrView& a, const DenseArgs& d) {
  constexpr int64_t MR = bsr_direct_samples<Ops, NV>();
  const bool big = a.nnzb * a.r * a.c * int64_t{sizeof(float)} > plan::kBsrDirectBigWeightBytes;
  const int64_t slab = big ? plan::kBsrDirectBigSlabBytes : plan::kBsrDirectSlabBytes;
  const int64_t fit = slab / (std::max<int64_t>(a.cols, 1) * 4);
  const int64_t group = std::max<int64_t>(MR, fit / MR * MR);
  const int64_t groups = (d.batch + group - 1) / group;
  const int nt = bsr_threads(a, d);
  bool nonfinite = false;
  if (nt == 1 || groups >= int64_t{plan::kBsrPanelsPerThread} * nt) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) reduction(|| : nonfinite) if (nt > 1)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t m0 = g * group, m1 = std::min(d.batch, m0 + group);
      nonfinite |= samples_nonfinite(d, a.cols, m0, m1);
      bsr_direct_rows<Ops, NV>(a, d, m0, m1, 0, a.block_rows);
    }
  } else {
    const int parts = bsr_parts(a, nt);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t m0 = g * group, m1 = std::min(d.batch, m0 + group);
#pragma omp parallel num_threads(nt) reduction(|| : nonfinite)
      {
        nonfinite |= samples_nonfinite(d, a.cols, m0, m1);  // (each thread: into its own L2)
#pragma omp for schedule(dynamic, 1)
        for (int p = 0; p < parts; ++p)
          bsr_direct_rows<Ops, NV>(a, d, m0, m1, bsr_part_start(a, p, parts), bsr_part_start(a, p + 1, parts));
      }
    }
  }
  record_x_check(d, nonfinite);
}

}  // namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY
