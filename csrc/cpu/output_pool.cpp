#include "cpu/output_pool.h"

#include <new>

#include "cpu/huge_alloc.h"

namespace sparsenet::cpu {

namespace {

using Bytes = HugePageAllocator<char>;

// Capacities are whole huge pages, so every block is huge-page backed and serves any output up to it.
size_t rounded(size_t bytes) { return (bytes + Bytes::kHugePage - 1) / Bytes::kHugePage * Bytes::kHugePage; }

}  // namespace

OutputPool& OutputPool::instance() {
  static OutputPool* pool = new OutputPool();  // (leaked on purpose: see the header)
  return *pool;
}

void* OutputPool::take(size_t bytes, size_t* capacity) {
  const size_t want = rounded(bytes);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    // The most recently freed block that fits without wasting more than half the request (its
    // lines may still be in cache).
    for (size_t i = free_.size(); i-- > 0;) {
      const auto [data, size] = free_[i];
      if (size >= want && size <= want + want / 2) {
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
        free_bytes_ -= size;
        *capacity = size;
        return data;
      }
    }
  }
  *capacity = want;
  return Bytes().allocate(want);
}

void OutputPool::give(void* data, size_t capacity) {
  std::vector<std::pair<void*, size_t>> evicted;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.emplace_back(data, capacity);
    free_bytes_ += capacity;
    while (free_.size() > kMaxBuffers || free_bytes_ > kMaxBytes) {
      evicted.push_back(free_.front());
      free_bytes_ -= free_.front().second;
      free_.erase(free_.begin());
    }
  }
  for (const auto& [p, size] : evicted) Bytes().deallocate(static_cast<char*>(p), size);  // (outside the lock)
}

size_t OutputPool::release() {
  std::vector<std::pair<void*, size_t>> all;
  size_t bytes;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    all.swap(free_);
    bytes = free_bytes_;
    free_bytes_ = 0;
  }
  for (const auto& [p, size] : all) Bytes().deallocate(static_cast<char*>(p), size);
  return bytes;
}

void OutputPool::reset_after_fork() {
  // (Constructed anew over the old ones, not destroyed: their state may be mid-update.)
  new (&mutex_) std::mutex();
  new (&free_) std::vector<std::pair<void*, size_t>>();
  free_bytes_ = 0;
}

size_t OutputPool::kept_bytes() {
  std::lock_guard<std::mutex> lock(mutex_);
  return free_bytes_;
}

}  // namespace sparsenet::cpu
