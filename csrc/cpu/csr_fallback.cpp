// Portable kernel: plain C++ that any compiler and CPU can run; the reference path the SIMD
// variants are tested against besides the float64 torch reference.
#include "cpu/csr_view.h"
#include "cpu/driver.h"

namespace sparsenet::cpu::fallback {

namespace {
template <typename Idx>
void rows_kernel(const CsrView& a, const Idx* col, const DenseArgs& d, int64_t r0, int64_t r1) {
  for (int64_t m = 0; m < d.batch; ++m) {
    const float* x = d.x + m * d.ldx;
    float* y = d.y + m * d.ldy;
    for (int64_t r = r0; r < r1; ++r) {
      float s0 = 0.f, s1 = 0.f;  // two chains so the adds overlap
      int64_t k = a.row_ptr[r];
      const int64_t end = a.row_ptr[r + 1];
      for (; k + 1 < end; k += 2) {
        s0 += a.values[k] * x[col[k]];
        s1 += a.values[k + 1] * x[col[k + 1]];
      }
      if (k < end) s0 += a.values[k] * x[col[k]];
      y[r] = s0 + s1 + (d.bias ? d.bias[r] : 0.f);
    }
  }
}

template <typename Idx>
void run(const CsrView& a, const DenseArgs& d) {
  const Idx* col = static_cast<const Idx*>(a.col_idx);
  drive(a, d, 1, 1, false, [&](int64_t r0, int64_t r1) { rows_kernel(a, col, d, r0, r1); },
        [](const float*, int64_t, int64_t, int64_t, int64_t, int64_t) {});
}

}  // namespace

void csr_matmul(const CsrView& a, const DenseArgs& d) {
  if (a.index_bytes == 2) run<uint16_t>(a, d);
  else run<int32_t>(a, d);
}

}  // namespace sparsenet::cpu::fallback
