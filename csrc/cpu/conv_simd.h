// The sparse convolution kernel (see conv.h), written once against the vector traits of simd_ops.h.
// Include only from ISA-flagged files; each gets its own copy in its own namespace (capability.h).
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "cpu/conv.h"
#include "cpu/panel.h"
#include "cpu/panel_simd.h"

namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY {

// The panel of one tile of W = width * NV output pixels: xp[k * W + j] = the input under weight
// column k (input channel, kernel row, kernel column) for output pixel p0 + j of the group's channels
// x (zero past the padding, and for lanes j >= valid). The tile's pixels are cut into runs on one
// output row; along a run the input columns advance by the stride, so at stride 1 a run is one masked
// vector load per column and vector it touches.
template <typename Ops, int NV>
void pack_conv_tile(const ConvShape& s, const float* x, int64_t p0, int64_t valid, float* xp) {
  using V = typename Ops::V;
  constexpr int64_t kW = Ops::kWidth, W = kW * NV;
  struct Run { int64_t lane0, lanes, oy, ox0; };
  Run runs[W];
  int nruns = 0;
  for (int64_t j = 0; j < valid;) {
    const int64_t oy = (p0 + j) / s.out_w, ox = (p0 + j) % s.out_w;
    const int64_t lanes = std::min(valid - j, s.out_w - ox);
    runs[nruns++] = {j, lanes, oy, ox};
    j += lanes;
  }
  const int64_t cg = s.in_channels / s.groups;
  alignas(64) float lanes_buf[W];
  int64_t k = 0;
  for (int64_t ci = 0; ci < cg; ++ci) {
    const float* plane = x + ci * s.in_h * s.in_w;
    for (int64_t ky = 0; ky < s.kernel_h; ++ky)
      for (int64_t kx = 0; kx < s.kernel_w; ++kx, ++k) {
        float* dst = xp + k * W;
        if (s.stride_w != 1) {  // lane by lane
          std::fill(lanes_buf, lanes_buf + W, 0.0f);
          for (int r = 0; r < nruns; ++r) {
            const Run& run = runs[r];
            const int64_t iy = run.oy * s.stride_h - s.pad_h + ky * s.dil_h;
            if (iy < 0 || iy >= s.in_h) continue;
            const float* row = plane + iy * s.in_w;
            for (int64_t j = 0; j < run.lanes; ++j) {
              const int64_t ix = (run.ox0 + j) * s.stride_w - s.pad_w + kx * s.dil_w;
              if (ix >= 0 && ix < s.in_w) lanes_buf[run.lane0 + j] = row[ix];
            }
          }
          for (int q = 0; q < NV; ++q) Ops::store(dst + q * kW, Ops::load(lanes_buf + q * kW));
          continue;
        }
        V v[NV];
        for (int q = 0; q < NV; ++q) v[q] = Ops::zero();
        for (int r = 0; r < nruns; ++r) {
          const Run& run = runs[r];
          const int64_t iy = run.oy * s.stride_h - s.pad_h + ky * s.dil_h;
          if (iy < 0 || iy >= s.in_h) continue;
          // Lane j of the run reads row[ix0 + j - lane0]; the lanes whose column is inside the row: [lo, hi).
          const int64_t ix0 = run.ox0 - s.pad_w + kx * s.dil_w;
          const int64_t lo = run.lane0 + std::max<int64_t>(0, -ix0);
          const int64_t hi = run.lane0 + std::min<int64_t>(run.lanes, s.in_w - ix0);
          const float* base = plane + iy * s.in_w + ix0 - run.lane0;  // lane 0's address
          for (int q = 0; q < NV; ++q) {
            const int64_t qlo = std::max(lo, q * kW), qhi = std::min(hi, q * kW + kW);
            if (qlo < qhi) v[q] = Ops::load_lanes(v[q], base + q * kW, qlo - q * kW, qhi - q * kW);
          }
        }
        for (int q = 0; q < NV; ++q) Ops::store(dst + q * kW, v[q]);
      }
  }
}

// Work items: (image, group, tile of W pixels, chunk of the group's output channels). Channels are
// chunked only where tiles alone would leave threads idle (a 7 x 7 image is one tile); each item
// packs its own panel.
template <typename Ops, int NV, typename Idx>
void csr_conv2d_simd(const CsrView& a, const ConvShape& s, const ConvArgs& c) {
  using V = typename Ops::V;
  constexpr int64_t kW = Ops::kWidth, W = kW * NV;
  const Idx* col = static_cast<const Idx*>(a.col_idx);
  const int64_t pixels = s.out_h * s.out_w, tiles = (pixels + W - 1) / W;
  const int64_t cg = s.in_channels / s.groups, kg = s.out_channels / s.groups;
  // Threads worth waking: below ~25k multiply-adds (as for CSR) one does it all.
  const int nt = (c.num_threads <= 1 || (a.nnz + a.rows) * pixels * s.batch < 24576) ? 1 : c.num_threads;
  const int64_t spatial = s.batch * s.groups * tiles;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((int64_t{nt} * 4 + spatial - 1) / spatial, kg / 16));
  const int64_t items = spatial * chunks;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t chunk = item % chunks, t = item / chunks % tiles, g = item / chunks / tiles % s.groups;
    const int64_t n = item / chunks / tiles / s.groups;
    const int64_t p0 = t * W, valid = std::min(W, pixels - p0);
    float* xp = scratch_panel(a.cols * W);  // this thread's own
    pack_conv_tile<Ops, NV>(s, c.x + (n * s.in_channels + g * cg) * s.in_h * s.in_w, p0, valid, xp);
    for (int64_t r = g * kg + kg * chunk / chunks; r < g * kg + kg * (chunk + 1) / chunks; ++r) {
      V acc[NV];
      for (int q = 0; q < NV; ++q) acc[q] = Ops::zero();
      panel_dot<Ops, NV>(col, a.values, a.row_ptr[r], a.row_ptr[r + 1], xp, acc);
      const V b = Ops::set1(c.bias ? c.bias[r] : 0.0f);
      float* y = c.y + (n * s.out_channels + r) * pixels + p0;
      if (valid == W) {
        for (int q = 0; q < NV; ++q) Ops::storeu(y + q * kW, Ops::add(acc[q], b));
      } else {
        alignas(64) float out[W];
        for (int q = 0; q < NV; ++q) Ops::store(out + q * kW, Ops::add(acc[q], b));
        std::copy(out, out + valid, y);
      }
    }
  }
}

// Stride 1 (see conv.h): the input copied into zero-padded planes (plus a tile's slack, which the
// last tile's loads reach past the grid), then items of (image, group, tile of the padded grid,
// chunk of output channels), each stored weight NV unaligned loads at its offset and NV FMAs.
template <typename Ops, int NV>
void csr_conv2d_direct_simd(const CsrView& a, const ConvShape& s, const ConvArgs& c, const DirectConv& dc) {
  using V = typename Ops::V;
  constexpr int64_t kW = Ops::kWidth, W = kW * NV;
  const int64_t cg = s.in_channels / s.groups, kg = s.out_channels / s.groups;
  const int64_t plane = dc.hp * dc.wp, span = (s.kernel_h - 1) * s.dil_h * dc.wp + (s.kernel_w - 1) * s.dil_w;
  const int64_t grid = s.out_h * dc.wp, tiles = (grid + W - 1) / W;
  const int64_t per_group = cg * plane + span + W;  // padded planes, and what the last tile reads past them
  const int64_t groups_total = s.batch * s.groups;
  float* padded = scratch_panel(groups_total * per_group);  // the calling thread's; the team shares it
  const int nt = (c.num_threads <= 1 || (a.nnz + a.rows) * s.out_h * s.out_w * s.batch < 24576) ? 1 : c.num_threads;
  const int64_t spatial = groups_total * tiles;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((int64_t{nt} * 4 + spatial - 1) / spatial, kg / 16));
  const int64_t items = spatial * chunks;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#pragma omp for schedule(static)
    for (int64_t ng = 0; ng < groups_total; ++ng) {
      float* dst = padded + ng * per_group;
      std::fill(dst, dst + per_group, 0.0f);
      const float* src = c.x + ng * cg * s.in_h * s.in_w;  // (n, g) -> image n, channels g * cg ...
      for (int64_t ci = 0; ci < cg; ++ci)
        for (int64_t iy = 0; iy < s.in_h; ++iy)
          std::copy(src + (ci * s.in_h + iy) * s.in_w, src + (ci * s.in_h + iy + 1) * s.in_w,
                    dst + ci * plane + (iy + s.pad_h) * dc.wp + s.pad_w);
    }
    // (implicit barrier: every plane is padded)
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t chunk = item % chunks, t = item / chunks % tiles, ng = item / chunks / tiles;
      const int64_t n = ng / s.groups, g = ng % s.groups, q0 = t * W;
      const float* in = padded + ng * per_group + q0;
      alignas(64) float out[W];
      for (int64_t r = g * kg + kg * chunk / chunks; r < g * kg + kg * (chunk + 1) / chunks; ++r) {
        V acc[NV];
#pragma GCC unroll 4
        for (int q = 0; q < NV; ++q) acc[q] = Ops::zero();
        for (int64_t k = a.row_ptr[r]; k < a.row_ptr[r + 1]; ++k) {
          const float* x = in + dc.offsets[k];
          const V w = Ops::set1(a.values[k]);
#pragma GCC unroll 4
          for (int q = 0; q < NV; ++q) acc[q] = Ops::fma(w, Ops::loadu(x + q * kW), acc[q]);
        }
        const V b = Ops::set1(c.bias ? c.bias[r] : 0.0f);
#pragma GCC unroll 4
        for (int q = 0; q < NV; ++q) Ops::store(out + q * kW, Ops::add(acc[q], b));
        // The tile's grid pixels that are real outputs: runs of at most out_w per grid row.
        float* y = c.y + (n * s.out_channels + r) * s.out_h * s.out_w;
        for (int64_t q = q0; q < std::min(q0 + W, grid);) {
          const int64_t oy = q / dc.wp, ox = q % dc.wp;
          const int64_t end = std::min(q0 + W, oy * dc.wp + s.out_w);
          if (ox < s.out_w) std::copy(out + (q - q0), out + (end - q0), y + oy * s.out_w + ox);
          q = ox < s.out_w ? end : (oy + 1) * dc.wp;
        }
      }
    }
  }
}

template <typename Ops, int NV>
void csr_conv2d_any(const CsrView& a, const ConvShape& s, const ConvArgs& c) {
  if (a.index_bytes == 2) csr_conv2d_simd<Ops, NV, uint16_t>(a, s, c);
  else csr_conv2d_simd<Ops, NV, int32_t>(a, s, c);
}

}  // namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY
