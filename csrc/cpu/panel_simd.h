// The panel loops shared by the SIMD kernels, written once for any vector width. Include only from
// a file compiled with AVX2 + FMA or more, and instantiate with that file's vector traits:
//   struct Ops { using V = ...; static constexpr int kWidth; zero(), load(p), set1(f),
//                fma(a, b, c), add(a, b), store(p, v) };
// Each ISA file gets its own copy, compiled with its own flags into its own namespace (capability.h).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "cpu/csr_view.h"
#include "cpu/panel.h"
#include "cpu/simd_tile.h"

namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY {

// acc[0..NV) += sum over non-zeros k in [begin, end) of val[k] * (panel row col[k]), a panel row
// being W = kWidth * NV floats. U non-zeros per step, each into its own partial sums, keep U * NV
// FMAs independent: with one vector per non-zero (NV = 1) two chains left the FMA latency exposed,
// and four measured 12-17% faster at 50% sparsity, batch 4-8 (AVX2), and 8% at 95%, batch 16
// (AVX-512); with wider panels two chains are enough (four changed nothing or cost 1-3%).
template <typename Ops, int NV, int U, typename Idx>
inline void panel_dot_u(const Idx* col, const float* val, int64_t begin, int64_t end, const float* xp,
                        typename Ops::V* acc) {
  using V = typename Ops::V;
  constexpr int64_t W = Ops::kWidth * NV;
  V part[U][NV];
  for (int v = 0; v < NV; ++v) part[0][v] = acc[v];
  for (int u = 1; u < U; ++u)
    for (int v = 0; v < NV; ++v) part[u][v] = Ops::zero();
  int64_t k = begin;
  // AVX-512 panels of one or two vectors: 16 weights by one vector load, each lane then broadcast by
  // a permute, where a broadcast from memory per weight was a third load beside the panel's two
  // (the loads, not the FMAs, were the limit): 0.90-0.95x the time at 50% (batch 16-256,
  // 4096x4096), 0.94x at 70%, level at 90% (whose 64-wide panels keep the broadcast: 1.05x slower).
  // AVX2 panels of any width, 8 weights a load: on AMD EPYC Zen 3 (ab_native.py) 0.90-0.92x the
  // time at 70% (384x1536 at 64 and 1,024 rows, 4096x4096 at 256), 0.92-0.97x at 50% (batch 4-32),
  // 0.92-0.99x at 90% (batch 8-64; batch 4 1.03x). Then AVX2's weights 4 a load, spread by in-lane
  // shuffles (Ops256::weight), on the same machine: 4096x4096 at 50% 0.76x the time at batch 4-8,
  // 0.84-0.94x at 16-256; at 70% 0.87x at 4-8, 0.91-0.96x at 16-256; 1536x384 at 8 / 1,024 rows
  // 0.83 / 0.92x; 90% 0.97-1.00x. Then AVX2's column indices 8 a load (WordIndices): 4096x4096 at
  // 70% 0.94-0.96x at 64-256 rows (1.00 at 8), 384x1536 at 1,024 rows 0.93-0.94x.
  if constexpr ((Ops::kWidth == 16 && NV <= 2) || Ops::kWidth == 8) {
    constexpr int kLanes = Ops::kWidth;
    for (; k + kLanes <= end; k += kLanes) {
      _mm_prefetch(reinterpret_cast<const char*>(val + k + kPrefetchAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(col + k + kPrefetchAhead), _MM_HINT_T0);
      const typename Ops::Weights wl = Ops::load_weights(val + k);
      const LaneIndices<Ops, Idx, kLanes> cols(col + k);
#pragma GCC unroll 16
      for (int l = 0; l < kLanes; ++l) {
        const float* xu = xp + cols[l] * W;
        const V w = Ops::weight(wl, l);
        for (int v = 0; v < NV; ++v) part[l % U][v] = Ops::fma(w, Ops::load(xu + Ops::kWidth * v), part[l % U][v]);
      }
    }
  }
  for (; k + U <= end; k += U) {
    if ((k & 15) < U) {  // once per 16 non-zeros (k steps by U, a divisor of 16)
      _mm_prefetch(reinterpret_cast<const char*>(val + k + kPrefetchAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(col + k + kPrefetchAhead), _MM_HINT_T0);
    }
    for (int u = 0; u < U; ++u) {
      const float* xu = xp + static_cast<int64_t>(col[k + u]) * W;
      const V w = Ops::set1(val[k + u]);
      for (int v = 0; v < NV; ++v) part[u][v] = Ops::fma(w, Ops::load(xu + Ops::kWidth * v), part[u][v]);
    }
  }
  for (; k < end; ++k) {
    const float* x0 = xp + static_cast<int64_t>(col[k]) * W;
    const V w0 = Ops::set1(val[k]);
    for (int v = 0; v < NV; ++v) part[0][v] = Ops::fma(w0, Ops::load(x0 + Ops::kWidth * v), part[0][v]);
  }
  for (int v = 0; v < NV; ++v) {
    V s = part[0][v];
    for (int u = 1; u < U; ++u) s = Ops::add(s, part[u][v]);
    acc[v] = s;
  }
}

template <typename Ops, int NV, typename Idx>
inline void panel_dot(const Idx* col, const float* val, int64_t begin, int64_t end, const float* xp,
                      typename Ops::V* acc) {
  panel_dot_u<Ops, NV, (NV == 1 ? 4 : 2)>(col, val, begin, end, xp, acc);
}

// Rows [r0, r1) of the weight against a panel of width W = kWidth * NV holding batch entries
// [b0, b0 + valid): eight rows at a time into a tile, transposed back into y.
template <typename Ops, int NV, typename Idx>
void panel_rows(const sparsenet::CsrView& a, const Idx* col, const float* xp, int64_t r0, int64_t r1,
                int64_t b0, int64_t valid, const sparsenet::DenseArgs& d) {
  constexpr int64_t W = Ops::kWidth * NV;
  alignas(64) float tile[8 * W];
  for (int64_t rg = r0; rg < r1; rg += 8) {
    const int64_t nr = std::min<int64_t>(8, r1 - rg);
    for (int64_t i = 0; i < nr; ++i) {
      typename Ops::V acc[NV];
      for (int v = 0; v < NV; ++v) acc[v] = Ops::zero();
      panel_dot<Ops, NV>(col, a.values, a.row_ptr[rg + i], a.row_ptr[rg + i + 1], xp, acc);
      for (int v = 0; v < NV; ++v) Ops::store(tile + i * W + Ops::kWidth * v, acc[v]);
    }
    store_tile_simd(tile, W, nr, valid, rg, b0, d.y, d.ldy, d.bias);
  }
}

// panel_rows for a panel width known only at run time (a multiple of kWidth, at most kWidth * MaxNV).
template <typename Ops, int MaxNV, typename Idx>
void panel_rows_any(const sparsenet::CsrView& a, const Idx* col, const float* xp, int64_t W, int64_t r0,
                    int64_t r1, int64_t b0, int64_t valid, const sparsenet::DenseArgs& d) {
  if constexpr (MaxNV > 1) {
    if (W < Ops::kWidth * MaxNV) return panel_rows_any<Ops, MaxNV - 1>(a, col, xp, W, r0, r1, b0, valid, d);
  }
  panel_rows<Ops, MaxNV>(a, col, xp, r0, r1, b0, valid, d);
}

}  // namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY
