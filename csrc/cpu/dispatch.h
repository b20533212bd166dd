// Run-time choice of the CPU kernel family.
#pragma once
#include <string>
#include <vector>

#include "cpu/bitmap_view.h"
#include "cpu/bsr_view.h"
#include "cpu/conv.h"
#include "cpu/nm_view.h"
#include "cpu/csr_view.h"

namespace sparsenet::cpu {

std::vector<std::string> compiled_isas();   // what this binary contains, best first
std::vector<std::string> supported_isas();  // what this binary contains and this CPU can run
std::string active_isa();
void set_isa(const std::string& name);      // throws std::invalid_argument if unknown/unsupported
CsrMatmulFn csr_matmul_kernel();
BitmapMatmulFn bitmap_matmul_kernel();
BsrMatmulFn bsr_matmul_kernel();
NmMatmulFn nm_matmul_kernel();
CsrConvFn csr_conv2d_kernel();

}  // namespace sparsenet::cpu
