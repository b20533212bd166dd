// A std::allocator for large arrays the kernels stream through on every call: blocks of at least
// kMinBytes get a fresh private mapping that starts on a 2 MiB boundary, marked MADV_HUGEPAGE before
// first touch, so Linux backs its whole 2 MiB blocks with transparent huge pages (few TLB misses; see
// sparsenet/formats/hugepages.py for the measurement). A fresh mapping, not malloc: glibc serves even
// large requests from memory it already touched once its mmap threshold has grown (it grows when
// torch frees big tensors), and pages already backed by 4 KiB pages stay that way. Smaller blocks,
// and systems without mmap/madvise, get plain aligned memory.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace sparsenet::cpu {

template <typename T>
struct HugePageAllocator {
  using value_type = T;
  static constexpr size_t kHugePage = size_t{2} << 20;
  static constexpr size_t kMinBytes = kHugePage;  // as MIN_BYTES in sparsenet/formats/hugepages.py

  HugePageAllocator() = default;
  template <typename U>
  HugePageAllocator(const HugePageAllocator<U>&) {}

  T* allocate(size_t n) {
    const size_t bytes = n * sizeof(T);
    if (mapped(bytes)) return static_cast<T*>(map_huge(bytes));
    const size_t rounded = (bytes + 63) / 64 * 64;  // aligned_alloc wants a multiple
    void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }

  void deallocate(T* p, size_t n) noexcept {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (mapped(n * sizeof(T))) {
      munmap(p, page_rounded(n * sizeof(T)));
      return;
    }
#endif
    std::free(p);
  }

  template <typename U>
  bool operator==(const HugePageAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const HugePageAllocator<U>&) const { return false; }

 private:
  // Which blocks get a mapping of their own: decided by size alone, so deallocate knows.
  static bool mapped(size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    return bytes >= kMinBytes;
#else
    (void)bytes;
    return false;
#endif
  }

  static size_t page_rounded(size_t bytes) { return (bytes + 4095) / 4096 * 4096; }

#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // `bytes` (rounded up to whole pages) of fresh memory from a 2 MiB boundary, its whole 2 MiB
  // blocks marked for huge pages (advisory: a refusal only costs speed).
  static void* map_huge(size_t bytes) {
    const size_t length = page_rounded(bytes);
    void* raw = mmap(nullptr, length + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) throw std::bad_alloc();
    const uintptr_t start = reinterpret_cast<uintptr_t>(raw), end = start + length + kHugePage;
    const uintptr_t aligned = (start + kHugePage - 1) / kHugePage * kHugePage;
    // Give back what lies outside [aligned, aligned + length), so deallocate unmaps exactly that.
    if (aligned > start) munmap(raw, aligned - start);
    if (end > aligned + length) munmap(reinterpret_cast<void*>(aligned + length), end - (aligned + length));
    madvise(reinterpret_cast<void*>(aligned), bytes / kHugePage * kHugePage, MADV_HUGEPAGE);
    return reinterpret_cast<void*>(aligned);
  }
#else
  static void* map_huge(size_t) { return nullptr; }  // never called: mapped() is false
#endif
};

}  // namespace sparsenet::cpu
