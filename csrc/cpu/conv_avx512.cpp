// AVX-512 sparse convolution: conv_simd.h with 16-float vectors.
#include "cpu/simd_ops.h"
#include "cpu/conv_simd.h"

namespace sparsenet::cpu::avx512 {

bool csr_conv2d(const CsrView& a, const ConvShape& s, const ConvArgs& c, const DirectConv& d) {
  return csr_conv2d_simd<Ops512>(a, s, c, d);
}

}  // namespace sparsenet::cpu::avx512
