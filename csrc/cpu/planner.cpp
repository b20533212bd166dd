#include "cpu/planner.h"

#include <atomic>
#include <fstream>
#include <string>

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

namespace {

// One of Linux's cache sizes ("32768K", "1M"), in bytes; 0 where unreadable.
int64_t listed_bytes(const std::string& text) {
  size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    return 0;
  }
  const std::string unit = text.substr(used);
  if (unit.rfind("K", 0) == 0) return value << 10;
  if (unit.rfind("M", 0) == 0) return value << 20;
  return value;
}

int64_t read_last_level_cache_bytes() {
  int64_t best_level = 0, bytes = 0;
  for (int index = 0; index < 16; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), type_file(dir + "type"), size_file(dir + "size");
    int64_t level = 0;
    std::string type, size;
    if (!(level_file >> level) || !(type_file >> type) || !(size_file >> size)) continue;
    if (type == "Instruction" || level < best_level) continue;
    best_level = level;
    bytes = listed_bytes(size);
  }
  return bytes;
}

}  // namespace

int64_t last_level_cache_bytes() {
  static const int64_t bytes = read_last_level_cache_bytes();
  return bytes;
}

namespace {
std::atomic<int64_t> g_stream_floor{-1};
}  // namespace

bool streams_conv_output(int64_t output_bytes) {
  const int64_t floor = g_stream_floor.load(std::memory_order_relaxed);
  if (floor >= 0) return output_bytes > floor;
  const int64_t cache = last_level_cache_bytes();
  return cache > 0 && output_bytes > cache / 3;
}

int64_t set_conv_stream_floor(int64_t bytes) { return g_stream_floor.exchange(bytes < 0 ? -1 : bytes); }

}  // namespace sparsenet::cpu::plan
