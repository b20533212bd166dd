#include "cpu/tiled.h"

#include <algorithm>

namespace sparsenet::cpu {

namespace {

template <typename Idx>
void fill(const CsrView& a, TiledCsr& t) {
  const Idx* cols = static_cast<const Idx*>(a.col_idx);
  std::vector<int64_t> cursor(a.row_ptr, a.row_ptr + a.rows);
  int64_t n = 0;
  for (int64_t c = 0; c < t.chunks; ++c) {
    const int64_t r0 = c * TiledCsr::kRows, r1 = std::min(a.rows, r0 + TiledCsr::kRows);
    for (int64_t tile = 0; tile < t.tiles; ++tile) {
      const int64_t block = c * t.tiles + tile, first = tile * TiledCsr::kCols;
      const int64_t limit = first + TiledCsr::kCols;
      t.block_start[block] = n;
      uint16_t* starts = &t.row_start[block * (TiledCsr::kRows + 1)];
      for (int64_t i = 0; i < TiledCsr::kRows; ++i) {
        starts[i] = static_cast<uint16_t>(n - t.block_start[block]);
        const int64_t r = r0 + i;
        if (r >= r1) continue;
        // Columns are sorted within a row (validated), so each row's cursor only moves forward.
        for (int64_t& k = cursor[r]; k < a.row_ptr[r + 1] && static_cast<int64_t>(cols[k]) < limit; ++k, ++n) {
          t.col[n] = static_cast<uint8_t>(static_cast<int64_t>(cols[k]) - first);
          t.values[n] = a.values[k];
        }
      }
      starts[TiledCsr::kRows] = static_cast<uint16_t>(n - t.block_start[block]);
    }
  }
  t.block_start[t.chunks * t.tiles] = n;
}

}  // namespace

TiledCsr build_tiled(const CsrView& a) {
  TiledCsr t;
  t.rows = a.rows;
  t.cols = a.cols;
  t.chunks = (a.rows + TiledCsr::kRows - 1) / TiledCsr::kRows;
  t.tiles = std::max<int64_t>(1, (a.cols + TiledCsr::kCols - 1) / TiledCsr::kCols);
  t.block_start.assign(t.chunks * t.tiles + 1, 0);
  t.row_start.assign(t.chunks * t.tiles * (TiledCsr::kRows + 1), 0);
  t.col.resize(a.nnz);
  t.values.resize(a.nnz);
  if (a.index_bytes == 2) fill<uint16_t>(a, t);
  else fill<int32_t>(a, t);
  return t;
}

}  // namespace sparsenet::cpu
