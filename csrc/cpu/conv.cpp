#include "cpu/conv.h"

#include "cpu/nonfinite.h"
#include "cpu/planner.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace sparsenet {

namespace {

std::string str(int64_t v) { return std::to_string(v); }

template <typename Idx>
bool row_stores(const CsrView& a, int64_t r, int64_t column) {
  const Idx* col = static_cast<const Idx*>(a.col_idx);
  const Idx* begin = col + a.row_ptr[r];
  const Idx* end = col + a.row_ptr[r + 1];
  const Idx* at = std::lower_bound(begin, end, static_cast<Idx>(column));
  return at != end && static_cast<int64_t>(*at) == column;
}

}  // namespace

ConvShape conv_shape(int64_t batch, int64_t in_channels, int64_t in_h, int64_t in_w, int64_t out_channels,
                     const std::vector<int64_t>& geometry) {
  if (geometry.size() != 9)
    throw std::invalid_argument("geometry must be (kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups)");
  ConvShape s;
  s.batch = batch;
  s.in_channels = in_channels;
  s.in_h = in_h;
  s.in_w = in_w;
  s.out_channels = out_channels;
  s.kernel_h = geometry[0];
  s.kernel_w = geometry[1];
  s.stride_h = geometry[2];
  s.stride_w = geometry[3];
  s.pad_h = geometry[4];
  s.pad_w = geometry[5];
  s.dil_h = geometry[6];
  s.dil_w = geometry[7];
  s.groups = geometry[8];
  return s;
}

void validate_conv(ConvShape& s, const CsrView& a) {
  for (int64_t v : {s.batch, s.in_channels, s.in_h, s.in_w, s.out_channels, s.pad_h, s.pad_w})
    if (v < 0) throw std::invalid_argument("convolution sizes and padding must be non-negative");
  for (int64_t v : {s.kernel_h, s.kernel_w, s.stride_h, s.stride_w, s.dil_h, s.dil_w, s.groups})
    if (v < 1) throw std::invalid_argument("kernel size, stride, dilation and groups must be positive");
  if (s.in_channels % s.groups || s.out_channels % s.groups)
    throw std::invalid_argument("in_channels (" + str(s.in_channels) + ") and out_channels (" + str(s.out_channels) +
                                ") must be divisible by groups (" + str(s.groups) + ")");
  if (a.rows != s.out_channels)
    throw std::invalid_argument("the weight has " + str(a.rows) + " rows, out_channels is " + str(s.out_channels));
  if (a.cols != s.in_channels / s.groups * s.kernel_h * s.kernel_w)
    throw std::invalid_argument("the weight has " + str(a.cols) + " columns, expected in_channels / groups * kh * kw = " +
                                str(s.in_channels / s.groups * s.kernel_h * s.kernel_w));
  const int64_t span_h = s.dil_h * (s.kernel_h - 1) + 1, span_w = s.dil_w * (s.kernel_w - 1) + 1;
  if (s.in_h + 2 * s.pad_h < span_h || s.in_w + 2 * s.pad_w < span_w)
    throw std::invalid_argument("the input (" + str(s.in_h) + "x" + str(s.in_w) + ", padded by " + str(s.pad_h) + "x" +
                                str(s.pad_w) + ") is smaller than the kernel's reach (" + str(span_h) + "x" +
                                str(span_w) + ")");
  s.out_h = (s.in_h + 2 * s.pad_h - span_h) / s.stride_h + 1;
  s.out_w = (s.in_w + 2 * s.pad_w - span_w) / s.stride_w + 1;
}

bool direct_offsets(const CsrView& a, const ConvShape& s, DirectConv* d, uint16_t* offsets,
                    std::vector<int64_t>* block_start, std::vector<int32_t>* sources,
                    std::vector<uint8_t>* same_rows) {
  const int64_t hp = s.in_h + 2 * s.pad_h, wp = s.in_w + 2 * s.pad_w, kk = s.kernel_h * s.kernel_w;
  d->in_place = s.stride_h == 1 && s.stride_w == 1 && s.out_w <= s.in_w && kk <= kConvMaxTaps;
  d->hq = d->in_place ? s.in_h : (hp + s.stride_h - 1) / s.stride_h;
  d->wq = d->in_place ? s.in_w : (wp + s.stride_w - 1) / s.stride_w;
  const int64_t plane = d->hq * d->wq, phases = d->in_place ? 1 : s.stride_h * s.stride_w;
  const int64_t cg = s.in_channels / s.groups;
  if (cg * phases * plane + plane >= INT32_MAX) return false;
  const int64_t tile = cpu::plan::kConvTileFloats;
  sparsenet::same_rows(a, same_rows);
  d->same_rows = same_rows->data();
  const double density = a.rows > 0 && a.cols > 0 ? static_cast<double>(a.nnz) / (static_cast<double>(a.rows) * a.cols)
                                                  : 0.0;
  const bool half_blocks = density >= cpu::plan::kConvDensePackMinDensity && share_run_together(*same_rows) < 0.5;
  d->block_cols = std::max<int64_t>(
      1, (half_blocks ? cpu::plan::kConvDensePackBytes : cpu::plan::kConvPackBytes) / (tile * 4));
  d->blocks = std::max<int64_t>(1, (a.cols + d->block_cols - 1) / d->block_cols);
  sources->resize(static_cast<size_t>(a.cols));
  for (int64_t column = 0; column < a.cols; ++column) {
    const int64_t ci = column / kk, ky = column % kk / s.kernel_w, kx = column % s.kernel_w;
    const int64_t ry = ky * s.dil_h, rx = kx * s.dil_w;  // reach into the padded input
    if (d->in_place) {  // (negative where the reach starts in the padding: those lanes are masked)
      (*sources)[column] = static_cast<int32_t>(ci * plane + (ry - s.pad_h) * d->wq + rx - s.pad_w);
      continue;
    }
    const int64_t phase = (ry % s.stride_h) * s.stride_w + rx % s.stride_w;
    (*sources)[column] = static_cast<int32_t>((ci * phases + phase) * plane + ry / s.stride_h * d->wq + rx / s.stride_w);
  }
  d->sources = sources->data();
  block_start->assign(static_cast<size_t>(a.rows * (d->blocks + 1)), 0);
  auto column_of = [&](int64_t k) -> int64_t {
    return a.index_bytes == 2 ? static_cast<const uint16_t*>(a.col_idx)[k] : static_cast<const int32_t*>(a.col_idx)[k];
  };
  for (int64_t r = 0; r < a.rows; ++r) {
    int64_t k = a.row_ptr[r];
    for (int64_t b = 0; b <= d->blocks; ++b) {  // the first weight of row r at or past block b's first column
      const int64_t first = std::min(b * d->block_cols, a.cols);
      while (k < a.row_ptr[r + 1] && column_of(k) < first) ++k;
      (*block_start)[r * (d->blocks + 1) + b] = b == d->blocks ? a.row_ptr[r + 1] : k;
    }
  }
  d->block_start = block_start->data();
  static_assert(cpu::plan::kConvPackBytes / 4 <= 65536, "a packed tile's slots must be addressable in 16 bits");
  for (int64_t k = 0; k < a.nnz; ++k) offsets[k] = static_cast<uint16_t>(column_of(k) % d->block_cols * tile);
  d->offsets = offsets;
  return true;
}

void same_rows(const CsrView& a, std::vector<uint8_t>* runs) {
  auto column_of = [&](int64_t k) -> int64_t {
    return a.index_bytes == 2 ? static_cast<const uint16_t*>(a.col_idx)[k] : static_cast<const int32_t*>(a.col_idx)[k];
  };
  runs->assign(static_cast<size_t>(a.rows), 1);
  for (int64_t r = a.rows - 2; r >= 0; --r) {  // (rows storing nothing are left alone)
    const int64_t begin = a.row_ptr[r], n = a.row_ptr[r + 1] - begin, next = a.row_ptr[r + 1];
    if (n == 0 || a.row_ptr[r + 2] - next != n) continue;
    int64_t k = 0;
    while (k < n && column_of(begin + k) == column_of(next + k)) ++k;
    if (k == n) (*runs)[r] = static_cast<uint8_t>(std::min<int64_t>((*runs)[r + 1] + 1, kConvMaxSameRows));
  }
}

double share_run_together(const std::vector<uint8_t>& runs) {
  const int64_t rows = static_cast<int64_t>(runs.size());
  if (rows == 0) return 0.0;
  int64_t together = 0;
  for (int64_t r = 0; r < rows;) {
    const int64_t taken = runs[r] >= 4 ? 4 : runs[r] >= 2 ? 2 : 1;
    if (taken > 1) together += taken;
    r += taken;
  }
  return static_cast<double>(together) / static_cast<double>(rows);
}

double rows_run_together(const CsrView& a) {
  std::vector<uint8_t> runs;
  same_rows(a, &runs);
  return share_run_together(runs);
}

void propagate_nonfinite(const CsrView& a, const ConvShape& s, const ConvArgs& c) {
  const int64_t plane = s.in_h * s.in_w, cg = s.in_channels / s.groups, kg = s.out_channels / s.groups;
  if (!any_nonfinite_rows(c.x, s.batch, s.in_channels * plane, s.in_channels * plane, c.num_threads)) return;
  for (int64_t n = 0; n < s.batch; ++n)
    for (int64_t ci = 0; ci < s.in_channels; ++ci)
      for (int64_t iy = 0; iy < s.in_h; ++iy)
        for (int64_t ix = 0; ix < s.in_w; ++ix) {
          if (std::isfinite(c.x[((n * s.in_channels + ci) * s.in_h + iy) * s.in_w + ix])) continue;
          const int64_t g = ci / cg;
          for (int64_t ky = 0; ky < s.kernel_h; ++ky) {
            const int64_t ty = iy + s.pad_h - ky * s.dil_h;  // oy * stride_h
            if (ty < 0 || ty % s.stride_h || ty / s.stride_h >= s.out_h) continue;
            for (int64_t kx = 0; kx < s.kernel_w; ++kx) {
              const int64_t tx = ix + s.pad_w - kx * s.dil_w;
              if (tx < 0 || tx % s.stride_w || tx / s.stride_w >= s.out_w) continue;
              const int64_t column = ((ci - g * cg) * s.kernel_h + ky) * s.kernel_w + kx;
              for (int64_t r = g * kg; r < (g + 1) * kg; ++r) {
                const bool stored = a.index_bytes == 2 ? row_stores<uint16_t>(a, r, column)
                                                       : row_stores<int32_t>(a, r, column);
                if (!stored)
                  c.y[((n * s.out_channels + r) * s.out_h + ty / s.stride_h) * s.out_w + tx / s.stride_w] =
                      std::numeric_limits<float>::quiet_NaN();
              }
            }
          }
        }
}

}  // namespace sparsenet
