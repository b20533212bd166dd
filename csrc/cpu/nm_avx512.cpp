// AVX-512 N:M kernel for small batches. Where M = 2N (1:2, 2:4, 4:8, 8:16), 16 slots span exactly 32
// columns: their 2- or 4-bit indices, read as one word, become 16 lane indices (one broadcast, one
// variable shift, a mask and the groups' first columns), and one two-source permute picks their x
// from the 32 columns; an FMA with the 16 packed values follows. Other patterns, and the slots past
// the last full 32 columns, go slot by slot.
#include <immintrin.h>

#include <cstring>

#include "cpu/nm_drive.h"
#include "cpu/panel.h"

namespace sparsenet::cpu::avx512 {

namespace {

template <int kBits>
inline __m512i fields_at(const uint8_t* idx, int64_t t, __m512i shifts) {
  if constexpr (kBits == 2) {
    uint32_t w;
    std::memcpy(&w, idx + 4 * t, sizeof w);
    return _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(w)), shifts);
  } else {
    uint64_t w;
    std::memcpy(&w, idx + 8 * t, sizeof w);
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(static_cast<int>(w))),
                                            _mm256_set1_epi32(static_cast<int>(w >> 32)), 1);
    return _mm512_srlv_epi32(both, shifts);
  }
}

template <int kBits>
float row_dot(const NmView& a, const float* x, int64_t r) {
  // Lane l holds slot l of a 16-slot step: bits l * kBits of the step's word (4 bits: lanes 8-15 read the
  // upper 32), and belongs to group l / n, whose first column is (l / n) * m.
  alignas(64) int32_t shift[16], base[16];
  for (int l = 0; l < 16; ++l) {
    shift[l] = static_cast<int32_t>((l * kBits) % 32);
    base[l] = static_cast<int32_t>((l / a.n) * a.m);
  }
  const __m512i shifts = _mm512_load_si512(shift), bases = _mm512_load_si512(base);
  const __m512i field = _mm512_set1_epi32((1 << kBits) - 1);
  const float* v = a.values + r * a.slots();
  const uint8_t* idx = a.indices + r * a.row_bytes;
  const int64_t steps = std::min(a.slots() / 16, a.cols / 32);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t t = 0;
  const auto step = [&](int64_t s, __m512 acc) {
    const __m512i cols = _mm512_add_epi32(_mm512_and_si512(fields_at<kBits>(idx, s, shifts), field), bases);
    const __m512 w = _mm512_permutex2var_ps(_mm512_loadu_ps(x + 32 * s), cols, _mm512_loadu_ps(x + 32 * s + 16));
    return _mm512_fmadd_ps(_mm512_loadu_ps(v + 16 * s), w, acc);
  };
  for (; t + 2 <= steps; t += 2) {
    // Into L2 (T1): 0.90-0.96x the time of T0 on 4096 x 4096 from DRAM (ab_native.py --format nm), as
    // for the bitmap kernel; CSR's batch-1 kernel measured 1.08-1.26x slower with T1, so it keeps T0.
    _mm_prefetch(reinterpret_cast<const char*>(v + 16 * t + kPrefetchAhead), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(v + 16 * t + 16 + kPrefetchAhead), _MM_HINT_T1);
    acc0 = step(t, acc0);
    acc1 = step(t + 1, acc1);
  }
  if (t < steps) acc0 = step(t++, acc0);
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + nm_row_tail(a, x, r, 16 * steps);
}

}  // namespace

void nm_matmul(const NmView& a, const DenseArgs& d) {
  nm_run(a, d, [&](const float* x, int64_t r) { return row_dot<2>(a, x, r); },
         [&](const float* x, int64_t r) { return row_dot<4>(a, x, r); });
}

}  // namespace sparsenet::cpu::avx512
