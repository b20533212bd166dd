// Where the CPU module's large outputs live: a few huge-page mappings kept for reuse.
//
// A layer's output is a fresh tensor on every call. glibc serves requests above its mmap threshold
// with a fresh mapping, and every 4 KiB page of that faults on first write. The threshold grows with
// the blocks a process frees, so most outputs come back from memory already touched, but never
// past 32 MiB: an output that large (MobileNetV2's first expansion, 8 x 96 x 112 x 112 floats, 37
// MiB) is faulted in page by page on every call, 9-14 ms to fill against 1 ms filled again, most of
// that layer's time at 90% sparsity. Outputs of at least kMinBytes therefore come from this pool: a
// buffer an earlier call's tensor gave back (its pages already there) of about the same size, or
// else a new mapping in huge pages (37 MiB fresh: 2.7 ms). From 2 MiB up instead the pool measured
// slower on layers glibc had served from touched memory (4.8 MiB: 1.33x the time), and level on
// whole models (ResNet-18 at batch 8, BERT-base at 4,096 tokens).
//
// A convolution output the kernel writes past the caches (conv.h's stream_output) comes from the
// pool at any size: nothing reads it from the cache, so the huge-page buffers cost it nothing, and
// glibc had faulted it in page by page beside other layers' calls (module_cpu.cpp's new_output).
//
// It keeps at most kMaxBuffers freed buffers and kMaxBytes in all; past either, the oldest are
// unmapped; release() unmaps them all. Thread-safe: tensors die on any thread.
#pragma once
#include <cstddef>
#include <mutex>
#include <utility>
#include <vector>

namespace sparsenet::cpu {

class OutputPool {
 public:
  static constexpr size_t kMinBytes = size_t{32} << 20;
  static constexpr size_t kMaxBuffers = 4;
  static constexpr size_t kMaxBytes = size_t{256} << 20;

  // The process's pool. Never destroyed: tensors freed during interpreter shutdown still give back.
  static OutputPool& instance();

  // At least `bytes` (>= kMinBytes, or a streamed output's size) of 64-byte aligned memory, contents
  // undefined; *capacity is set to the block's real size, which give() wants back.
  void* take(size_t bytes, size_t* capacity);
  void give(void* data, size_t capacity);

  // Unmaps every buffer kept; returns how many bytes that gave back.
  size_t release();
  size_t kept_bytes();

  // In the child of a fork(), where another thread may have held the lock: a fresh, empty state
  // (the parent's kept buffers stay mapped in the child, unused).
  void reset_after_fork();

 private:
  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> free_;  // oldest first
  size_t free_bytes_ = 0;
};

}  // namespace sparsenet::cpu
