#include "cuda/bsr_cuda.h"

#include <mma.h>

#include <type_traits>

#include "cuda/warp_rows.cuh"

namespace sparsenet::cuda {

namespace {

constexpr int kThreads = 128;  // four warps
constexpr int kTileInputs = 64;
constexpr int kMaxSide = 64;   // the format's largest block side
constexpr int kFrag = 16;      // WMMA tile side

__device__ inline int round16(int v) { return (v + kFrag - 1) / kFrag * kFrag; }

// Stages block k (r x c, row-major in values) as an R16 x C16 row-major tile, zero-padded, and the
// inputs' columns under it as a kTileInputs x C16 row-major tile (zero past the batch and the weight's
// last column).
template <typename T>
__device__ inline void stage(T* w_s, T* x_s, const T* __restrict__ values, int64_t k, int r, int c, int R16, int C16,
                             const T* __restrict__ x, int64_t m0, int64_t batch, int64_t ldx, int64_t col0,
                             int64_t cols) {
  const T zero = from_float<T>(0.0f);
  const T* block = values + k * r * c;
  for (int i = threadIdx.x; i < R16 * C16; i += kThreads) {
    const int ri = i / C16, ci = i % C16;
    w_s[i] = ri < r && ci < c ? block[ri * c + ci] : zero;
  }
  for (int i = threadIdx.x; i < kTileInputs * C16; i += kThreads) {
    const int mi = i / C16, ci = i % C16;
    const int64_t m = m0 + mi, col = col0 + ci;
    x_s[i] = m < batch && ci < c && col < cols ? x[m * ldx + col] : zero;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
bsr_tile_kernel(const int64_t* __restrict__ block_ptr, const int32_t* __restrict__ block_cols, int r, int c,
                const T* __restrict__ values, const T* __restrict__ x, int64_t batch, int64_t ldx, int64_t cols,
                const T* __restrict__ bias, T* __restrict__ y, int64_t ldy, int64_t rows) {
  __shared__ alignas(32) T w_s[kMaxSide * kMaxSide];
  __shared__ alignas(32) T x_s[kTileInputs * kMaxSide];
  const int R16 = round16(r), C16 = round16(c);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileInputs, rb = blockIdx.x, row0 = rb * r;
  const int64_t first = block_ptr[rb], last = block_ptr[rb + 1];
  // Each output (mi, ri) of the tile, in the end: its sum plus the bias, where it is inside y.
  auto write = [&](int mi, int ri, float sum) {
    const int64_t m = m0 + mi, row = row0 + ri;
    if (ri < r && m < batch && row < rows) y[m * ldy + row] = from_float<T>(sum + (bias ? to_float(bias[row]) : 0.0f));
  };
  if constexpr (std::is_same_v<T, float>) {
    // CUDA cores: thread t owns outputs t, t + 128, ... of the kTileInputs x R16 tile (at most 32).
    constexpr int kOwn = kTileInputs * kMaxSide / kThreads;
    float acc[kOwn];
#pragma unroll
    for (int j = 0; j < kOwn; ++j) acc[j] = 0.0f;
    for (int64_t k = first; k < last; ++k) {
      stage(w_s, x_s, values, k, r, c, R16, C16, x, m0, batch, ldx, static_cast<int64_t>(block_cols[k]) * c, cols);
      __syncthreads();
#pragma unroll
      for (int j = 0; j < kOwn; ++j) {
        const int o = threadIdx.x + j * kThreads, mi = o / R16, ri = o % R16;
        if (mi < kTileInputs) {
          float s = 0.0f;
          for (int ci = 0; ci < c; ++ci) s += x_s[mi * C16 + ci] * w_s[ri * C16 + ci];
          acc[j] += s;
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < kOwn; ++j) {
      const int o = threadIdx.x + j * kThreads;
      if (o / R16 < kTileInputs) write(o / R16, o % R16, acc[j]);
    }
  } else {
    // Tensor cores: the tile's (kTileInputs / 16) x (R16 / 16) output fragments, warp w owning
    // fragments w, w + 4, ... (at most 4); A from the staged inputs, B the staged block read as its
    // transpose (column-major), float32 sums.
    using namespace nvcuda;
    __shared__ alignas(32) float y_s[kTileInputs * kMaxSide];
    const int warp = threadIdx.x / kWarp, n_tiles = R16 / kFrag, fragments = kTileInputs / kFrag * n_tiles;
    wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[4];
#pragma unroll
    for (int s = 0; s < 4; ++s) wmma::fill_fragment(acc[s], 0.0f);
    for (int64_t k = first; k < last; ++k) {
      stage(w_s, x_s, values, k, r, c, R16, C16, x, m0, batch, ldx, static_cast<int64_t>(block_cols[k]) * c, cols);
      __syncthreads();
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const int f = warp + s * (kThreads / kWarp);
        if (f >= fragments) break;
        const int mi = f / n_tiles, ni = f % n_tiles;
        for (int kk = 0; kk < C16; kk += kFrag) {
          wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major> a_frag;
          wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::col_major> b_frag;
          wmma::load_matrix_sync(a_frag, x_s + mi * kFrag * C16 + kk, C16);
          wmma::load_matrix_sync(b_frag, w_s + ni * kFrag * C16 + kk, C16);
          wmma::mma_sync(acc[s], a_frag, b_frag, acc[s]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int f = warp + s * (kThreads / kWarp);
      if (f < fragments)
        wmma::store_matrix_sync(y_s + (f / n_tiles) * kFrag * R16 + (f % n_tiles) * kFrag, acc[s], R16,
                                wmma::mem_row_major);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kTileInputs * R16; i += kThreads) write(i / R16, i % R16, y_s[i]);
  }
}

}  // namespace

void bsr_matmul(const BsrDevice& a, DType dtype, const void* values, const DenseDevice& d, cudaStream_t stream) {
  if (a.rows == 0 || d.batch == 0) return;
  if (a.r < 1 || a.r > kMaxSide || a.c < 1 || a.c > kMaxSide)
    throw std::invalid_argument("bsr_matmul: block sides must be 1.." + std::to_string(kMaxSide));
  const int64_t tiles = (d.batch + kTileInputs - 1) / kTileInputs;
  if (tiles > 65535 || a.block_rows > 0x7fffffff)
    throw std::invalid_argument("bsr_matmul: too many inputs or block rows for one launch");
  const dim3 grid(static_cast<unsigned>(a.block_rows), static_cast<unsigned>(tiles)), block(kThreads);
  with_value_type(dtype, [&](auto t) {
    using T = decltype(t);
    bsr_tile_kernel<T><<<grid, block, 0, stream>>>(a.block_ptr, a.block_cols, static_cast<int>(a.r),
                                                   static_cast<int>(a.c), static_cast<const T*>(values),
                                                   static_cast<const T*>(d.x), d.batch, d.ldx, a.cols,
                                                   static_cast<const T*>(d.bias), static_cast<T*>(d.y), d.ldy,
                                                   a.rows);
  });
  check_launch("bsr_matmul");
}

}  // namespace sparsenet::cuda
