#include "cpu/dispatch.h"

#include <stdexcept>

namespace sparsenet::cpu {

namespace {

bool cpu_has(const std::string& isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
  return isa == "fallback";
}

// The kernel table: one entry per format for each ISA.
struct Kernels {
  CsrMatmulFn csr = nullptr;
  BitmapMatmulFn bitmap = nullptr;
  BsrMatmulFn bsr = nullptr;
  NmMatmulFn nm = nullptr;
  CsrConvFn conv = nullptr;
};

Kernels kernels_for(const std::string& isa) {
#ifdef SPARSENET_BUILD_AVX512
  if (isa == "avx512") return {avx512::csr_matmul, avx512::bitmap_matmul, avx512::bsr_matmul, avx512::nm_matmul, avx512::csr_conv2d};
#endif
#ifdef SPARSENET_BUILD_AVX2
  if (isa == "avx2") return {avx2::csr_matmul, avx2::bitmap_matmul, avx2::bsr_matmul, avx2::nm_matmul, avx2::csr_conv2d};
#endif
  if (isa == "fallback") return {fallback::csr_matmul, fallback::bitmap_matmul, fallback::bsr_matmul, fallback::nm_matmul, fallback::csr_conv2d};
  return {};
}

struct Active {
  std::string name;
  Kernels fn;
  Active() {
    const auto isas = supported_isas();
    name = isas.front();
    fn = kernels_for(name);
  }
};

Active& active() {
  static Active a;
  return a;
}

}  // namespace

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
#ifdef SPARSENET_BUILD_AVX512
  out.push_back("avx512");
#endif
#ifdef SPARSENET_BUILD_AVX2
  out.push_back("avx2");
#endif
  out.push_back("fallback");
  return out;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const auto& isa : compiled_isas())
    if (cpu_has(isa)) out.push_back(isa);
  return out;
}

std::string active_isa() { return active().name; }

void set_isa(const std::string& name) {
  bool compiled = false;
  for (const auto& isa : compiled_isas()) compiled |= (isa == name);
  if (!compiled) throw std::invalid_argument("ISA '" + name + "' is not compiled into this build");
  if (!cpu_has(name)) throw std::invalid_argument("this CPU cannot run ISA '" + name + "'");
  active().name = name;
  active().fn = kernels_for(name);
}

CsrMatmulFn csr_matmul_kernel() { return active().fn.csr; }
BitmapMatmulFn bitmap_matmul_kernel() { return active().fn.bitmap; }
BsrMatmulFn bsr_matmul_kernel() { return active().fn.bsr; }
NmMatmulFn nm_matmul_kernel() { return active().fn.nm; }
CsrConvFn csr_conv2d_kernel() { return active().fn.conv; }

}  // namespace sparsenet::cpu
