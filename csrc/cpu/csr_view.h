// A validated, non-owning view of a packed CSR weight and the kernel entry points that read it.
//
// Packed layout (the contract with sparsenet/formats/csr.py, pinned by tests/formats):
//   row_ptr  int64[rows + 1], row_ptr[0] == 0, non-decreasing, row_ptr[rows] == nnz
//   col_idx  uint16[nnz] when cols <= 65536, else int32[nnz]; strictly increasing within a row
//   values   float32[nnz]
// The view never owns memory: the Python side keeps the buffers alive and unchanged while a view of
// them is in use (sparsenet/ops/handles.py checks liveness and version counters on every call).
#pragma once
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

// y[m, :] = A x[m, :] (+ bias) for m < batch. x rows are ldx apart, y rows ldy apart (in floats).
struct DenseArgs {
  const float* x = nullptr;
  int64_t batch = 0;
  int64_t ldx = 0;
  float* y = nullptr;
  int64_t ldy = 0;
  const float* bias = nullptr;  // may be null
  int num_threads = 1;
};

using CsrMatmulFn = void (*)(const CsrView&, const DenseArgs&);

// Row range [begin, end) of part `part` out of `parts`, balanced by non-zeros (a row is never split).
inline void balanced_rows(const CsrView& a, int part, int parts, int64_t* begin, int64_t* end) {
  auto row_at = [&](int p) -> int64_t {
    if (p <= 0) return 0;
    if (p >= parts) return a.rows;
    const int64_t target = (a.nnz * p) / parts;
    // first row whose start offset is >= target
    int64_t lo = 0, hi = a.rows;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (a.row_ptr[mid] < target) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  *begin = row_at(part);
  *end = row_at(part + 1);
}

// Fraction of entries that are non-zero (0 for an empty shape): kernels pick layouts by it.
inline double density(const CsrView& a) {
  const double total = static_cast<double>(a.rows) * static_cast<double>(a.cols);
  return total > 0 ? static_cast<double>(a.nnz) / total : 0.0;
}

#ifndef SPARSENET_MIN_PARALLEL_WORK
#define SPARSENET_MIN_PARALLEL_WORK 24576
#endif

// Threads worth waking for this much work: below ~10 us of single-thread work (about 25k non-zero
// multiply-adds) the fork/join costs more than the second thread saves. With a warm pool (layers
// run back to back) two threads win from there on: measured on 384x1536 / 1536x384 at 90-95%
// sparsity, batch 1 (benchmarks/speedup_table.py), against a threshold five times higher.
inline int threads_for(const CsrView& a, int64_t batch, int requested) {
  const int64_t work = (a.nnz + a.rows) * batch;
  if (requested <= 1 || work < SPARSENET_MIN_PARALLEL_WORK) return 1;
  return requested;
}

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
