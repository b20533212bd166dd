// Shared helpers for the SIMD kernels: the per-thread scratch panel and the x -> panel transpose.
//
// For batch >= plan::kPanelMinBatch the kernels vectorise along the batch: a tile of up to W (32 or 64)
// input rows is transposed into a panel xp[k][W] (W floats per input feature, zero padded), so each
// non-zero w(r, k) becomes one broadcast and W/vector-width FMAs on a contiguous slice of the panel.
// The panel (K * W * 4 bytes; 512 KiB for K = 4096) stays in L2 while every row of the weight streams
// past it once per tile.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#include "cpu/capability.h"
#include "cpu/planner.h"

namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY {

// How far ahead (in non-zeros) the kernels prefetch the weight's value and index streams: they come
// from DRAM, and the hardware prefetcher does not ramp up that far within one row.
#ifndef SPARSENET_PREFETCH_AHEAD
#define SPARSENET_PREFETCH_AHEAD 512
#endif
constexpr int64_t kPrefetchAhead = SPARSENET_PREFETCH_AHEAD;

// N consecutive column indices (or offsets) read as 64-bit words, index l taken out by a shift and a
// mask: one load per 8 / sizeof(Idx) indices, where a load each competed with the loop's vector loads
// for the load ports (the loops that use it are bound by their loads). l must fold to a constant.
// The AVX2 panel loops use it (LaneIndices), as measured on AMD Zen 3, whose integer ALUs are apart
// from its FP pipes (on Intel cores the shifts share port 0 with the FMAs, never measured there);
// the small-batch gathers of every ISA use it for 16-bit indices (gemv_simd.h).
template <typename Idx, int N>
struct WordIndices {
  static_assert(sizeof(Idx) <= 4 && (N * sizeof(Idx)) % 8 == 0, "whole 64-bit words of indices");
  static constexpr int kPerWord = 8 / sizeof(Idx);
  uint64_t words[N / kPerWord];
  explicit WordIndices(const Idx* p) { std::memcpy(words, p, sizeof words); }
  int64_t operator[](int l) const {
    constexpr uint64_t mask = (uint64_t{1} << (8 * sizeof(Idx))) - 1;
    return static_cast<int64_t>((words[l / kPerWord] >> (8 * sizeof(Idx) * (l % kPerWord))) & mask);
  }
};

// The same interface over the indices in memory, one load each.
template <typename Idx>
struct LoadedIndices {
  const Idx* p;
  explicit LoadedIndices(const Idx* first) : p(first) {}
  int64_t operator[](int l) const { return static_cast<int64_t>(p[l]); }
};

// The indices a loop over N lanes of Ops's vectors reads (see WordIndices).
template <typename Ops, typename Idx, int N>
using LaneIndices = std::conditional_t<Ops::kWidth == 8, WordIndices<Idx, N>, LoadedIndices<Idx>>;

// Grows, never shrinks; one per calling thread so concurrent calls from different Python threads
// never share a panel.
inline float* scratch_panel(int64_t floats) {
  struct Buffer {
    float* data = nullptr;
    int64_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buf;
  if (buf.size < floats) {
    std::free(buf.data);
    const size_t bytes = ((static_cast<size_t>(floats) * sizeof(float) + 63) / 64) * 64;
    buf.data = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!buf.data) {
      buf.size = 0;
      throw std::bad_alloc();
    }
    buf.size = floats;
  }
  return buf.data;
}

// xp[k * W + j] = x[(b0 + j) * ldx + k] for k in [k0, k1), j < valid; zero for valid <= j < W.
// Returns whether one of the values copied is Inf or NaN (DenseArgs::x_check).
inline bool pack_panel(const float* x, int64_t ldx, int64_t b0, int64_t valid, int64_t W, int64_t k0,
                       int64_t k1, float* xp) {
  constexpr int64_t kBlock = 64;
  float seen = 0.f;  // v - v: 0 for a finite v, NaN otherwise; a NaN stays
  for (int64_t kb = k0; kb < k1; kb += kBlock) {
    const int64_t ke = std::min(k1, kb + kBlock);
    for (int64_t j = 0; j < valid; ++j) {
      const float* src = x + (b0 + j) * ldx;
      for (int64_t k = kb; k < ke; ++k) {
        xp[k * W + j] = src[k];
        seen += src[k] - src[k];
      }
    }
    for (int64_t j = valid; j < W; ++j)
      for (int64_t k = kb; k < ke; ++k) xp[k * W + j] = 0.f;
  }
  return seen != seen;
}

// Writes a block of up to 8 output rows x `valid` batch entries from the row-major scratch tile
// t[row][W] into y (batch-major, ldy apart), adding the bias.
inline void store_tile(const float* t, int64_t W, int64_t nrows, int64_t valid, int64_t r0,
                       int64_t b0, float* y, int64_t ldy, const float* bias) {
  for (int64_t j = 0; j < valid; ++j) {
    float* dst = y + (b0 + j) * ldy + r0;
    for (int64_t i = 0; i < nrows; ++i) dst[i] = t[i * W + j] + (bias ? bias[r0 + i] : 0.f);
  }
}

}  // namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY
