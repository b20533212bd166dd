// The kernel planner: every threshold that decides which kernel and layout a call gets, in one place.
// Kernels ask it; none keeps a threshold of its own. All figures were measured with weights from
// DRAM (benchmarks/speedup_table.py, benchmarks/ab_native.py); the machine they were tuned on is in
// BENCHMARKS.md.
//
// The table of kernels itself (which function runs a format on an ISA) is in dispatch.cpp; the
// regime a CSR call runs in (row dot products, a batch panel, the column-tiled panel) follows from
// the functions below.
#pragma once
#include <cstdint>
#include <string>

namespace sparsenet::cpu::plan {

// From this many inputs a tile of x is transposed into a panel (each non-zero one broadcast and a few
// FMAs over inputs); below, each output is a dot product over its row's non-zeros.
constexpr int64_t kPanelMinBatch = 4;

// Below this many inputs the AVX-512 build runs the AVX2 kernels: a 16-wide panel would be mostly
// padding (the 8-wide one measured 1.3x faster at batch 4 and 8, 4096x4096, 50%), and the
// dot-product path compiled for AVX-512 measured 1.4x slower on Zen 4.
constexpr int64_t kAvx512MinBatch = 16;

// The column-tiled copy of a CSR weight (cpu/tiled.h) pays where a row's share of a 256-column tile
// is long enough for its L1 reuse to beat its fixed cost: panels of one or two vectors per non-zero
// (batch 4-16) from 17% density, wider ones (batch 17 on) from 7.5% (4096x4096, both ISAs).
// On AVX2, whose copy holds each block's rows longest first (tiled_longest_first), the narrow panels
// gain from 7.5% too: at batch 4 / 8 / 16 on 4096x4096 (AMD EPYC Zen 3, ab_native.py --distinct)
// 85% 0.74 / 0.74 / 0.89x the time, 88% 0.64 / 0.65 / 0.92, 90% 0.68-0.90 / 0.82-1.05 / 0.93-1.03
// over three runs, 92% 0.95 / 1.00 / 0.97; 1536x384 at 90% and 384x1536 at 85%: 0.93-0.99.
// Wide ones from 4.5%: 95% 0.92-0.95x the time at 17-256 rows (384x1536 at 64 / 1,024 rows 0.92 /
// 0.89), 94% 0.83 at 64 rows, 96% level (0.98-1.00); from 97% the row-range panels are faster
// (1.02-1.11x slower at 97%, 1.18-1.31x at 98%). Narrow ones below 7.5%: 1.06-1.17x slower.
constexpr double kTiledMinDensityNarrow = 0.17;
constexpr double kTiledMinDensityNarrowAvx2 = 0.075;
constexpr double kTiledMinDensityWide = 0.075;
constexpr double kTiledMinDensityWideAvx2 = 0.045;
constexpr int64_t kWideBatch = 16;

// AVX-512 tiled loop: 64-input panels (four vectors per non-zero) on weights at most 30% dense, 32
// above (a 64-wide slice of a tile no longer fits L1 where rows are dense in it).
constexpr double kWidePanelMaxDensity = 0.3;

// Bitmap weights on AVX-512: from this many inputs x is transposed into a panel and each stored
// weight becomes one broadcast and W/16 FMAs; below, rows run in pairs and each 16-column chunk is
// decoded (vexpandps) once for all inputs, which also multiplies the decoded zeros. (It was 4: the
// row kernel then measured 0.46-0.56x the panel's time at batch 4, 0.60-0.74x at 6, 0.82-1.05x at 8
// and 1.12-1.50x at 12; 4096 x 4096 from DRAM, 50-70%, ab_native.py. Once rows ran in pairs,
// batch 8 took 0.48-0.70x the panel's time, batch 9 1.01-1.44x, 11 1.27-1.89x: 18 accumulators and
// 9 input pointers no longer fit the registers.) Weights under 15% dense take the panel at batch 8
// too: its cost follows the stored weights, the pairs' every chunk (90%: pairs 1.18x the panel's
// time at batch 8, 0.94x at 6; 80%: 0.89x at 8).
constexpr int64_t kBitmapPanelMinBatch = 9;
constexpr double kBitmapSparsePanelMaxDensity = 0.15;
inline int64_t bitmap_panel_min_batch(double density) {
  return density < kBitmapSparsePanelMaxDensity ? kBitmapPanelMinBatch - 1 : kBitmapPanelMinBatch;
}
// On AVX2, from this many inputs a CSR structure derived from the bitmap once (over the same values)
// runs CSR's kernels (bitmap_batch_on_csr); below, the bitmap's own row-pair kernels. AVX2 had run
// bitmap panels from batch 8 and shared each decoded half between the inputs below; CSR's kernels,
// whose column index per weight costs less than walking the mask's bits, took 0.19-0.74x the
// bitmap panels' time at batch 8-32 on 4096 x 4096 at 50-90%, 0.23-0.82x at 64-1,024 rows (1.05x
// on 1536 x 384 at 1,024, whose 384 columns keep the bitmap's whole panel in L2), and at 70%
// 0.62x / 0.49x the row kernel's at batch 6 / 7 (0.75x at 5, where the pairs, level at 50%, stay;
// AMD EPYC Zen 3, formats_table.py). Batch 5 joined them later: its pairs (10 sums, spilling)
// took 2.7-2.8 ms on 4096 x 4096 at every density, CSR's kernels 2.03 / 1.42 / 0.64 ms at 50 / 70 /
// 90%, where the pairs at batch 4 take 1.55 / 1.35 / 1.34 (ab_native.py). AVX-512 keeps its own
// kernels, not measured against CSR since.
constexpr int64_t kBitmapCsrMinBatchAvx2 = 5;
bool bitmap_batch_on_csr(const std::string& isa, int64_t batch);

// BSR weights: from this many inputs x is transposed into a panel and every block runs as a
// register-blocked dense micro-kernel (bsr_tile_rows rows x the panel width); below, each sample's
// outputs are dot products over the stored blocks.
constexpr int64_t kBsrPanelMinBatch = 4;
// AVX2 from this many inputs: panels of 16 (two vectors a weight, 6 rows a register tile) where
// panels of 8 re-read every block once per 8 samples: 0.66-0.91x the time at batch 16-128
// (4096x4096 at 90% and 384x1536 at 70%, 16x16 blocks; AMD EPYC Zen 3, ab_native.py).
constexpr int64_t kBsrWidePanelMinBatchAvx2 = 16;

// AVX2, every batch, for blocks whose height is a multiple of 16 and width at least
// kBsrDirectMinWidth: the weights become the vector operand (a block-transposed copy the handle
// keeps, bsr_transpose_blocks: the values' bytes again) and x is read in place, a broadcast a
// sample, into a tile of up to 6 samples x 16 outputs stored as y's rows: no panel to pack, no
// transposed store, each x value loaded once for 16 outputs (where the panel loaded each weight once
// for 16 samples), and at batch 1 no horizontal sums. Samples run in groups whose x rows fill about
// kBsrDirectSlabBytes (L2) while each block row's weights stay in L1 for the group's tiles. Against
// the kernels before (ab_native.py, new / before, AMD EPYC Zen 3), 16x16 blocks: 4096x4096 at
// 90% batch 1 / 2-3 / 4-12 / 16-128: 0.66 / 0.63-0.65 / 0.28-0.39 / 0.37-0.52; at 50% batch 1-3
// 0.57-0.67; 384x1536 / 1536x384 at 70%, batch 1: 0.87 / 0.89, 4-12: 0.40-0.51 (384x1536), 64:
// 0.52 / 0.60, 1,024: 0.98 / 0.88 (2 blocks ahead on x; 1 ahead measured 0.88-1.0x the time of
// none, 2 ahead 0.9x of 1). 32x32: 0.53-0.99 (batch 1-2 level); 16x8: 0.57-0.87 (1,024 rows level).
// Blocks 8 high (one vector of outputs, a broadcast per FMA) measured 1.14-1.50x the panels' time
// at batch 16-1,024, 16x4 0.52-1.13, 16x1 1.14-1.53: their old kernels stay. Asking for the next
// block row's weights into L2, a share per tile, measured 0.96-0.99 / 1.03-1.07 at 1,024 rows
// (384x1536 / 1536x384) and was dropped; the hardware follows that stream.
constexpr int64_t kBsrDirectMinWidth = 8;
constexpr int64_t kBsrDirectSlabBytes = 256 * 1024;
// Weights of more than kBsrDirectBigWeightBytes come from DRAM on every pass of a group (4096x4096
// at 50%, 32 MiB: 2.4x dense at batch 64 where CSR, passing once, made 4.1x): their groups take up
// to kBsrDirectBigSlabBytes of x instead (read from L3, a few lines ahead), so that they pass once
// per that many samples.
constexpr int64_t kBsrDirectBigWeightBytes = 8 * 1024 * 1024;
constexpr int64_t kBsrDirectBigSlabBytes = 4 * 1024 * 1024;
constexpr int64_t kBsrDirectAhead = 2;
// The slice height of the block-transposed copy that calls on `isa` run on, for blocks of r x c; 0
// where they run on the kernels over the values as stored.
int64_t bsr_direct_slice(const std::string& isa, int64_t r, int64_t c);

// BSR at large batch: from this many panels per thread, threads take whole panels (each its own
// x slice, no barrier) instead of sharing out each panel's block rows.
constexpr int kBsrPanelsPerThread = 4;

// N:M weights: from this many inputs they run on CSR's batch kernels (panels, the column-tiled
// copy), over a CSR structure derived from theirs once; below, their own kernels read the packed
// 2- or 4-bit indices, which is where their bytes pay.
constexpr int64_t kNmPanelMinBatch = kPanelMinBatch;
inline bool nm_batch_on_csr(int64_t batch) { return batch >= kNmPanelMinBatch; }

// Whether a weight of `format` multiplied by `batch` inputs runs CSR's kernels over a structure
// derived from its own (bitmap_batch_on_csr, nm_batch_on_csr): then it is CSR's speed on more bytes
// (its own structure and the derived one), and format="auto" does not time it (autoformat.py).
bool batch_on_derived_csr(const std::string& format, const std::string& isa, int64_t batch);

// Sparse convolutions: output pixels per tile (what each stored weight is multiplied over; the
// AVX-512 kernel: 64 measured no faster at 70% sparsity and 10-20% slower at 90% on ResNet-18's 3x3
// shapes, 16 slower), and the bytes of one block of a tile's packed input columns (conv.h): at 16 KB
// (L1) a row ran over so few weights per block at 90% that the per-row work showed; 64 KB (L2)
// measured 7% faster there and at 70%, 128 KB 5% slower than 64 (AMD EPYC Zen 4, conv_table shapes).
constexpr int64_t kConvTileFloats = 32;
constexpr int64_t kConvPackBytes = 64 * 1024;
// Denser weights (at least this share stored), unless their rows run together, take half-size
// blocks: every row sweeps its block's slots, and 64 KB of them do not stay in L1 (a probe that kept
// the loads inside 8-32 KB took 0.81-0.90x the time), while a row's weights per block still outweigh
// its per-block setup. ab_conv.py, new / 64 KB: 50% sparse 0.78-0.81, 70% 0.93-0.94 (AVX2
// 0.89-0.93), 80% 0.98-0.99, 90% 1.01-1.03 (kept at 64 KB); 16 KB blocks at 50-70% 0.83-1.01; rows
// in blocks of 4 (run together, fewer loads per FMA) 1.01-1.04 (kept at 64 KB).
constexpr int64_t kConvDensePackBytes = 32 * 1024;
constexpr double kConvDensePackMinDensity = 0.25;
// The convolution asks for its weights ahead (conv_simd.h) on images of at most this many tiles, for
// weights of at least this many stored values (about 200 KB), this many rows ahead.
constexpr int64_t kConvLookAheadMaxItems = 16;
constexpr int64_t kConvLookAheadMinNnz = 32768;
constexpr int64_t kConvLookAheadRows = 8;

// Whether a convolution writes its output past the caches (streaming stores): where the output is
// more than a third of the last-level cache. Each tile writes a line or two into every output
// channel's plane, far apart: the core then waits on a read for ownership of every line, and an
// output that big is written back to memory before anything reads it. A pointwise layer of 14.4 MB
// (24->144 at 56 x 56, batch 8, 90%) took 0.50x the time streamed, 0.77x with an in-place clamp of
// the output after it (the next layer reads it from memory, not the cache); 4.8-7.2 MB outputs took
// 1.3-1.9x with that clamp (AMD EPYC Zen 3, 32 MiB L3). Never where the cache size is not known.
// Defined in planner.cpp (not ISA-flagged).
bool streams_conv_output(int64_t output_bytes);
// Whether a pointwise convolution asks for its input ahead (ConvArgs::prefetch_input): where the
// input is more than a quarter of the last-level cache, kConvInputAheadFloats (two tiles) ahead.
// ab_conv-style A/B, 90%: 144->24 at 56 x 56, batch 3 / 5 / 8 (5.4 / 9.0 / 14.4 MB of input)
// 1.04 / 0.69 / 0.54x the time; 96->24 batch 4 / 8 (4.8 / 9.6 MB) 1.11 / 0.57; 192->32 at 28 x 28,
// batch 16 (9.6 MB) 0.59; 576->96 at 14 x 14, batch 16 (7.2 MB) 0.97; 56 x 56 at batch 1 1.07 (AMD
// EPYC Zen 3, 32 MiB L3: inputs the cache holds gain nothing and pay the instructions). (An earlier
// try, when both threads took tiles from one run, measured 0.93-1.15: the tile two ahead was then
// often the other core's.)
bool prefetches_conv_input(int64_t input_bytes);
constexpr int64_t kConvInputAheadFloats = 64;
// The last-level data cache in bytes: 0 (unknown) until the package hands over what Linux lists
// (sparsenet/_machine.py, read once at import); set returns the size before.
int64_t last_level_cache_bytes();
int64_t set_last_level_cache_bytes(int64_t bytes);

// How many panels of x the column-tiled CSR kernel packs for one pass over a weight of this many
// bytes (its copy's values and column offsets). A pass reads the weight once; more panels a pass
// mean fewer passes but a larger packed x. 8 where the weight is more than a quarter of the
// last-level cache (it comes from DRAM on every pass), else 4. Against 4 everywhere (ab_native.py,
// AMD EPYC Zen 3, 32 MiB L3, 70% unless named): 4096x4096 (25 MB) at 256 / 512 rows 0.97-0.99x the
// time, 50% 0.98, 90% (8.4 MB) 0.95-0.99; but 768x768 and 1536x384 (0.9 MB) at 4,096 / 1,024 rows 1.02 / 1.01x,
// 3072x768 and 768x3072 (3.5 MB) 0.98-1.00. Defined in planner.cpp.
constexpr int64_t kTiledPanelGroup = 4;
constexpr int64_t kTiledPanelGroupStreamed = 8;
int64_t tiled_panel_group(int64_t weight_bytes);

// How many consecutive 64-row chunks one job of the column-tiled CSR kernel takes, tile by tile:
// two for AVX2 (vector_width 8) with full 32-wide panels (full_panel_width 32; 0 where the batch
// fills no panel), so that each tile's 32 KB slice of a panel, which fills a usual 32 KB L1, is
// loaded once for 128 rows (AMD EPYC Zen 3, ab_native.py: 0.95-0.98x the time at 70%, 4096x4096 at
// 64 / 256 rows, 384x1536 at 1,024); one where pairs would leave fewer than 4 jobs a thread
// (384x1536 at batch 16: 1.25x slower), for 16-wide panels (1.02x slower at batch 12-16), and for
// AVX-512's panels (not measured). `panels`: those of a pass. Defined in planner.cpp.
constexpr int64_t kTiledMaxChunksPerJob = 2;
constexpr int64_t kTiledMinJobsPerThread = 4;
int64_t tiled_chunks_per_job(int vector_width, int64_t full_panel_width, int64_t chunks, int64_t panels, int threads);

// The column-tiled copy on AVX2 pads each row's share of a tile with zero weights to a multiple of 8
// (tiled.h), so that the panel loop's 8-weight steps end every share: the steps of 4 or 2 weights and
// single weights after them, whose counts vary from row to row, cost branch mispredictions, where
// the padding costs 4-14% more FMAs (3.5 on average a share). AMD EPYC Zen 3, ab_native.py
// --distinct, 70%: 4096x4096 0.94x the time at 64 rows, 0.95-0.97x at 256-1,024; 3072x768 / 1536x768
// 0.95x / 0.94x at 64 rows, 0.98x / 1.00x at 1,024; 4096x4096 at batch 8, 50% / 80%: 0.89x / 0.81x.
// Not under 15% density (90%: 1.01-1.03x slower; 85% level), and not on weights of fewer than 4,096
// row shares (rows x tiles): over many panels (1,024 rows, 32 of them) the predictor learns a small
// weight's row ends, and padding only adds work (1536x384, 3,072 shares: 1.02x slower at 1,024 rows,
// 0.93x at 64). AVX-512 (16-weight steps, not measured) gets no padding. Returns the multiple (1: none).
constexpr int64_t kTiledPadLanes = 8;
constexpr double kTiledPadMinDensity = 0.15;
constexpr int64_t kTiledPadMinShares = 4096;
int64_t tiled_row_padding(const std::string& isa, double density, int64_t row_shares);

// Whether the column-tiled copy holds each block's row shares longest first (tiled.h): the panel
// loop's steps then run the same counts for runs of rows, and its loop exits are predicted. On AVX2
// (AMD EPYC Zen 3, ab_native.py --distinct): on padded copies 0.97-0.985x the time at 4096x4096, 70%,
// 8-256 rows, 0.96-0.97 at 50%, 256 rows; on unpadded ones 0.88-0.92 at 90% (64 / 256 rows), 384x1536
// at 64 / 1,024 rows 0.94 / 0.97, 1536x384 at 1,024 0.98. (Over sorted rows, padding still pays at
// batch 8: without it 1.03-1.07x slower at 50-70%; at 64-256 rows 0.99-1.02.) AVX-512: not measured.
bool tiled_longest_first(const std::string& isa);

// Whether a CSR call on `isa` at this batch and density runs on the column-tiled copy (which the
// handle then builds once and keeps). Defined in planner.cpp, compiled without ISA flags: this
// header is included by ISA-flagged files, which must not emit a copy of it (capability.h).
bool wants_tiled_csr(const std::string& isa, int64_t batch, double density);

}  // namespace sparsenet::cpu::plan
