#include "cpu/planner.h"

namespace sparsenet::cpu::plan {

bool wants_tiled_csr(const std::string& isa, int64_t batch, double density) {
  if (batch < kPanelMinBatch || isa == "fallback") return false;
  return batch > kWideBatch ? density >= kTiledMinDensityWide : density >= kTiledMinDensityNarrow;
}

bool bitmap_batch_on_csr(const std::string& isa, int64_t batch) {
  return isa == "avx2" && batch >= kBitmapCsrMinBatchAvx2;
}

int64_t bsr_direct_slice(const std::string& isa, int64_t r, int64_t c) {
  if (isa != "avx2" || c < kBsrDirectMinWidth) return 0;
  return r % 16 == 0 ? 16 : 0;
}

}  // namespace sparsenet::cpu::plan
