// A std::allocator for large arrays the kernels stream through on every call: blocks of at least
// kMinBytes start on a 2 MiB boundary and are marked MADV_HUGEPAGE before first touch, so Linux
// backs them with transparent huge pages (few TLB misses; see sparsenet/formats/hugepages.py for the
// measurement). Smaller blocks, and systems without madvise, get plain aligned memory.
#pragma once
#include <cstddef>
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
    const size_t align = bytes >= kMinBytes ? kHugePage : 64;
    const size_t rounded = (bytes + align - 1) / align * align;  // aligned_alloc wants a multiple
    void* p = std::aligned_alloc(align, rounded == 0 ? align : rounded);
    if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // Whole 2 MiB blocks only; advisory, so a refusal only costs speed.
    if (align == kHugePage) madvise(p, bytes / kHugePage * kHugePage, MADV_HUGEPAGE);
#endif
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) noexcept { std::free(p); }

  template <typename U>
  bool operator==(const HugePageAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const HugePageAllocator<U>&) const { return false; }
};

}  // namespace sparsenet::cpu
