#include "cpu/tiled.h"

#include <algorithm>

namespace sparsenet::cpu {

namespace {

// Walks the copy's blocks in order, each row's share of each tile once: share(block, i, begin, end,
// first, width) for row i of the block's chunk with the row's non-zeros [begin, end) in the CSR
// view (empty for rows past the last), the tile's first column and its width.
template <typename Idx, typename Share>
void walk(const CsrView& a, const TiledCsr& t, Share&& share) {
  const Idx* cols = static_cast<const Idx*>(a.col_idx);
  std::vector<int64_t> cursor(a.row_ptr, a.row_ptr + a.rows);
  for (int64_t c = 0; c < t.chunks; ++c) {
    const int64_t r0 = c * TiledCsr::kRows, r1 = std::min(a.rows, r0 + TiledCsr::kRows);
    for (int64_t tile = 0; tile < t.tiles; ++tile) {
      const int64_t first = tile * TiledCsr::kCols, width = std::min(TiledCsr::kCols, a.cols - first);
      for (int64_t i = 0; i < TiledCsr::kRows; ++i) {
        const int64_t r = r0 + i;
        int64_t begin = 0, end = 0;
        if (r < r1) {
          // Columns are sorted within a row (validated), so each row's cursor only moves forward.
          begin = end = cursor[r];
          while (end < a.row_ptr[r + 1] && static_cast<int64_t>(cols[end]) < first + width) ++end;
          cursor[r] = end;
        }
        share(c * t.tiles + tile, i, begin, end, first, width);
      }
    }
  }
}

// The zero weights that pad a share of n non-zeros to a multiple of `pad`: none where the share
// already is one, or where it holds every column of its tile (no column left for them; see below).
int64_t padding(int64_t n, int64_t width, int64_t pad) {
  const int64_t short_by = (pad - n % pad) % pad;
  return n < width ? short_by : 0;
}

template <typename Idx>
void fill(const CsrView& a, int64_t pad, TiledCsr& t) {
  const Idx* cols = static_cast<const Idx*>(a.col_idx);
  int64_t total = 0;
  walk<Idx>(a, t, [&](int64_t, int64_t, int64_t begin, int64_t end, int64_t, int64_t width) {
    total += end - begin + padding(end - begin, width, pad);
  });
  t.col.resize(total);
  t.values.resize(total);
  int64_t n = 0;
  walk<Idx>(a, t, [&](int64_t block, int64_t i, int64_t begin, int64_t end, int64_t first, int64_t width) {
    if (i == 0) t.block_start[block] = n;
    uint16_t* starts = &t.row_start[block * (TiledCsr::kRows + 1)];
    starts[i] = static_cast<uint16_t>(n - t.block_start[block]);
    int64_t unheld = end - begin;  // the tile's first column the row does not hold
    for (int64_t k = begin; k < end; ++k, ++n) {
      const int64_t local = static_cast<int64_t>(cols[k]) - first;
      if (unheld == end - begin && local != k - begin) unheld = k - begin;
      t.col[n] = static_cast<uint8_t>(local);
      t.values[n] = a.values[k];
    }
    // Padding goes to a column the row does not hold: 0 x Inf there is NaN, which is what the row
    // computes anyway (nonfinite.h sets a row NaN where x is Inf or NaN at a column it does not hold),
    // where at a column it holds it would turn w x Inf into NaN.
    for (int64_t p = padding(end - begin, width, pad); p > 0; --p, ++n) {
      t.col[n] = static_cast<uint8_t>(unheld);
      t.values[n] = 0.0f;
    }
    if (i == TiledCsr::kRows - 1) starts[TiledCsr::kRows] = static_cast<uint16_t>(n - t.block_start[block]);
  });
  t.block_start[t.chunks * t.tiles] = n;
}

}  // namespace

TiledCsr build_tiled(const CsrView& a, int64_t pad) {
  TiledCsr t;
  t.rows = a.rows;
  t.cols = a.cols;
  t.chunks = (a.rows + TiledCsr::kRows - 1) / TiledCsr::kRows;
  t.tiles = TiledCsr::tiles_for(a.cols);
  t.pad = std::max<int64_t>(1, pad);
  t.block_start.assign(t.chunks * t.tiles + 1, 0);
  t.row_start.assign(t.chunks * t.tiles * (TiledCsr::kRows + 1), 0);
  if (a.index_bytes == 2) fill<uint16_t>(a, t.pad, t);
  else fill<int32_t>(a, t.pad, t);
  return t;
}

}  // namespace sparsenet::cpu
