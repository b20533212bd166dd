// What every CUDA kernel entry point shares: the value types, the dense operands, and the rules.
// Raw device pointers and the caller's stream; nothing here synchronises the device, and every
// launch is checked (std::runtime_error naming the CUDA error). No torch headers.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace sparsenet::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// y[m, :] = A x[m, :] (+ bias) for m < batch; x, y and bias in the weight's value type.
struct DenseDevice {
  const void* x = nullptr;  // (batch, cols), rows ldx elements apart
  int64_t batch = 0, ldx = 0;
  void* y = nullptr;  // (batch, rows), rows ldy elements apart
  int64_t ldy = 0;
  const void* bias = nullptr;  // [rows] or null
};

// Throws std::runtime_error("<what> launch failed: ...") if the last launch failed.
void check_launch(const char* what);

}  // namespace sparsenet::cuda
