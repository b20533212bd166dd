// AVX2 N:M kernel for small batches: as the AVX-512 one with 8 slots (16 columns) per step; AVX2
// has no two-source permute, so each half of the 16 columns is permuted and the two are blended.
#include <immintrin.h>

#include <cstring>

#include "cpu/nm_drive.h"
#include "cpu/panel.h"
#include "cpu/simd_ops.h"

namespace sparsenet::cpu::avx2 {

namespace {

template <int kBits>
float row_dot(const NmView& a, const float* x, int64_t r) {
  alignas(32) int32_t shift[8], base[8];
  for (int l = 0; l < 8; ++l) {
    shift[l] = static_cast<int32_t>(l * kBits);
    base[l] = static_cast<int32_t>((l / a.n) * a.m);
  }
  const __m256i shifts = _mm256_load_si256(reinterpret_cast<const __m256i*>(shift));
  const __m256i bases = _mm256_load_si256(reinterpret_cast<const __m256i*>(base));
  const __m256i field = _mm256_set1_epi32((1 << kBits) - 1), seven = _mm256_set1_epi32(7);
  const float* v = a.values + r * a.slots();
  const uint8_t* idx = a.indices + r * a.row_bytes;
  const int64_t steps = std::min(a.slots() / 8, a.cols / 16);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  const auto step = [&](int64_t s, __m256 acc) {
    uint32_t w = 0;
    std::memcpy(&w, idx + s * kBits, kBits);  // 8 slots: 2 or 4 bytes
    const __m256i cols = _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w)),
                                                                             shifts), field), bases);
    const __m256 lo = Ops256::permute(_mm256_loadu_ps(x + 16 * s), cols);
    const __m256 hi = Ops256::permute(_mm256_loadu_ps(x + 16 * s + 8), cols);
    const __m256 xs = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_cmpgt_epi32(cols, seven)));
    return _mm256_fmadd_ps(_mm256_loadu_ps(v + 8 * s), xs, acc);
  };
  int64_t t = 0;
  for (; t + 2 <= steps; t += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(v + 8 * t + kPrefetchAhead), _MM_HINT_T0);
    acc0 = step(t, acc0);
    acc1 = step(t + 1, acc1);
  }
  if (t < steps) acc0 = step(t++, acc0);
  __m256 s = _mm256_add_ps(acc0, acc1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h) + nm_row_tail(a, x, r, 8 * steps);
}

}  // namespace

void nm_matmul(const NmView& a, const DenseArgs& d) {
  nm_run(a, d, [&](const float* x, int64_t r) { return row_dot<2>(a, x, r); },
         [&](const float* x, int64_t r) { return row_dot<4>(a, x, r); });
}

}  // namespace sparsenet::cpu::avx2
