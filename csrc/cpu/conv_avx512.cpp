// AVX-512 sparse convolution: conv_simd.h with tiles of 32 output pixels (64 measured no faster at 70%
// sparsity and 10-20% slower at 90%, where fewer stored weights per channel amortise less of a tile).
#include "cpu/simd_ops.h"
#include "cpu/conv_simd.h"

namespace sparsenet::cpu::avx512 {

void csr_conv2d(const CsrView& a, const ConvShape& s, const ConvArgs& c, const DirectConv& d) {
  csr_conv2d_simd<Ops512, 2>(a, s, c, d);
}

}  // namespace sparsenet::cpu::avx512
