// A second, column-tiled copy of a validated CSR weight, for the large-batch panel kernels.
//
// At batch >= 16 the panel kernel reads, for every non-zero, one row of the transposed input panel
// (16-32 floats). Row by row over all columns, that panel (cols x W floats) lives in L2 and every
// non-zero pays an L2 read; cut into tiles of kCols columns and chunks of kRows rows, one tile of
// the panel is reused by all the chunk's rows while it sits in L1 (1.26x at 90%, 1.5x at 50-70%
// on 4096x4096, batch 32, standalone). Built once per handle, from the already validated view, so
// it needs no validation of its own; it costs about 5 bytes per non-zero more memory.
//
// Layout: non-zeros ordered by (row chunk, column tile, row share, column). Block (c, t) holds chunk
// c's non-zeros in tile t, starting at block_start[c * tiles + t]; its i-th row share starts at the
// uint16 offset row_start[(c * tiles + t) * (kRows + 1) + i] (i <= kRows, relative to the block)
// and belongs to row row_of[(c * tiles + t) * kRows + i] of the chunk, and each
// non-zero keeps its column relative to the tile's first column as one byte. With `pad` > 1, each
// row's share of a tile is padded with zero weights to a multiple of `pad` non-zeros (where the row
// leaves a column of the tile free for them; plan::tiled_row_padding says when). With
// `longest_first`, a block holds its shares longest first (plan::tiled_longest_first); row_of maps a
// block's i-th share to its row of the chunk either way.
#pragma once
#include <cstdint>
#include <vector>

#include "cpu/csr_view.h"
#include "cpu/huge_alloc.h"

namespace sparsenet::cpu {

struct TiledCsr {
  static constexpr int64_t kRows = 64;
  static constexpr int64_t kCols = 256;  // local columns fit a byte
  int64_t rows = 0, cols = 0, chunks = 0, tiles = 0, pad = 1;
  bool longest_first = false;
  static int64_t tiles_for(int64_t cols) { return cols > kCols ? (cols + kCols - 1) / kCols : 1; }
  std::vector<int64_t> block_start;
  std::vector<uint16_t> row_start;  // a block holds at most kRows * kCols = 16384 non-zeros
  std::vector<uint8_t> row_of;       // row_of[block * kRows + i]: the chunk row of block's i-th share
  std::vector<uint8_t, HugePageAllocator<uint8_t>> col;  // streamed on every call: huge pages
  std::vector<float, HugePageAllocator<float>> values;
};

TiledCsr build_tiled(const CsrView& a, int64_t pad = 1, bool longest_first = false);

}  // namespace sparsenet::cpu
