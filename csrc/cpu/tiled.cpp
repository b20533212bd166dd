#include "cpu/tiled.h"

#include <algorithm>

namespace sparsenet::cpu {

namespace {

// One row's share of one tile: its non-zeros [begin, end) in the CSR view, and how many entries it
// takes in the copy (padding included).
struct Share {
  int64_t begin = 0, end = 0, length = 0;
};

// The zero weights that pad a share of n non-zeros to a multiple of `pad`: none where the share
// already is one, or where it holds every column of its tile (no column left for them; see fill).
int64_t padding(int64_t n, int64_t width, int64_t pad) {
  const int64_t short_by = (pad - n % pad) % pad;
  return n < width ? short_by : 0;
}

// Walks the copy's blocks in order: block(index, shares, first) with the kRows shares of the block's
// chunk in row order (empty for rows past the last) and the tile's first column.
template <typename Idx, typename Block>
void walk(const CsrView& a, const TiledCsr& t, Block&& block) {
  const Idx* cols = static_cast<const Idx*>(a.col_idx);
  std::vector<int64_t> cursor(a.row_ptr, a.row_ptr + a.rows);
  Share shares[TiledCsr::kRows];
  for (int64_t c = 0; c < t.chunks; ++c) {
    const int64_t r0 = c * TiledCsr::kRows, r1 = std::min(a.rows, r0 + TiledCsr::kRows);
    for (int64_t tile = 0; tile < t.tiles; ++tile) {
      const int64_t first = tile * TiledCsr::kCols, width = std::min(TiledCsr::kCols, a.cols - first);
      for (int64_t i = 0; i < TiledCsr::kRows; ++i) {
        Share& s = shares[i];
        s = Share{};
        if (r0 + i >= r1) continue;
        // Columns are sorted within a row (validated), so each row's cursor only moves forward.
        int64_t& k = cursor[r0 + i];
        s.begin = k;
        while (k < a.row_ptr[r0 + i + 1] && static_cast<int64_t>(cols[k]) < first + width) ++k;
        s.end = k;
        s.length = s.end - s.begin + padding(s.end - s.begin, width, t.pad);
      }
      block(c * t.tiles + tile, shares, first);
    }
  }
}

template <typename Idx>
void fill(const CsrView& a, TiledCsr& t) {
  const Idx* cols = static_cast<const Idx*>(a.col_idx);
  int64_t total = 0;
  walk<Idx>(a, t, [&](int64_t, const Share* shares, int64_t) {
    for (int64_t i = 0; i < TiledCsr::kRows; ++i) total += shares[i].length;
  });
  t.col.resize(total);
  t.values.resize(total);
  int64_t n = 0;
  walk<Idx>(a, t, [&](int64_t block, const Share* shares, int64_t first) {
    uint8_t* order = &t.row_of[block * TiledCsr::kRows];
    for (int i = 0; i < TiledCsr::kRows; ++i) order[i] = static_cast<uint8_t>(i);
    if (t.longest_first)
      std::stable_sort(order, order + TiledCsr::kRows,
                       [&](uint8_t p, uint8_t q) { return shares[p].length > shares[q].length; });
    t.block_start[block] = n;
    uint16_t* starts = &t.row_start[block * (TiledCsr::kRows + 1)];
    for (int64_t i = 0; i < TiledCsr::kRows; ++i) {
      const Share& s = shares[order[i]];
      starts[i] = static_cast<uint16_t>(n - t.block_start[block]);
      int64_t unheld = s.end - s.begin;  // the tile's first column the row does not hold
      for (int64_t k = s.begin; k < s.end; ++k, ++n) {
        const int64_t local = static_cast<int64_t>(cols[k]) - first;
        if (unheld == s.end - s.begin && local != k - s.begin) unheld = k - s.begin;
        t.col[n] = static_cast<uint8_t>(local);
        t.values[n] = a.values[k];
      }
      // Padding goes to a column the row does not hold: 0 x Inf there is NaN, which is what the row
      // computes anyway (nonfinite.h sets a row NaN where x is Inf or NaN at a column it does not
      // hold), where at a column it holds it would turn w x Inf into NaN.
      for (int64_t p = s.length - (s.end - s.begin); p > 0; --p, ++n) {
        t.col[n] = static_cast<uint8_t>(unheld);
        t.values[n] = 0.0f;
      }
    }
    starts[TiledCsr::kRows] = static_cast<uint16_t>(n - t.block_start[block]);
  });
  t.block_start[t.chunks * t.tiles] = n;
}

}  // namespace

TiledCsr build_tiled(const CsrView& a, int64_t pad, bool longest_first) {
  TiledCsr t;
  t.rows = a.rows;
  t.cols = a.cols;
  t.chunks = (a.rows + TiledCsr::kRows - 1) / TiledCsr::kRows;
  t.tiles = TiledCsr::tiles_for(a.cols);
  t.pad = std::max<int64_t>(1, pad);
  t.longest_first = longest_first;
  t.block_start.assign(t.chunks * t.tiles + 1, 0);
  t.row_start.assign(t.chunks * t.tiles * (TiledCsr::kRows + 1), 0);
  t.row_of.assign(t.chunks * t.tiles * TiledCsr::kRows, 0);
  if (a.index_bytes == 2) fill<uint16_t>(a, t);
  else fill<int32_t>(a, t);
  return t;
}

}  // namespace sparsenet::cpu
