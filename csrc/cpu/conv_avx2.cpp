// AVX2 sparse convolution: conv_simd.h with 8-float vectors.
#include "cpu/simd_ops.h"
#include "cpu/conv_simd.h"

namespace sparsenet::cpu::avx2 {

bool csr_conv2d(const CsrView& a, const ConvShape& s, const ConvArgs& c, const DirectConv& d) {
  return csr_conv2d_simd<Ops256>(a, s, c, d);
}

}  // namespace sparsenet::cpu::avx2
