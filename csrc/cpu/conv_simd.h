// The sparse convolution kernel (see conv.h), written once against the vector traits of simd_ops.h.
// Include only from ISA-flagged files; each gets its own copy in its own namespace (capability.h).
#pragma once
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "cpu/conv.h"
#include "cpu/panel.h"
#include "cpu/planner.h"

namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY {

// Lanes [lo, hi) from p + lane, zeros elsewhere, as Ops::load_between, for a p whose whole vector
// may lie outside [begin, end) (the input's buffer) only where those lanes do. AVX2's masked load
// (vmaskmovps) was most of split_phases' time on an AMD EPYC Zen 3 (a C++ probe of one thread's
// copy at 3x3, stride 2, 64 channels of 56 x 56: 19-23 ns a vector written, 11-12 ns with plain
// loads, zeroed lanes and the tail below): inside the buffer a plain load, its other lanes zeroed,
// reads the same. (AVX-512's masked loads cost what plain ones do.)
template <typename Ops>
inline typename Ops::V load_range(const float* p, int64_t lo, int64_t hi, const float* begin, const float* end) {
  constexpr int64_t kW = Ops::kWidth;
  if (lo <= 0 && hi >= kW) return Ops::loadu(p);
  if constexpr (kW == 8) {
    const auto at = reinterpret_cast<uintptr_t>(p);
    if (at >= reinterpret_cast<uintptr_t>(begin) && at + kW * sizeof(float) <= reinterpret_cast<uintptr_t>(end))
      return Ops::keep_between(Ops::loadu(p), lo, hi);
  }
  return Ops::load_between(p, lo, hi);
}

// One input channel x (in_h x in_w) into its zero-padded phase planes at dst (see conv.h). Each
// plane row is written once, a vector at a time: loads of the lanes inside the input row
// (load_range) give zeros where it falls on padding (filling the planes with zeros first and copying over them took a third of a stride-2 layer's
// time at 90% sparsity; a memset and a memcpy call per row cost up to 5% of a stride-1 layer's).
// Only plane rows [j0, j1) of each phase are written (the rows one thread's tiles read). Returns
// `seen` with NaN lanes where an input it loaded was Inf or NaN (Ops::mark_nonfinite; conv.h).
// [x_begin, x_end): the whole input's buffer (load_range).
template <typename Ops>
inline typename Ops::V split_phases(const ConvShape& s, const DirectConv& d, const float* x, float* dst, int64_t j0,
                                    int64_t j1, typename Ops::V seen, const float* x_begin, const float* x_end) {
  using V = typename Ops::V;
  constexpr int64_t kW = Ops::kWidth;
  const int64_t plane = d.hq * d.wq, sh = s.stride_h, sw = s.stride_w;
  // Only the phases some weight column reads are written: a 1 x 1 convolution at stride 2 reads one
  // of its four, and the copy of the other three had been most of such a layer's time.
  const auto read_y = [&](int64_t phase) {
    for (int64_t ky = 0; ky < s.kernel_h; ++ky)
      if (ky * s.dil_h % sh == phase) return true;
    return false;
  };
  const auto read_x = [&](int64_t phase) {
    for (int64_t kx = 0; kx < s.kernel_w; ++kx)
      if (kx * s.dil_w % sw == phase) return true;
    return false;
  };
  for (int64_t phase_y = 0; phase_y < sh; ++phase_y) {
    if (!read_y(phase_y)) continue;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t iy = j * sh + phase_y - s.pad_h;  // the input row of plane row j, if any
      const bool padding = iy < 0 || iy >= s.in_h;
      for (int64_t phase_x = 0; phase_x < sw; ++phase_x) {
        if (!read_x(phase_x)) continue;
        float* row = dst + (phase_y * sw + phase_x) * plane + j * d.wq;
        // Plane column i holds padded column i * sw + phase_x, input column i * sw + phase_x - pad_w:
        // from at[i * sw] for i in [first, end). (at itself may lie before the row: only the lanes
        // of that range are read.)
        const int64_t first = std::min(d.wq, std::max<int64_t>(0, (s.pad_w - phase_x + sw - 1) / sw));
        const int64_t end = std::max(first, std::min(d.wq, (s.in_w + s.pad_w - phase_x + sw - 1) / sw));
        const float* at = padding ? x : x + iy * s.in_w + phase_x - s.pad_w;
        for (int64_t i = 0; i < d.wq; i += kW) {
          V v = Ops::zero();
          if (padding || end <= i || first >= i + kW) {
          } else if (sw == 1) {
            v = load_range<Ops>(at + i, first - i, end - i, x_begin, x_end);
          } else if (sw == 2) {  // plane column i + lane from the even floats of the 2 kW at at + 2i
            const int64_t lo = 2 * (first - i), hi = 2 * (end - i) - 1;  // (not the odd float past the row)
            v = Ops::even(load_range<Ops>(at + 2 * i, lo, hi, x_begin, x_end),
                          load_range<Ops>(at + 2 * i + kW, lo - kW, hi - kW, x_begin, x_end));
          } else {
            alignas(64) float lanes[kW] = {};
            for (int64_t l = std::max(first - i, int64_t{0}); l < std::min(end - i, kW); ++l)
              lanes[l] = at[(i + l) * sw];
            v = Ops::load(lanes);
          }
          seen = Ops::mark_nonfinite(seen, v);
          if (i + kW <= d.wq) {
            Ops::storeu(row + i, v);
          } else if constexpr (kW == 8) {  // (AVX2's masked store is microcoded on AMD: a copy instead)
            alignas(32) float lanes[kW];
            Ops::store(lanes, v);
            std::copy(lanes, lanes + (d.wq - i), row + i);
          } else {
            Ops::store_first(row + i, v, d.wq - i);
          }
        }
      }
    }
  }
  return seen;
}

// own[0, NV * width) += the sum over stored weights k in [begin, end) of values[k] * packed[offsets[k] + ...]
// (aligned slots). One chain of FMAs per accumulator would wait on the FMA's latency (4 cycles, with
// 1-2 issued a cycle): the weights are taken kChains at a time into kChains sets of accumulators,
// summed at the end.
// kToRegs: the sums start from zero and end in out[0, NV) instead of own (a tile whose weight is one
// block: conv_tile writes them to the output from there).
template <typename Ops, int64_t NV, bool kToRegs = false>
inline void accumulate_row(const float* values, const uint16_t* offsets, int64_t begin, int64_t end,
                           const float* packed, float* own, typename Ops::V* out = nullptr) {
  using V = typename Ops::V;
  constexpr int64_t kW = Ops::kWidth;
  constexpr int kChains = NV >= 8 ? 1 : static_cast<int>(8 / NV);  // 8 vectors in flight
  V acc[kChains][NV];
#pragma GCC unroll 8
  for (int q = 0; q < NV; ++q) acc[0][q] = kToRegs ? Ops::zero() : Ops::load(own + q * kW);
#pragma GCC unroll 8
  for (int c = 1; c < kChains; ++c)
#pragma GCC unroll 8
    for (int q = 0; q < NV; ++q) acc[c][q] = Ops::zero();
  int64_t k = begin;
  // A vector's worth of weights at a time, each spread to every lane by Ops::weight (a broadcast from
  // memory per weight is a load beside the slot's NV). AVX-512: one load and a permute per lane,
  // 0.95-0.98x the time. AVX2, whose 16 registers hold 8 accumulators and could not also keep 8
  // permute indices: two 128-bit broadcasts and a shuffle by immediate per lane (ab_conv.py, AMD
  // EPYC Zen 3, two runs: medians 0.92 at 70%, 0.96-0.99 at 90%; an earlier try of the same idea
  // had made expanding 1x1 layers 1.05-1.25x slower, which these runs do not show: MobileNetV2's
  // 1x1 set at 90% medians 0.98). Not for rows run together (their R weight vectors and the
  // indices: 1.02-1.03x).
  for (; k + kW <= end; k += kW) {
    const typename Ops::Weights weights = Ops::load_weights(values + k);
#pragma GCC unroll 16
    for (int l = 0; l < kW; ++l) {
      const float* x = packed + offsets[k + l];
      const V w = Ops::weight(weights, l);
#pragma GCC unroll 8
      for (int q = 0; q < NV; ++q) acc[l % kChains][q] = Ops::fma(w, Ops::load(x + q * kW), acc[l % kChains][q]);
    }
  }
  for (; k + kChains <= end; k += kChains)
#pragma GCC unroll 8
    for (int c = 0; c < kChains; ++c) {
      const float* x = packed + offsets[k + c];
      const V w = Ops::set1(values[k + c]);
#pragma GCC unroll 8
      for (int q = 0; q < NV; ++q) acc[c][q] = Ops::fma(w, Ops::load(x + q * kW), acc[c][q]);
    }
  for (; k < end; ++k) {
    const float* x = packed + offsets[k];
    const V w = Ops::set1(values[k]);
#pragma GCC unroll 8
    for (int q = 0; q < NV; ++q) acc[0][q] = Ops::fma(w, Ops::load(x + q * kW), acc[0][q]);
  }
#pragma GCC unroll 8
  for (int c = 1; c < kChains; ++c)
#pragma GCC unroll 8
    for (int q = 0; q < NV; ++q) acc[0][q] = Ops::add(acc[0][q], acc[c][q]);
#pragma GCC unroll 8
  for (int q = 0; q < NV; ++q) {
    if constexpr (kToRegs) out[q] = acc[0][q];
    else Ops::store(own + q * kW, acc[0][q]);
  }
}

// R rows that store the same columns (DirectConv::same_rows), over the block's weights [begin, begin
// + n) of the first row: own[i * W ...] += row i's weights times the slots. Each column's NV slot
// vectors are loaded once for the R rows; the R x NV accumulators (8 with 4 rows on AVX-512 or 2 on
// AVX2, 4 with 2 rows on AVX-512) are the independent FMA chains. row_values[i]: row i's first
// weight of the block.
template <typename Ops, int64_t NV, int R>
inline void accumulate_rows(const float* const* row_values, const uint16_t* offsets, int64_t n, const float* packed,
                            float* own, int64_t W) {
  using V = typename Ops::V;
  constexpr int64_t kW = Ops::kWidth;
  V acc[R][NV];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int q = 0; q < NV; ++q) acc[i][q] = Ops::load(own + i * W + q * kW);
  for (int64_t j = 0; j < n; ++j) {
    const float* x = packed + offsets[j];
    V xv[NV];
#pragma GCC unroll 8
    for (int q = 0; q < NV; ++q) xv[q] = Ops::load(x + q * kW);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const V w = Ops::set1(row_values[i][j]);
#pragma GCC unroll 8
      for (int q = 0; q < NV; ++q) acc[i][q] = Ops::fma(w, xv[q], acc[i][q]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int q = 0; q < NV; ++q) Ops::store(own + i * W + q * kW, acc[i][q]);
}

// Output channels per item: their sums (16 KB) stay in L1; fewer items repack the same tile (64:
// 14% slower at 90% on 512 channels at 7 x 7, which ran as 8 chunks of 2 tiles). A weight of one
// block keeps no sums per row (conv_tile's kDirect), and its items take all channels.
constexpr int64_t kMaxRows = 128;

// Asks for the line at p into L1 (p may lie past the data: a prefetch never faults). Volatile asm:
// GCC 12 dropped __builtin_prefetch calls from inlined helpers like this.
inline void prefetch_line(const void* p) { asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p))); }

// Asks for row `row`'s weights (values and offsets) of block b, or where that row is past the item's
// last, the matching row of block b + 1 (whose turn comes next). Each row's weights of a block are a
// short run at its own place in the weight: one stream per row, more than the hardware prefetcher
// follows.
inline void prefetch_segment(const CsrView& a, const DirectConv& d, int64_t row, int64_t b, int64_t r0, int64_t r1) {
  if (row >= r1) {
    row -= r1 - r0;
    if (++b >= d.blocks || row >= r1) return;
  }
  const int64_t* starts = d.block_start + row * (d.blocks + 1) + b;
  for (int64_t k = starts[0]; k < starts[1]; k += 16) {  // a line of values each step, of offsets every other
    prefetch_line(a.values + k);
    if (((k - starts[0]) & 16) == 0) prefetch_line(d.offsets + k);
  }
}

// One item: output channels [r0, r1) of image n (in its group's planes, which start at `in` at the
// tile's first pixel) over the W grid pixels from q0. `readable`: how many of the W pixels' inputs may be
// loaded (the last tile of an input read in place stops at its end). kCheck (an input read in place,
// which no split_phases has checked): marks *seen where a packed input is Inf or NaN (conv.h).
// next_image (read in place only; else null): the tile's slots from `readable` on are the first
// next_pixels pixels of image n + 1, whose channels start there. kTaps (a stride-1 kernel larger than
// 1 x 1 read in place, conv.h): each column's pixels are loaded masked to those whose input lies
// inside the image, one mask per kernel tap (`readable` is unused). kAhead (a pointwise layer read in
// place, ConvArgs::prefetch_input): each column's lines kConvInputAheadFloats on are asked for as it
// is packed. (A template parameter: tested at run time, the branch alone cost the expanding 1x1
// layers at batch 1 7-11%.)
template <typename Ops, bool kCheck, bool kTaps, bool kDirect, bool kAhead>
inline void conv_tile(const CsrView& a, const ConvShape& s, const ConvArgs& c, const DirectConv& d, const float* in,
                      int64_t n, int64_t q0, int64_t r0, int64_t r1, int64_t readable, bool look_ahead,
                      typename Ops::V* seen, const float* next_image = nullptr, int64_t next_pixels = 0) {
  constexpr int64_t kW = Ops::kWidth, W = plan::kConvTileFloats, NV = W / kW;
  // Rows run together (accumulate_rows): up to 4 with 2 vectors per slot (AVX-512), 2 with 4 (AVX2,
  // whose 16 registers hold 8 accumulators and a slot's 4 vectors).
  constexpr int64_t kMaxSameRows = NV <= 2 ? kConvMaxSameRows : 2;
  const int64_t grid = s.out_h * d.wq;
  alignas(64) float sums[kMaxRows * W];
  alignas(64) float packed[plan::kConvPackBytes / sizeof(float)];
  // The tile's real outputs: runs of grid pixels on one output row, merged where one run's pixels
  // follow the last one's in the output too (a grid that drops no pixel: then the whole tile is one
  // run, where runs of one row each had made the copy below most of a pointwise layer's time on
  // small images: 14 x 14 copied in runs of 14, 14 and 4 floats).
  int64_t run_at[W], run_to[W], run_len[W];  // at most one run per pixel (out_w = 1)
  int runs = 0;
  for (int64_t q = q0; q < std::min(q0 + W, grid);) {
    const int64_t oy = q / d.wq, ox = q % d.wq;
    if (ox >= s.out_w) {
      q = (oy + 1) * d.wq;
      continue;
    }
    const int64_t end = std::min(q0 + W, oy * d.wq + s.out_w), to = oy * s.out_w + ox;
    if (runs > 0 && run_at[runs - 1] + run_len[runs - 1] == q - q0 && run_to[runs - 1] + run_len[runs - 1] == to) {
      run_len[runs - 1] += end - q;
    } else {
      run_at[runs] = q - q0;
      run_to[runs] = to;
      run_len[runs++] = end - q;
    }
    q = end;
  }
  if (next_image) {
    run_at[runs] = readable;
    run_to[runs] = s.out_channels * s.out_h * s.out_w;  // (y below is image n's)
    run_len[runs++] = next_pixels;
  }
  using V = typename Ops::V;
  // kDirect (a weight of one block: most pointwise layers): each row's sums are complete after one
  // pass, and go from the registers to the output, with no zeroed sums before nor a pass over them
  // after. (A template parameter: tested per row, the branches cost the other layers 2-3%.)
  if constexpr (!kDirect) std::fill(sums, sums + (r1 - r0) * W, 0.0f);
  // Row r's W sums plus its bias to its runs in the output: from registers (write_out) or from
  // memory (copy_out). Most tiles are one run of all W pixels, a vector store each; the others copy
  // run by run.
  const auto row_out = [&](int64_t r) { return c.y + (n * s.out_channels + r) * s.out_h * s.out_w; };
  const bool whole = runs == 1 && run_len[0] == W;
  // A whole tile's W outputs of row r, plus the bias: streamed past the caches where the call asks
  // for it and they fill whole lines (c.stream_output), else stored.
  static_assert(W * sizeof(float) % 64 == 0, "a whole tile's outputs are whole lines where they start on one");
  const auto store_whole = [&](int64_t r, const V* sums_r) {
    const V bias = Ops::set1(c.bias ? c.bias[r] : 0.0f);
    float* y = row_out(r) + run_to[0];
    if (c.stream_output && reinterpret_cast<uintptr_t>(y) % 64 == 0) {
#pragma GCC unroll 8
      for (int64_t q = 0; q < NV; ++q) Ops::stream(y + q * kW, Ops::add(sums_r[q], bias));
      return;
    }
#pragma GCC unroll 8
    for (int64_t q = 0; q < NV; ++q) Ops::storeu(y + q * kW, Ops::add(sums_r[q], bias));
  };
  const auto copy_out = [&](int64_t r, const float* sums_r) {
    if (whole) {
      V row[NV];
#pragma GCC unroll 8
      for (int64_t q = 0; q < NV; ++q) row[q] = Ops::load(sums_r + q * kW);
      store_whole(r, row);
      return;
    }
    const float bias = c.bias ? c.bias[r] : 0.0f;
    float* y = row_out(r);
    for (int i = 0; i < runs; ++i)
      for (int64_t j = 0; j < run_len[i]; ++j) y[run_to[i] + j] = sums_r[run_at[i] + j] + bias;
  };
  const auto write_out = [&](int64_t r, const V* acc) {
    if (whole) {
      store_whole(r, acc);
      return;
    }
    alignas(64) float row[W];
#pragma GCC unroll 8
    for (int64_t q = 0; q < NV; ++q) Ops::store(row + q * kW, acc[q]);
    copy_out(r, row);
  };
  // kTaps: bit j of tap_lanes[ky * kw + kx] is set where pixel q0 + j's input for that tap lies inside
  // the image (its row and its column both do).
  static_assert(W <= 32, "a tap's lanes are the bits of a uint32_t");
  uint32_t tap_lanes[kTaps ? kConvMaxTaps : 1];
  const int64_t taps = s.kernel_h * s.kernel_w;
  if constexpr (kTaps) {
    uint32_t row_ok[kConvMaxTaps] = {}, col_ok[kConvMaxTaps] = {};
    int64_t oy = q0 / d.wq, ox = q0 % d.wq;
    for (int64_t j = 0; j < W; ++j) {
      if (next_image && j == readable) oy = ox = 0;  // the next image's first pixels from here on
      for (int64_t ky = 0; ky < s.kernel_h; ++ky) {
        const int64_t iy = oy + ky * s.dil_h - s.pad_h;
        row_ok[ky] |= static_cast<uint32_t>(iy >= 0 && iy < s.in_h) << j;
      }
      for (int64_t kx = 0; kx < s.kernel_w; ++kx) {
        const int64_t ix = ox + kx * s.dil_w - s.pad_w;
        col_ok[kx] |= static_cast<uint32_t>(ix >= 0 && ix < s.in_w) << j;
      }
      if (++ox == d.wq) {
        ox = 0;
        ++oy;
      }
    }
    for (int64_t t = 0; t < taps; ++t) tap_lanes[t] = row_ok[t / s.kernel_w] & col_ok[t % s.kernel_w];
  }
  for (int64_t b = 0; b < d.blocks; ++b) {
    const int64_t c0 = b * d.block_cols, c1 = std::min(c0 + d.block_cols, a.cols);
    V checked = Ops::zero();  // (kCheck; a local of this loop alone, so that it stays in a register)
    int64_t tap = c0 % taps;  // (kTaps) column col's tap: columns run (channel, ky, kx)
    for (int64_t col = c0; col < c1; ++col) {
      const float* x = in + d.sources[col];
      float* slot = packed + (col - c0) * W;
      if constexpr (kAhead)
        for (int64_t at = 0; at < W; at += 64 / sizeof(float)) prefetch_line(x + plan::kConvInputAheadFloats + at);
      uint32_t lanes = 0;
      if constexpr (kTaps) {
        lanes = tap_lanes[tap];
        if (++tap == taps) tap = 0;
      }
      // Every pixel's input inside the image and none from the next one (most columns: a tap of a
      // tile within the image's rows, away from its edges): plain loads, one test for the column. (A
      // 3x3 layer's taps had tested each vector's lanes: ab_conv.py, AMD EPYC Zen 3, AVX2: 64->64 at
      // 56 x 56 0.91-0.94x the time at 90%, 0.96-0.97x at 70%; the other stride-1 3x3 shapes
      // 0.95-1.00x.)
      const bool whole = !next_image && (kTaps ? lanes == ~uint32_t{0} : readable == W);
#pragma GCC unroll 8
      for (int q = 0; q < NV; ++q) {
        V v;
        constexpr uint32_t kLanes = (1u << kW) - 1u;
        if (whole) {
          v = Ops::loadu(x + q * kW);
        } else if constexpr (kTaps) {
          if (next_image) {  // lanes below `readable` from image n, the next next_pixels from image n + 1
            const auto below = [](int64_t n) { return static_cast<uint32_t>((uint64_t{1} << n) - 1u); };  // n <= 32
            const uint32_t here = below(readable), there = below(readable + next_pixels) & ~here;
            v = Ops::merge(Ops::load_lanes(x + q * kW, ((lanes & here) >> (q * kW)) & kLanes),
                           Ops::load_lanes(next_image + d.sources[col] - readable + q * kW,
                                           ((lanes & there) >> (q * kW)) & kLanes));
          } else {
            v = Ops::load_lanes(x + q * kW, (lanes >> (q * kW)) & kLanes);
          }
        } else {
          v = readable == W ? Ops::loadu(x + q * kW) : Ops::load_first(x + q * kW, readable - q * kW);
          if (kCheck && next_image)  // (read in place only) slot readable + j: pixel j of the next image
            v = Ops::merge(v, Ops::load_between(next_image + d.sources[col] + q * kW - readable, readable - q * kW,
                                                readable + next_pixels - q * kW));
        }
        if constexpr (kCheck) checked = Ops::mark_nonfinite(checked, v);
        Ops::store(slot + q * kW, v);
      }
    }
    if constexpr (kCheck) *seen = Ops::mark_nonfinite(*seen, checked);
    for (int64_t r = r0; r < r1;) {
      const int64_t* starts = d.block_start + r * (d.blocks + 1) + b;
      const int64_t same = std::min<int64_t>({d.same_rows[r], r1 - r, kMaxSameRows});
      if (look_ahead)
        for (int64_t i = r; i < r + same; ++i) prefetch_segment(a, d, i + plan::kConvLookAheadRows, b, r0, r1);
      if (starts[0] == starts[1]) {  // (then so are the rows storing the same columns)
        if constexpr (kDirect) {
          V zeros[NV];
#pragma GCC unroll 8
          for (int64_t q = 0; q < NV; ++q) zeros[q] = Ops::zero();
          for (int64_t i = r; i < r + same; ++i) write_out(i, zeros);
        }
        r += same;
        continue;
      }
      // (kDirect: rows run together write their sums out at once, so each group starts at sums[0],
      // and an item's rows are not bounded by kMaxRows.)
      float* own = kDirect ? sums : sums + (r - r0) * W;
      if (same == 1) {
        if constexpr (kDirect) {
          V acc[NV];
          accumulate_row<Ops, NV, true>(a.values, d.offsets, starts[0], starts[1], packed, nullptr, acc);
          write_out(r, acc);
        } else {
          accumulate_row<Ops, NV>(a.values, d.offsets, starts[0], starts[1], packed, own);
        }
        r += 1;
        continue;
      }
      const int64_t together = same >= 4 ? kMaxSameRows : 2;
      if constexpr (kDirect) std::fill(own, own + together * W, 0.0f);
      const int64_t stride = d.blocks + 1;
      const float* row_values[4] = {a.values + starts[0], a.values + starts[stride],
                                    a.values + starts[std::min<int64_t>(2, same - 1) * stride],
                                    a.values + starts[std::min<int64_t>(3, same - 1) * stride]};
      if (same >= 4)
        accumulate_rows<Ops, NV, kMaxSameRows>(row_values, d.offsets + starts[0], starts[1] - starts[0], packed, own,
                                               W);
      else
        accumulate_rows<Ops, NV, 2>(row_values, d.offsets + starts[0], starts[1] - starts[0], packed, own, W);
      if constexpr (kDirect)
        for (int64_t i = 0; i < together; ++i) copy_out(r + i, own + i * W);
      r += together;
    }
  }
  if constexpr (!kDirect)
    for (int64_t r = r0; r < r1; ++r) copy_out(r, sums + (r - r0) * W);
}

// conv_tile for this weight: kDirect where it is one block.
template <typename Ops, bool kCheck, bool kTaps = false, bool kAhead = false, typename... Rest>
inline void run_tile(const CsrView& a, const ConvShape& s, const ConvArgs& c, const DirectConv& d, Rest... rest) {
  if (d.blocks == 1) conv_tile<Ops, kCheck, kTaps, true, kAhead>(a, s, c, d, rest...);
  else conv_tile<Ops, kCheck, kTaps, false, kAhead>(a, s, c, d, rest...);
}

// Items of (image, group, tile of W grid pixels, chunk of the group's output channels); channels are
// chunked only where tiles alone would leave threads idle (a 7 x 7 image is one tile or two). Each
// column of a block: NV unaligned loads and NV aligned stores into its slot; each stored weight: one
// broadcast, NV aligned loads, NV FMAs.
//
// Each thread takes a contiguous run of the items, then helps itself to the others' leftover items
// when its run is done.
//
// A convolution read in place (stride 1: conv.h) copies nothing. (Stride-1 3x3 layers read in place,
// with a lane mask per tap, instead of through a padded copy: ab_conv.py, AVX-512, 0.83-0.92x the
// time at 90% and 0.88-0.97x at 70%, batch 8; 0.83-0.96x at batch 1. The copy had been about a
// sixth of a 90% layer's time.)
//
// Otherwise each thread writes the phase planes its own tiles read into its own scratch (the
// others' leftovers read theirs). Planes shared by all threads, as before, were rewritten on every call
// into lines the other core had just read: the copy waited on the other core for each line and did
// not scale (two threads each took longer for half the copy than one thread for all of it: 110
// against 90 us a call at 64 channels, 56 x 56, stride 2; written again at once, 45 us).
//
// Returns whether every input it loaded was finite (conv.h): each thread marks what it loads, in
// split_phases or, read in place, in conv_tile (Ops::mark_nonfinite).
template <typename Ops>
bool csr_conv2d_simd(const CsrView& a, const ConvShape& s, const ConvArgs& c, const DirectConv& d) {
  constexpr int64_t W = plan::kConvTileFloats;
  const int64_t cg = s.in_channels / s.groups, kg = s.out_channels / s.groups;
  const int64_t plane = d.hq * d.wq, grid = s.out_h * d.wq, tiles = (grid + W - 1) / W;
  // A stride-1 convolution reads its input where it is (conv.h: its planes are the input's; a
  // pointwise one, 1 x 1 without padding, needs no lane masks and drops no grid pixel). Others read
  // a copy in phase planes, with the slack the last tile's loads reach past them.
  const bool in_place = d.in_place;
  const bool masked = in_place && !(s.kernel_h == 1 && s.kernel_w == 1 && s.pad_h == 0 && s.pad_w == 0);
  const int64_t per_group = in_place ? cg * plane : cg * s.stride_h * s.stride_w * plane + plane + W;
  const int64_t channel_planes = s.stride_h * s.stride_w * plane;
  // Plane rows a grid row reads at or past itself (the kernel's reach down), and one more for a reach
  // to the right that runs into the next row.
  const int64_t reach_rows = (s.kernel_h - 1) * s.dil_h / s.stride_h + 2;
  const int64_t images = s.batch * s.groups;
  // (At most kMaxConvThreads: the per-thread state below lives on the stack, since an ISA-flagged
  // file must not instantiate std::vector, whose out-of-line copies two ISAs would share.)
  constexpr int kMaxConvThreads = 256;
  const int nt = (c.num_threads <= 1 || (a.nnz + a.rows) * s.out_h * s.out_w * s.batch < 24576)
                     ? 1 : std::min(c.num_threads, kMaxConvThreads);
  // A convolution read in place on images whose pixels are not a multiple of W (14 x 14 = 6 tiles and
  // 4 pixels) lets a tile run on into the next image: 8 images of 14 x 14 in 49 tiles, not 56; its
  // packing adds one masked load per slot vector. Pointwise layers at batch 8: 7 x 7 0.84-0.91x the
  // time, 14 x 14 0.86-0.93x, 28 x 28 0.95-0.98x; 3x3 layers (lane masks per tap, where the grid drops
  // no column): 7 x 7 0.84-0.89x, 14 x 14 0.89-0.94x (AVX2 0.78 / 0.92). (Through phase planes, whose
  // grid drops columns, a tile across rows and images measured slower: BENCHMARKS.md, compact tiles.)
  const int64_t pixels = s.out_h * s.out_w;
  const bool across = in_place && (!masked || s.out_w == d.wq) && s.groups == 1 && s.batch > 1 && pixels >= W &&
                      pixels % W != 0;
  const int64_t spatial = across ? (s.batch * pixels + W - 1) / W : images * tiles;
  // A weight of one block (conv_tile's kDirect, no sums kept per row) is one chunk of output
  // channels, or one per thread where there are few tiles (under 16): 7 x 7 layers at 90% then took
  // 0.90-0.94x the time of one chunk at batch 8 (13 tiles) and 0.94-0.98x of four at batch 1 (2
  // tiles); three or more chunks were slower, and so were two on images of many tiles (192->32 at
  // 28 x 28, batch 8: 1.30x). Other weights: chunks of at most kMaxRows channels, more where tiles
  // alone would leave threads idle.
  const bool one_block = d.blocks == 1;
  const int64_t chunks =
      one_block ? (spatial < 16 ? std::max<int64_t>(1, std::min<int64_t>(nt, kg / 16)) : 1)
                : std::max<int64_t>({1, (kg + kMaxRows - 1) / kMaxRows,
                                     std::min<int64_t>((int64_t{nt} * 4 + spatial - 1) / spatial, kg / 16)});
  const int64_t items = spatial * chunks, per_image = tiles * chunks;
  // Few tiles reuse each weight only a few times, so a large weight comes from L3 or DRAM on every
  // call, row by row in short runs: those are asked for ahead (prefetch_segment). 512 channels at
  // 7 x 7, 70-90%, weights evicted: 0.57-0.63x the time; a model's 3x3 layers one after another
  // (ab_conv.py --in-a-row), batch 1: 0.81-0.92x. With the weights in cache it costs 3-7%, and
  // on images of many tiles, where they stay in cache, it is not done.
  const bool look_ahead = spatial <= plan::kConvLookAheadMaxItems && a.nnz >= plan::kConvLookAheadMinNnz;
  // Per thread: its planes (images first_image on, per_group floats each) and the next item of its run.
  const float* planes[kMaxConvThreads];
  int64_t first_image[kMaxConvThreads];
  std::atomic<int64_t> next[kMaxConvThreads];
  bool nonfinite = false;
#pragma omp parallel num_threads(nt) if (nt > 1) reduction(|| : nonfinite)
  {
    const int team = omp_get_num_threads(), me = omp_get_thread_num();
    typename Ops::V seen = Ops::zero();
    // Thread t's run: [run_start(t), run_start(t + 1)), consecutive tiles. A stride-1 kernel larger
    // than 1 x 1 (masked) has all items in one run that every thread takes from, item by item. (So
    // had pointwise ones: neighbouring tiles then went to both threads, and where a plane is not a
    // whole number of lines (14 x 14: 784 bytes) every output channel's line at their boundary passed
    // between the cores, 2 rows per tile. 64->384 at 14 x 14, batch 8, 90%: 0.49-0.91x the time with
    // runs; 24->144 / 144->24 at 56 x 56, batch 1: 0.61-0.80x. The 3x3 layers measured 1.00-1.12x
    // with runs at batch 1.)
    const auto run_start = [&](int64_t t) { return masked ? (t == 0 ? 0 : items) : items * t / team; };
    const int64_t lo = run_start(me), hi = run_start(me + 1);
    if (!in_place && hi > lo) {
      const int64_t ng0 = lo / per_image, ng1 = (hi - 1) / per_image + 1;
      float* mine = scratch_panel((ng1 - ng0) * per_group);  // this thread's own
      planes[me] = mine;
      first_image[me] = ng0;
      for (int64_t ng = ng0; ng < ng1; ++ng) {
        // (n, g) is image n's channels g * cg on. Its tiles in this run, and the plane rows they read.
        const int64_t t0 = ng == ng0 ? lo % per_image / chunks : 0;
        const int64_t t1 = ng == ng1 - 1 ? (hi - 1) % per_image / chunks : tiles - 1;
        const int64_t j0 = std::min(d.hq, t0 * W / d.wq), j1 = std::min(d.hq, (t1 * W + W - 1) / d.wq + reach_rows);
        float* group = mine + (ng - ng0) * per_group;
        for (int64_t i = 0; i < cg; ++i)
          seen = split_phases<Ops>(s, d, c.x + (ng * cg + i) * s.in_h * s.in_w, group + i * channel_planes, j0, j1,
                                   seen, c.x, c.x + s.batch * s.in_channels * s.in_h * s.in_w);
        if (t1 == tiles - 1) std::fill(group + cg * channel_planes, group + per_group, 0.0f);  // the slack
      }
    } else if (in_place) {
      planes[me] = c.x;
    }
    next[me].store(lo, std::memory_order_relaxed);
#pragma omp barrier
    for (int v = 0; v < team; ++v) {  // its own run first, then the others' leftovers
      const int u = (me + v) % team;
      const int64_t end = run_start(u + 1);
      for (int64_t item = next[u].fetch_add(1, std::memory_order_relaxed); item < end;
           item = next[u].fetch_add(1, std::memory_order_relaxed)) {
        if (across) {
          const int64_t chunk = item % chunks, r0 = kg * chunk / chunks, r1 = kg * (chunk + 1) / chunks;
          const int64_t first = item / chunks * W, n = first / pixels, p = first % pixels;
          const int64_t here = std::min(W, pixels - p);
          const int64_t next = n + 1 < s.batch ? std::min(W - here, pixels) : 0;
          const float* next_image = next ? c.x + (n + 1) * per_group : nullptr;
          if (masked)
            run_tile<Ops, true, true>(a, s, c, d, c.x + n * per_group + p, n, p, r0, r1, here, look_ahead, &seen,
                                       next_image, next);
          else if (c.prefetch_input)
            run_tile<Ops, true, false, true>(a, s, c, d, c.x + n * per_group + p, n, p, r0, r1, here, look_ahead,
                                             &seen, next_image, next);
          else
            run_tile<Ops, true>(a, s, c, d, c.x + n * per_group + p, n, p, r0, r1, here, look_ahead, &seen,
                                 next_image, next);
          continue;
        }
        const int64_t chunk = item % chunks, t = item / chunks % tiles, ng = item / chunks / tiles;
        const int64_t n = ng / s.groups, g = ng % s.groups, q0 = t * W;
        const int64_t r0 = g * kg + kg * chunk / chunks, r1 = g * kg + kg * (chunk + 1) / chunks;
        // (Read in place, the last tile must not load past the input: its loads are masked to it.)
        const float* in = in_place ? c.x + ng * per_group + q0 : planes[u] + (ng - first_image[u]) * per_group + q0;
        if (masked) run_tile<Ops, true, true>(a, s, c, d, in, n, q0, r0, r1, W, look_ahead, &seen);
        else if (in_place && c.prefetch_input)
          run_tile<Ops, true, false, true>(a, s, c, d, in, n, q0, r0, r1, std::min(W, grid - q0), look_ahead, &seen);
        else if (in_place) run_tile<Ops, true>(a, s, c, d, in, n, q0, r0, r1, std::min(W, grid - q0), look_ahead, &seen);
        else run_tile<Ops, false>(a, s, c, d, in, n, q0, r0, r1, W, look_ahead, &seen);
      }
    }
    if (c.stream_output) Ops::fence();
    nonfinite = Ops::any_nan(seen);
  }
  return !nonfinite;
}

}  // namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY
