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
  // The first n floats from p (none for n <= 0, all 8 for n >= 8), zeros after; reads nothing past p + n.
  static V load_first(const float* p, int64_t n) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lanes));
  }
  static V set1(float f) { return _mm256_set1_ps(f); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static void store(float* p, V v) { _mm256_store_ps(p, v); }  // 32-byte aligned
  static void storeu(float* p, V v) { _mm256_storeu_ps(p, v); }
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
  static V load_first(const float* p, int64_t n) {  // as Ops256's: none for n <= 0, all for n >= 16
    const __mmask16 lanes = n <= 0 ? 0 : n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1u);
    return _mm512_maskz_loadu_ps(lanes, p);
  }
  static V set1(float f) { return _mm512_set1_ps(f); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static void store(float* p, V v) { _mm512_store_ps(p, v); }  // 64-byte aligned
  static void storeu(float* p, V v) { _mm512_storeu_ps(p, v); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
};
#endif

}  // namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY
