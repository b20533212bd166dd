#include "cuda/common.h"

#include <stdexcept>
#include <string>

namespace sparsenet::cuda {

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + " launch failed: " + cudaGetErrorString(err));
}

}  // namespace sparsenet::cuda
