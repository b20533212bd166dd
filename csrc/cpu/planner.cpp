#include "cpu/planner.h"

#include <atomic>

namespace sparsenet::cpu::plan {

bool wants_tiled_csr(const std::string& isa, int64_t batch, double density) {
  if (batch < kPanelMinBatch || isa == "fallback") return false;
  const bool avx2 = isa == "avx2";
  if (batch > kWideBatch) return density >= (avx2 ? kTiledMinDensityWideAvx2 : kTiledMinDensityWide);
  return density >= (avx2 ? kTiledMinDensityNarrowAvx2 : kTiledMinDensityNarrow);
}

int64_t tiled_row_padding(const std::string& isa, double density, int64_t row_shares) {
  const bool pads = isa == "avx2" && density >= kTiledPadMinDensity && row_shares >= kTiledPadMinShares;
  return pads ? kTiledPadLanes : 1;
}

bool tiled_longest_first(const std::string& isa) { return isa == "avx2"; }

bool bitmap_batch_on_csr(const std::string& isa, int64_t batch) {
  return isa == "avx2" && batch >= kBitmapCsrMinBatchAvx2;
}

bool batch_on_derived_csr(const std::string& format, const std::string& isa, int64_t batch) {
  if (format == "bitmap") return bitmap_batch_on_csr(isa, batch);
  if (format == "nm") return nm_batch_on_csr(batch);
  return false;
}

int64_t bsr_direct_slice(const std::string& isa, int64_t r, int64_t c) {
  if (isa != "avx2" || c < kBsrDirectMinWidth) return 0;
  return r % 16 == 0 ? 16 : 0;
}

namespace {
std::atomic<int64_t> g_last_level_cache{0};
}  // namespace

int64_t last_level_cache_bytes() { return g_last_level_cache.load(std::memory_order_relaxed); }

int64_t set_last_level_cache_bytes(int64_t bytes) { return g_last_level_cache.exchange(bytes > 0 ? bytes : 0); }

bool prefetches_conv_input(int64_t input_bytes) {
  const int64_t cache = last_level_cache_bytes();
  return cache > 0 && input_bytes > cache / 4;
}

int64_t tiled_panel_group(int64_t weight_bytes) {
  const int64_t cache = last_level_cache_bytes();
  return cache > 0 && weight_bytes > cache / 4 ? kTiledPanelGroupStreamed : kTiledPanelGroup;
}

int64_t tiled_chunks_per_job(int vector_width, int64_t full_panel_width, int64_t chunks, int64_t panels,
                             int threads) {
  const int64_t jobs = (chunks + kTiledMaxChunksPerJob - 1) / kTiledMaxChunksPerJob * panels;
  const bool pairs = vector_width == 8 && full_panel_width == 32 && jobs >= kTiledMinJobsPerThread * threads;
  return pairs ? kTiledMaxChunksPerJob : 1;
}

bool streams_conv_output(int64_t output_bytes) {
  const int64_t cache = last_level_cache_bytes();
  return cache > 0 && output_bytes > cache / 3;
}

}  // namespace sparsenet::cpu::plan
