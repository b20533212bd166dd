// A validated, non-owning view of a packed CSR weight and the kernel entry points that read it.
//
// Packed layout (the contract with sparsenet/formats/csr.py, pinned by tests/formats):
//   row_ptr  int64[rows + 1], row_ptr[0] == 0, non-decreasing, row_ptr[rows] == nnz
//   col_idx  uint16[nnz] when cols <= 65536, else int32[nnz]; strictly increasing within a row
//   values   float32[nnz]
// The view never owns memory: the Python side keeps the buffers alive and unchanged while a view of
// them is in use (sparsenet/ops/handles.py checks liveness and version counters on every call).
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace sparsenet {

namespace cpu { struct TiledCsr; }

struct CsrView {
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t nnz = 0;
  const int64_t* row_ptr = nullptr;
  const void* col_idx = nullptr;
  int index_bytes = 2;  // 2 (uint16) or 4 (int32)
  const float* values = nullptr;
  // Optional column-tiled copy (cpu/tiled.h) for kernels that use it at large batch; may be null.
  const cpu::TiledCsr* tiled = nullptr;
};

// Throws std::invalid_argument naming the first broken invariant. O(rows + nnz), run once per handle.
void validate_csr(const CsrView& a);

// What a kernel learnt about x's values while it loaded them (DenseArgs::x_check).
struct XCheck {
  std::atomic<bool> checked{false};    // every value of x was loaded and checked
  std::atomic<bool> nonfinite{false};  // and one of them is Inf or NaN
};

// y[m, :] = A x[m, :] (+ bias) for m < batch. x rows are ldx apart, y rows ldy apart (in floats).
struct DenseArgs {
  const float* x = nullptr;
  int64_t batch = 0;
  int64_t ldx = 0;
  float* y = nullptr;
  int64_t ldy = 0;
  const float* bias = nullptr;  // may be null
  int num_threads = 1;
  // May be null. The batch-panel kernels, which load all of x to transpose it, check it for Inf and
  // NaN as they do and record it here (record_x_check, cpu/nonfinite.h); propagate_nonfinite then skips its own
  // scan, a second pass over x (4% of a CSR call at 1,024 x 1,536 inputs).
  XCheck* x_check = nullptr;
};

using CsrMatmulFn = void (*)(const CsrView&, const DenseArgs&);

// Gives y the dense layer's answer where x holds Inf or NaN. The kernels add up only the stored
// products, but a dense layer also multiplies each pruned (zero) weight by its x, and 0 x Inf or
// 0 x NaN is NaN: so y[m, r] becomes NaN wherever sample m has a non-finite x in a column row r
// does not store. Every other output is already what dense gives (Inf and NaN in stored columns
// propagate through the kernels' own arithmetic). Costs one scan of x; rows are only visited for
// samples that hold a non-finite value.
void propagate_nonfinite(const CsrView& a, const DenseArgs& d);

namespace cpu {
namespace fallback { void csr_matmul(const CsrView&, const DenseArgs&); }
#ifdef SPARSENET_BUILD_AVX2
namespace avx2 { void csr_matmul(const CsrView&, const DenseArgs&); }
#endif
#ifdef SPARSENET_BUILD_AVX512
namespace avx512 { void csr_matmul(const CsrView&, const DenseArgs&); }
#endif
}  // namespace cpu

}  // namespace sparsenet
