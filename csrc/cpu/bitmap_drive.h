// The threading skeleton of the bitmap kernels (compiled into each ISA's namespace: capability.h).
// Rows are cut into chunks of equal cost, several per thread, handed out dynamically; a row's cost
// is its stored weights plus a share per 16-column chunk (the mask and the loads of x it takes).
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/bitmap_view.h"
#include "cpu/capability.h"
#include "cpu/panel.h"  // kPrefetchAhead
#include "cpu/work_split.h"

namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY {

inline int64_t bitmap_cost_before(const BitmapView& a, int64_t row) { return a.row_ptr[row] + row * a.chunks / 2; }

// The first row of part p of `parts` (rows cut into parts of equal cost).
inline int64_t bitmap_part_start(const BitmapView& a, int p, int parts) {
  return part_start(a.rows, p, parts, [&](int64_t row) { return bitmap_cost_before(a, row); });
}

// Threads worth waking: below ~25k multiply-adds the fork/join costs more than a second thread
// saves (as for CSR).
inline int bitmap_threads(const BitmapView& a, const DenseArgs& d) {
  return (d.num_threads <= 1 || (bitmap_cost_before(a, a.rows) + a.rows) * d.batch < 24576) ? 1 : d.num_threads;
}

// The look-ahead of the row-pair kernels (rows r and r + 1 read side by side). The pair's
// values are one contiguous region and so are the next pair's: as the pair consumes n values, a
// pointer into the next pair's region moves n values on, and each step asks for the 4 lines (64
// floats) from it, into L2. The look-ahead runs one pair ahead as one linear stream. (Before, each
// row's values were asked for kPrefetchAhead floats on: two streams that ran into each other at the
// rows' ends. One pair ahead: 0.91-0.93x the time at 70%, 0.97x at 50%, 4096 x 4096 from DRAM. A
// loop over exactly the lines the pointer passed was 1.08x slower than before: its trip count,
// 0-3, mispredicted; half a pair ahead was 1.45x slower, one and a half 0.98-1.05x.) The next
// pair's masks go a line (32 chunks) at a time.
//
// kLines: the lines asked for per step of 4 chunks of both rows. The pair consumes 8 * density lines
// a step on average, and the pointer is not line-aligned (4 lines from it cover 3 to 4 whole ones), so
// at densities past about 0.4 four lines leave gaps, each a miss the pair later waits for: there 8
// (wide_look_ahead). 4096 x 4096 from DRAM, new / 4 lines: 50% sparse, 5-8 lines 0.81-0.86 (AVX2
// 0.77); 30% sparse 0.78-0.89. At 70% sparse 5 or 6 lines measured level (0.995-1.02), so sparser
// weights keep 4; a count read at run time instead of a template parameter cost them 3-4%.
template <int kLines>
class PairLookAhead {
 public:
  // At least kPrefetchAhead floats ahead: a pair of short rows is too little to hide DRAM's latency.
  PairLookAhead(const BitmapView& a, int64_t r)
      : a_(a), r_(r), ahead_(std::max(a.row_ptr[std::min(r + 2, a.rows)], a.row_ptr[r] + kPrefetchAhead)) {}

  // Chunk k on, n values of the pair consumed by the step before.
  void step(int64_t k, int64_t n) {
    ahead_ += n;
    if (ahead_ + kLines * kLineFloats <= a_.nnz) {  // (an offset, so that no pointer points past the values)
      const float* p = a_.values + ahead_;
#pragma GCC unroll 8
      for (int i = 0; i < kLines; ++i) to_l2(p + i * kLineFloats);
    }
    if ((k & 31) == 0 && r_ + 3 < a_.rows) {
      to_l2(a_.masks + (r_ + 2) * a_.chunks + k);
      to_l2(a_.masks + (r_ + 3) * a_.chunks + k);
    }
  }

 private:
  static constexpr int64_t kLineFloats = 16;
  // prefetcht1: 0.86-0.95x the time of T0 on AVX-512, which holds an L1 miss buffer per line until
  // it arrives. As volatile asm: GCC 12 dropped __builtin_prefetch calls from the kernels' loops
  // once inlined, and the kernels ran 1.16-1.46x slower.
  static void to_l2(const void* p) {
#if defined(__x86_64__) || defined(__i386__)
    asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#else
    __builtin_prefetch(p, 0, 2);
#endif
  }

  const BitmapView& a_;
  int64_t r_;
  int64_t ahead_;  // the value the look-ahead has reached
};

// Whether the row-pair look-ahead asks for 8 lines a step rather than 4 (PairLookAhead).
inline bool wide_look_ahead(const BitmapView& a) { return density(a) > 0.4; }

// Batches 1 to kMaxBatch in row pairs, the batch a constant for the kernel:
// pair(nb, in_bounds, lines, r) for rows r and r + 1 of each part, single(nb, r) for a part's odd
// last row, with nb = std::integral_constant<int, batch>, in_bounds a std::bool_constant (`reach`
// floats past the pair's last value are still inside the values, so the pair kernel's plain loads
// may run past it) and lines a std::integral_constant<int, 4 or 8> (PairLookAhead's kLines:
// wide_look_ahead). Each ISA's row_pair_in<NB, kInBounds, kLines>.
template <int kMaxBatch, typename PairFn, typename SingleFn>
void bitmap_pairs(const BitmapView& a, const DenseArgs& d, int64_t reach, PairFn pair, SingleFn single) {
  using std::bool_constant;
  using std::integral_constant;
  const bool wide = wide_look_ahead(a);
  with_count<1, kMaxBatch>(d.batch, [&](auto nb) {
    bitmap_drive(a, d, [&](int64_t r0, int64_t r1) {
      int64_t r = r0;
      for (; r + 2 <= r1; r += 2) {
        const bool in = a.nnz - a.row_ptr[r + 2] >= reach;
        if (wide) {
          if (in) pair(nb, bool_constant<true>{}, integral_constant<int, 8>{}, r);
          else pair(nb, bool_constant<false>{}, integral_constant<int, 8>{}, r);
        } else {
          if (in) pair(nb, bool_constant<true>{}, integral_constant<int, 4>{}, r);
          else pair(nb, bool_constant<false>{}, integral_constant<int, 4>{}, r);
        }
      }
      if (r < r1) single(nb, r);
    });
  });
}

// The end of a row pair's kernel: the sums of rows r and r + 1 for each of NB samples (acc0 and acc1,
// each sample's kAlt accumulators added up) plus the bias, to y.
template <typename Ops, int NB, int kAlt>
inline void store_pair_sums(const DenseArgs& d, int64_t r, const typename Ops::V (&acc0)[NB][kAlt],
                            const typename Ops::V (&acc1)[NB][kAlt]) {
  const float b0 = d.bias ? d.bias[r] : 0.0f, b1 = d.bias ? d.bias[r + 1] : 0.0f;
#pragma GCC unroll 8
  for (int i = 0; i < NB; ++i) {
    typename Ops::V s0 = acc0[i][0], s1 = acc1[i][0];
#pragma GCC unroll 2
    for (int j = 1; j < kAlt; ++j) {
      s0 = Ops::add(s0, acc0[i][j]);
      s1 = Ops::add(s1, acc1[i][j]);
    }
    d.y[i * d.ldy + r] = Ops::sum(s0) + b0;
    d.y[i * d.ldy + r + 1] = Ops::sum(s1) + b1;
  }
}

// rows(r0, r1): rows [r0, r1) for every batch entry.
template <typename RowsFn>
void bitmap_drive(const BitmapView& a, const DenseArgs& d, RowsFn rows) {
  const int nt = bitmap_threads(a, d);
  if (nt == 1) {
    rows(int64_t{0}, a.rows);
    return;
  }
  const int parts = static_cast<int>(std::min<int64_t>(std::max<int64_t>(a.rows, 1), int64_t{nt} * 8));
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int p = 0; p < parts; ++p) rows(bitmap_part_start(a, p, parts), bitmap_part_start(a, p + 1, parts));
}

}  // namespace sparsenet::cpu::SPARSENET_CPU_CAPABILITY
