// AVX-512 bitmap kernel: a 16-column chunk decodes with one masked load of its stored weights and
// one register expand (vexpandps) to their columns; up to 8 samples share each decoded chunk.
// (The register form of expand, not the memory one: the memory form is microcoded on Zen 4.)
#include <immintrin.h>

#include <cstring>

#include "cpu/bitmap_drive.h"

// GCC 12's AVX-512 headers initialise their "undefined" vectors as `__m512 __Y = __Y;`, which
// -Wmaybe-uninitialized reports wherever a masked or reducing intrinsic is inlined: a false alarm.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace sparsenet::cpu::avx512 {

namespace {

// The weights of a 16-column chunk with mask `bits`, whose packed values start at v, at their columns.
inline __m512 decode(unsigned bits, const float* v) {
  const __m512 packed = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << __builtin_popcount(bits)) - 1u), v);
  return _mm512_maskz_expand_ps(static_cast<__mmask16>(bits), packed);
}

// Row r for samples [m0, m0 + NB). Four chunks per step from one 64-bit read of their masks: their
// value offsets are popcounts of that one word, so the steps do not wait on each other (a pointer
// advanced chunk by chunk made every chunk wait for the previous popcount), and one sample's sums
// alternate between two accumulators (the FMA latency is not a chain either).
template <int NB>
inline void row(const BitmapView& a, const DenseArgs& d, int64_t r, int64_t m0) {
  constexpr int kAcc = NB <= 4 ? 2 : 1;
  const float* x[NB];
  for (int i = 0; i < NB; ++i) x[i] = d.x + (m0 + i) * d.ldx;
  const uint16_t* mask = a.masks + r * a.chunks;
  const float* v = a.values + a.row_ptr[r];
  const int64_t full = a.cols / kBitmapChunk;  // chunks whose 16 columns all exist
  __m512 acc[NB][kAcc];
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < kAcc; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 4 <= full; k += 4) {
    uint64_t word;
    std::memcpy(&word, mask + k, sizeof word);
    if (!word) continue;
    const int offsets[4] = {0, __builtin_popcountll(word & 0xffffull), __builtin_popcountll(word & 0xffffffffull),
                            __builtin_popcountll(word & 0xffffffffffffull)};
    // Unrolled, so that the accumulators have constant indices and live in registers.
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const unsigned bits = static_cast<unsigned>(word >> (16 * c)) & 0xffffu;
      const __m512 w = decode(bits, v + offsets[c]);
#pragma GCC unroll 8
      for (int i = 0; i < NB; ++i)
        acc[i][c % kAcc] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x[i] + (k + c) * kBitmapChunk), acc[i][c % kAcc]);
    }
    v += __builtin_popcountll(word);
  }
  for (; k < full; ++k) {
    const unsigned bits = mask[k];
    if (!bits) continue;
    const __m512 w = decode(bits, v);
    v += __builtin_popcount(bits);
    for (int i = 0; i < NB; ++i) acc[i][0] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x[i] + k * kBitmapChunk), acc[i][0]);
  }
  if (full < a.chunks && mask[full]) {  // the last chunk, past which x has no columns
    const __mmask16 cols = static_cast<__mmask16>((1u << (a.cols - full * kBitmapChunk)) - 1u);
    const __m512 w = decode(mask[full], v);
    for (int i = 0; i < NB; ++i)
      acc[i][0] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(cols, x[i] + full * kBitmapChunk), acc[i][0]);
  }
  const float b = d.bias ? d.bias[r] : 0.0f;
  for (int i = 0; i < NB; ++i) {
    __m512 sum = acc[i][0];
    for (int j = 1; j < kAcc; ++j) sum = _mm512_add_ps(sum, acc[i][j]);
    d.y[(m0 + i) * d.ldy + r] = _mm512_reduce_add_ps(sum) + b;
  }
}

}  // namespace

void bitmap_matmul(const BitmapView& a, const DenseArgs& d) {
  bitmap_drive(a, d, [&](int64_t r0, int64_t r1) {
    rows_in_sample_blocks(r0, r1, d.batch, [&](auto nb, int64_t r, int64_t m0) { row<decltype(nb)::value>(a, d, r, m0); });
  });
}

}  // namespace sparsenet::cpu::avx512
