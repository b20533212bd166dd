// Vector traits the templated kernels are written against (panel_simd.h, tiled_kernel.h,
// bsr_simd.h): one struct per vector width, each defined only where its file's flags allow it.
// Include only from ISA-flagged files; each gets its own copy in its own namespace (capability.h).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "cpu/capability.h"

namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY {

#if defined(__AVX2__) && defined(__FMA__)
struct Ops256 {
  using V = __m256;
  static constexpr int kWidth = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_load_ps(p); }    // 32-byte aligned
  static V loadu(const float* p) { return _mm256_loadu_ps(p); }
  // Lane i of the result: lane index[i] (its low 3 bits) of v. v is held in a register first: GCC
  // would fold a load of it into vpermps's memory form, which takes 2 cycles a permutation on AMD
  // Zen 3 where the register form and a plain load take 1 (a throughput probe: 1.98 against 1.01).
  // The AVX2 bitmap decode at batch 1, 4096 x 4096 from DRAM: 0.82x the time at 70%, 0.93x at 50%.
  static V permute(V v, __m256i index) {
    asm("" : "+x"(v));
    return _mm256_permutevar8x32_ps(v, index);
  }
  // The first n floats from p (none for n <= 0, all 8 for n >= 8), zeros after; reads nothing past p + n.
  static V load_first(const float* p, int64_t n) { return load_between(p, 0, n); }
  // Lanes [lo, hi) from p + lane (lo and hi may be outside [0, 8)), zeros elsewhere; reads nothing else.
  static V load_between(const float* p, int64_t lo, int64_t hi) { return _mm256_maskload_ps(p, between(lo, hi)); }
  // The lanes whose bit is set in `lanes` from p + lane, zeros elsewhere; reads nothing else.
  static V load_lanes(const float* p, uint32_t lanes) {
    // (Most vectors of a convolution's tile have every lane: a plain load there, where the mask's
    // three steps made the 3x3 layers at batch 8 up to 1.11x slower than before; 0.65-0.99 with it.)
    if (lanes == 0xffu) return _mm256_loadu_ps(p);
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(lanes)), bit), bit);
    return _mm256_maskload_ps(p, set);
  }
  // The first n lanes of v to p (none for n <= 0, all 8 for n >= 8); writes nothing else.
  static void store_first(float* p, V v, int64_t n) { _mm256_maskstore_ps(p, between(0, n), v); }
  // v with the lanes outside [lo, hi) zeroed (+0.0, whatever they held: Inf and NaN too).
  static V keep_between(V v, int64_t lo, int64_t hi) { return _mm256_and_ps(v, _mm256_castsi256_ps(between(lo, hi))); }
  // Lanes 0, 2, 4, ... of the 16 floats a then b.
  static V even(V a, V b) {
    const __m256 pairs = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));  // a0 a2 b0 b2 a4 a6 b4 b6
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(pairs), _MM_SHUFFLE(3, 1, 2, 0)));
  }
  static __m256i between(int64_t lo, int64_t hi) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const auto clamp = [](int64_t v) { return _mm256_set1_epi32(static_cast<int>(v < -1 ? -1 : v > 8 ? 8 : v)); };
    // lo <= lane < hi, as lane > lo - 1 and hi > lane
    return _mm256_and_si256(_mm256_cmpgt_epi32(lanes, clamp(lo - 1)), _mm256_cmpgt_epi32(clamp(hi), lanes));
  }
  static V set1(float f) { return _mm256_set1_ps(f); }
  // kWidth consecutive weights, then weight l of them in every lane (l must fold to a constant: an
  // unrolled loop's counter). Two 128-bit broadcast loads and a shuffle by immediate within each
  // half, where one load and a vpermps per lane needed an index vector in a register per lane:
  // the 8 of them spilled beside a 32-wide panel's 8 partial sums, and vpermps (latency 8 on Zen 3)
  // fed every FMA of a one-vector panel.
  struct Weights {
    __m256 low, high;
  };
  static Weights load_weights(const float* p) {
    return {_mm256_broadcast_ps(reinterpret_cast<const __m128*>(p)),
            _mm256_broadcast_ps(reinterpret_cast<const __m128*>(p + 4))};
  }
  static V weight(const Weights& w, int l) {
    const V quad = l < 4 ? w.low : w.high;
    switch (l % 4) {
      case 0: return _mm256_permute_ps(quad, 0x00);
      case 1: return _mm256_permute_ps(quad, 0x55);
      case 2: return _mm256_permute_ps(quad, 0xaa);
      default: return _mm256_permute_ps(quad, 0xff);
    }
  }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  // acc with a NaN in each lane where v is Inf or NaN (v - v: +0 where finite, NaN where not; OR-ed
  // in, a NaN stays a NaN). A chain of one OR (1 cycle) per vector, where adding 0 x v chained an
  // FMA's 4 cycles onto every copied vector.
  static V mark_nonfinite(V acc, V v) { return _mm256_or_ps(acc, _mm256_sub_ps(v, v)); }
  static bool any_nan(V v) { return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0; }
  // The lanes of a and b where each lane is zero in one of them (bits OR-ed: exact, -0.0 kept).
  static V merge(V a, V b) { return _mm256_or_ps(a, b); }
  static void store(float* p, V v) { _mm256_store_ps(p, v); }  // 32-byte aligned
  static void storeu(float* p, V v) { _mm256_storeu_ps(p, v); }
  // A store past the caches (32-byte aligned); fence() orders a thread's streamed stores before what
  // it does next (they are weakly ordered), so that another thread reading after a barrier sees them.
  static void stream(float* p, V v) { _mm256_stream_ps(p, v); }
  static void fence() { _mm_sfence(); }
  static float sum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};
#endif

#if defined(__AVX512F__)
struct Ops512 {
  using V = __m512;
  static constexpr int kWidth = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_load_ps(p); }  // 64-byte aligned
  static V loadu(const float* p) { return _mm512_loadu_ps(p); }
  static V load_first(const float* p, int64_t n) { return load_between(p, 0, n); }  // as Ops256's
  static V load_between(const float* p, int64_t lo, int64_t hi) { return _mm512_maskz_loadu_ps(between(lo, hi), p); }
  // As Ops256's (a masked load costs what a plain one does here: a branch for full masks measured level).
  static V load_lanes(const float* p, uint32_t lanes) { return _mm512_maskz_loadu_ps(static_cast<__mmask16>(lanes), p); }
  static void store_first(float* p, V v, int64_t n) { _mm512_mask_storeu_ps(p, between(0, n), v); }
  static V even(V a, V b) {
    const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    return _mm512_permutex2var_ps(a, evens, b);
  }
  static __mmask16 between(int64_t lo, int64_t hi) {
    const auto below = [](int64_t n) { return n <= 0 ? 0u : n >= 16 ? 0xffffu : (1u << n) - 1u; };  // lanes < n
    return static_cast<__mmask16>(below(hi) & ~below(lo));
  }
  static V set1(float f) { return _mm512_set1_ps(f); }
  // Lane `lane` of v in every lane (a permute, no load: a constant lane once unrolled).
  static V broadcast_lane(V v, int lane) { return _mm512_permutexvar_ps(_mm512_set1_epi32(lane), v); }
  // As Ops256's: kWidth weights by one load, each spread by broadcast_lane.
  using Weights = V;
  static Weights load_weights(const float* p) { return _mm512_loadu_ps(p); }
  static V weight(Weights w, int l) { return broadcast_lane(w, l); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V mark_nonfinite(V acc, V v) { return _mm512_or_ps(acc, _mm512_sub_ps(v, v)); }  // as Ops256's
  static bool any_nan(V v) { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0; }
  static V merge(V a, V b) { return _mm512_or_ps(a, b); }                                   // as Ops256's
  static void store(float* p, V v) { _mm512_store_ps(p, v); }  // 64-byte aligned
  static void storeu(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void stream(float* p, V v) { _mm512_stream_ps(p, v); }  // 64-byte aligned; as Ops256's
  static void fence() { _mm_sfence(); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
};
#endif

}  // namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY
