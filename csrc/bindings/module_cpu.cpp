// sparsenet._C: the CPU kernels, bound with pybind11. Knows nothing of torch: it is handed buffers
// (anything exposing the Python buffer protocol, numpy arrays in practice) or DLPack capsules, and
// checks every size, dtype and stride it relies on, raising ValueError/TypeError rather than
// crashing.
#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <cstdlib>
#include <memory>
#include <utility>
#include <tuple>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "bindings/dlpack_abi.h"

#include "cpu/bitmap_view.h"
#include "cpu/bsr_view.h"
#include "cpu/csr_view.h"
#include "cpu/nm_view.h"
#include "cpu/dispatch.h"
#include "cpu/huge_alloc.h"
#include "cpu/output_pool.h"
#include "cpu/planner.h"
#include "cpu/tiled.h"
#include "cpu/work_split.h"

namespace py = pybind11;
using sparsenet::CsrView;

namespace {

std::atomic<int> g_num_threads{1};

// Set in the child of a fork(). GNU OpenMP cannot start a thread team in a process forked from one
// whose team had started (torch's or ours): the child waits for threads that were never copied, and
// hangs. A forked child (a DataLoader worker, a pre-fork server's worker) therefore runs the kernels
// on one thread, as torch does there, and set_num_threads refuses more.
std::atomic<bool> g_forked{false};

void after_fork_in_child() {  // runs inside fork(): no locks, no allocation
  g_num_threads.store(1);
  g_forked.store(true);
  sparsenet::cpu::OutputPool::instance().reset_after_fork();
}

// Threads this process may run on: the CPUs in its affinity mask, at most OpenMP's thread limit.
// More would only contend for the same cores, and absurd counts make OpenMP's team start fail
// (libgomp then exits the process).
int usable_threads() {
  int n = 0;
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
#endif
  if (n <= 0) n = static_cast<int>(std::thread::hardware_concurrency());
  return std::max(1, std::min(n, omp_get_thread_limit()));
}

void set_num_threads(int64_t n) {
  if (n < 1) throw py::value_error("num_threads must be >= 1, got " + std::to_string(n));
  const int limit = usable_threads();
  if (n > limit)
    throw py::value_error("num_threads=" + std::to_string(n) + " exceeds the " + std::to_string(limit) +
                          " CPUs this process may run on");
  if (n > 1 && g_forked.load())
    throw std::runtime_error(
        "this process was forked after sparsenet was loaded, and GNU OpenMP cannot start threads in a forked "
        "child (it would hang), so sparsenet runs single-threaded here; start workers with the 'spawn' or "
        "'forkserver' method (e.g. DataLoader(..., multiprocessing_context='spawn')) to use more threads");
  g_num_threads.store(static_cast<int>(n));
}

py::buffer_info vector_info(const py::buffer& b, const char* name) {
  py::buffer_info info = b.request();
  if (info.ndim != 1) throw py::value_error(std::string(name) + " must be 1-D");
  if (info.size > 1 && info.strides[0] != info.itemsize)
    throw py::value_error(std::string(name) + " must be contiguous");
  return info;
}

bool format_is(const py::buffer_info& info, char code, py::ssize_t itemsize) {
  // Buffer formats may carry a byte-order prefix ('<', '=', '@'); the native one is what we read.
  std::string f = info.format;
  if (!f.empty() && (f[0] == '<' || f[0] == '=' || f[0] == '@')) f = f.substr(1);
  return info.itemsize == itemsize && f.size() == 1 &&
         (f[0] == code || (code == 'q' && f[0] == 'l' && itemsize == 8) ||
          (code == 'i' && f[0] == 'l' && itemsize == 4));
}

// A 2-D float32 operand as the kernels need it, from either interface (strides in bytes).
struct Dense2D {
  char* ptr = nullptr;
  int64_t rows = 0, cols = 0, row_stride = 0, col_stride = 0;
  bool float32 = false;
};

Dense2D dense_from_buffer(const py::buffer_info& b, const char* name) {
  if (b.ndim != 2) throw py::value_error(std::string(name) + " must be 2-D");
  return Dense2D{static_cast<char*>(b.ptr), b.shape[0], b.shape[1], b.strides[0], b.strides[1], format_is(b, 'f', 4)};
}

// Reads (does not consume) a DLPack capsule: its producer keeps the memory alive while the
// capsule lives, and the capsule is an argument of the call that uses it.
Dense2D dense_from_dlpack(const py::object& capsule, const char* name) {
  namespace dl = sparsenet::dlpack;
  if (!PyCapsule_IsValid(capsule.ptr(), dl::kCapsuleName))
    throw py::type_error(std::string(name) + " must be an unconsumed DLPack capsule (\"dltensor\"), such as "
                         "torch.utils.dlpack.to_dlpack(x) returns");
  const auto* managed = static_cast<const dl::ManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), dl::kCapsuleName));
  const dl::Tensor& t = managed->dl_tensor;
  if (t.device.device_type != dl::kCPU)
    throw py::value_error(std::string(name) + " must be in CPU memory (DLPack device type " +
                          std::to_string(t.device.device_type) + ")");
  if (t.ndim != 2) throw py::value_error(std::string(name) + " must be 2-D, got " + std::to_string(t.ndim) + "-D");
  Dense2D d;
  d.ptr = static_cast<char*>(t.data) + t.byte_offset;
  d.rows = t.shape[0];
  d.cols = t.shape[1];
  d.row_stride = 4 * (t.strides ? t.strides[0] : t.shape[1]);
  d.col_stride = 4 * (t.strides ? t.strides[1] : 1);
  d.float32 = t.dtype.code == dl::kFloat && t.dtype.bits == 32 && t.dtype.lanes == 1;
  return d;
}

// A new, owned, contiguous (rows, cols) float32 tensor as a DLPack capsule: whoever consumes the
// capsule (torch.utils.dlpack.from_dlpack) frees it through the deleter, or the capsule does
// when it dies unconsumed.
struct OwnedOutput {
  sparsenet::dlpack::ManagedTensor managed{};
  int64_t shape[2]{};
  int64_t strides[2]{};
  size_t pooled = 0;  // the OutputPool block's capacity; 0: from aligned_alloc
};

void free_output(sparsenet::dlpack::ManagedTensor* m) {
  auto* owned = static_cast<OwnedOutput*>(m->manager_ctx);
  if (owned->pooled) sparsenet::cpu::OutputPool::instance().give(m->dl_tensor.data, owned->pooled);
  else std::free(m->dl_tensor.data);
  delete owned;
}

void destroy_unconsumed(PyObject* capsule) {
  namespace dl = sparsenet::dlpack;
  if (!PyCapsule_IsValid(capsule, dl::kCapsuleName)) return;  // consumed: the consumer frees it
  auto* m = static_cast<dl::ManagedTensor*>(PyCapsule_GetPointer(capsule, dl::kCapsuleName));
  m->deleter(m);
}

// `streamed`: the kernel writes this output past the caches (a convolution's, conv.h's
// stream_output). Such an output comes from the pool at any size. glibc's memory had faulted in page
// by page on many calls (24->144 at 56 x 56, batch 8, 14.4 MB: 0.19-0.89x the time from the pool
// beside dense calls, 0.94-0.99x alone). The pool's huge-page buffers measured slower for smaller
// outputs read back from the cache (output_pool.h); nothing reads a streamed one from the cache.
py::object new_output(int64_t rows, int64_t cols, Dense2D* out, bool streamed = false) {
  namespace dl = sparsenet::dlpack;
  const size_t bytes = (static_cast<size_t>(rows) * static_cast<size_t>(cols) * 4 + 63) / 64 * 64;
  auto owned = std::make_unique<OwnedOutput>();
  void* data = bytes >= sparsenet::cpu::OutputPool::kMinBytes || (streamed && bytes > 0)
                   ? sparsenet::cpu::OutputPool::instance().take(bytes, &owned->pooled)
                   : std::aligned_alloc(64, bytes > 0 ? bytes : 64);
  if (data == nullptr) throw std::bad_alloc();
  owned->shape[0] = rows;
  owned->shape[1] = cols;
  owned->strides[0] = cols;
  owned->strides[1] = 1;
  dl::ManagedTensor& m = owned->managed;
  m.dl_tensor = dl::Tensor{data, dl::Device{dl::kCPU, 0}, 2, dl::DataType{dl::kFloat, 32, 1}, owned->shape,
                           owned->strides, 0};
  m.manager_ctx = owned.get();
  m.deleter = free_output;
  PyObject* capsule = PyCapsule_New(&m, dl::kCapsuleName, destroy_unconsumed);
  if (capsule == nullptr) {
    owned.release();
    free_output(&m);  // frees the data and the OwnedOutput itself
    throw py::error_already_set();
  }
  owned.release();  // the capsule (or its consumer) owns it now
  *out = Dense2D{static_cast<char*>(data), rows, cols, 4 * cols, 4, true};
  return py::reinterpret_steal<py::object>(capsule);
}

// x as the kernels read it: float32 (batch, cols), unit stride along features, rows not overlapping.
void check_x(const Dense2D& x, int64_t cols) {
  if (!x.float32) throw py::type_error("x must be float32");
  if (x.rows < 0) throw py::value_error("x has a negative batch size");
  if (x.cols != cols)
    throw py::value_error("x has " + std::to_string(x.cols) + " features, the weight expects " + std::to_string(cols));
  if (x.cols > 1 && x.col_stride != 4) throw py::value_error("x needs unit stride along features");
  if (x.rows > 1 && (x.row_stride % 4 != 0 || x.row_stride < 4 * x.cols))
    throw py::value_error("x rows must not overlap (row stride at least the feature count)");
}

// The kernels' arguments for y = x A^T (+ bias) with A of `rows` outputs and `cols` inputs, once
// out is checked: float32 (batch, rows), contiguous, not overlapping x (which passed check_x).
sparsenet::DenseArgs dense_args(const Dense2D& x, const Dense2D& y, int64_t rows, int64_t cols, const float* bias) {
  if (!y.float32) throw py::type_error("out must be float32");
  const int64_t batch = x.rows;
  if (y.rows != batch || y.cols != rows)
    throw py::value_error("out must have shape (" + std::to_string(batch) + ", " + std::to_string(rows) + ")");
  if ((y.cols > 1 && y.col_stride != 4) || (batch > 1 && y.row_stride != 4 * y.cols))
    throw py::value_error("out must be contiguous");
  const char* ylo = y.ptr;
  const char* yhi = ylo + 4 * batch * rows;
  const char* xlo = x.ptr;
  const char* xhi = xlo + (batch > 0 ? x.row_stride * (batch - 1) + 4 * cols : 0);
  if (batch > 0 && rows > 0 && ylo < xhi && xlo < yhi) throw py::value_error("out must not overlap x");
  sparsenet::DenseArgs d;
  d.x = reinterpret_cast<const float*>(x.ptr);
  d.batch = batch;
  d.ldx = batch > 1 ? x.row_stride / 4 : cols;
  d.y = reinterpret_cast<float*>(y.ptr);
  d.ldy = rows;
  d.num_threads = g_num_threads.load(std::memory_order_relaxed);
  d.bias = bias;
  return d;
}

// forward() of a handle that keeps its buffers: x (a DLPack capsule) checked against `cols`, a new
// (batch, rows) output made, `fill(x, y)` runs the kernel into it.
template <typename FillFn>
py::object forward_new(const py::object& x, bool keeps_buffers, int64_t rows, int64_t cols, FillFn fill) {
  if (!keeps_buffers) throw py::value_error("this handle does not keep its buffers (keep=False): use matmul");
  const Dense2D xd = dense_from_dlpack(x, "x");
  check_x(xd, cols);
  Dense2D yd;
  py::object y = new_output(xd.rows, rows, &yd);
  fill(xd, yd);
  return y;
}

// The values handed to a matmul: float32, as many as the structure holds.
const float* values_pointer(const py::buffer& values, int64_t nnz) {
  const py::buffer_info va = vector_info(values, "values");
  if (!format_is(va, 'f', 4)) throw py::type_error("values must be float32");
  if (va.size != nnz)
    throw py::value_error("values has " + std::to_string(va.size) + " entries, the structure holds " +
                          std::to_string(nnz));
  return static_cast<const float*>(va.ptr);
}

const float* bias_pointer(const py::object& bias, int64_t rows) {
  if (bias.is_none()) return nullptr;
  const auto bi = vector_info(bias.cast<py::buffer>(), "bias");
  if (!format_is(bi, 'f', 4)) throw py::type_error("bias must be float32");
  if (bi.size != rows)
    throw py::value_error("bias has " + std::to_string(bi.size) + " entries, expected " + std::to_string(rows));
  return static_cast<const float*>(bi.ptr);
}

// A packed CSR weight checked once and ready to multiply (see csrc/cpu/csr_view.h for the layout).
//
// What a handle derives from what a call hands it (a copy of the values, a convolution's plan for
// an input size), kept for the calls that follow with the same key. Built under the GIL; replaced by
// a new object, never rewritten, when the key changes; and each call holds the object it got while
// its kernel runs without the GIL, so that another thread's call with another key cannot pull it
// from under it (two threads calling one handle with other values or input sizes had crashed the
// process, or swapped answers).
template <typename T, typename Key>
class DerivedCache {
 public:
  // build() -> std::shared_ptr<const T>, null where there is nothing to derive.
  template <typename Build>
  std::shared_ptr<const T> get(const Key& key, Build build) const {
    if (!held_ || key_ != key) {
      held_ = build();
      key_ = key;
    }
    return held_;
  }
  // What the last get() built or kept (null before any).
  std::shared_ptr<const T> held() const { return held_; }

 private:
  mutable std::shared_ptr<const T> held_;
  mutable Key key_{};
};

// The handle owns a private copy of the structure (row pointers and column indices), made and then
// validated at construction, and only ever reads that copy: whatever later happens to the caller's
// buffers, including writes torch cannot see (through .data, .numpy() or DLPack), no kernel can be
// made to read or write out of bounds. The values are read from the caller's buffer (any float is
// memory-safe): matmul is handed them on every call, and a handle built with keep=True holds them
// (and the bias) itself, so forward(x) needs nothing else (SparseLinear's prepared path).
//
// Derived data (the column-tiled copy, which also copies the values) is valid only for the values
// it was built from. C++ cannot see an in-place edit of them: the Python side builds a new handle
// when torch's version counters say any tensor it came from changed (sparsenet/ops/handles.py).
class CsrHandle {
 public:
  CsrHandle(int64_t rows, int64_t cols, const py::buffer& row_ptr, const py::buffer& col_idx,
            const py::buffer& values, bool keep, const py::object& bias) {
    if (rows < 0 || cols < 0) throw py::value_error("rows and cols must be non-negative");
    const auto rp = vector_info(row_ptr, "crow_indices");
    const auto ci = vector_info(col_idx, "col_indices");
    const auto va = vector_info(values, "values");
    if (!format_is(rp, 'q', 8)) throw py::type_error("crow_indices must be int64");
    if (format_is(ci, 'H', 2)) view_.index_bytes = 2;
    else if (format_is(ci, 'i', 4)) view_.index_bytes = 4;
    else throw py::type_error("col_indices must be uint16 or int32, got format '" + ci.format + "'");
    if (!format_is(va, 'f', 4)) throw py::type_error("values must be float32");
    if (rp.size != rows + 1)
      throw py::value_error("crow_indices has " + std::to_string(rp.size) + " entries, expected rows + 1 = " +
                            std::to_string(rows + 1));
    if (ci.size != va.size)
      throw py::value_error("col_indices (" + std::to_string(ci.size) + ") and values (" +
                            std::to_string(va.size) + ") differ in length");
    // Copy first, then validate the copy: nothing can change it between the check and its use.
    const auto* rp_data = static_cast<const int64_t*>(rp.ptr);
    row_ptr_.assign(rp_data, rp_data + rp.size);
    const size_t index_bytes = static_cast<size_t>(ci.size) * view_.index_bytes;
    col_idx_.resize(index_bytes);
    if (index_bytes > 0) std::memcpy(col_idx_.data(), ci.ptr, index_bytes);
    view_.rows = rows;
    view_.cols = cols;
    view_.nnz = va.size;
    view_.row_ptr = row_ptr_.data();
    view_.col_idx = col_idx_.data();
    view_.values = static_cast<const float*>(va.ptr);
    sparsenet::validate_csr(view_);  // throws std::invalid_argument -> ValueError
    if (!bias.is_none() && !keep) throw py::value_error("bias is kept only by a handle with keep=True");
    bias_ = bias_pointer(bias, view_.rows);
    // Holding the exporters keeps the memory alive (numpy arrays pin what they view).
    if (keep) owners_ = std::make_shared<const py::tuple>(py::make_tuple(values, bias));
    else view_.values = nullptr;  // handed over again on every matmul
  }

  // A structure derived in C++ from another format's (derived(): N:M, AVX2 bitmap batches), moved in
  // and validated like any other; the values are handed to run() on every call.
  CsrHandle(int64_t rows, int64_t cols, std::vector<int64_t> row_ptr, std::vector<uint8_t> col_idx, int index_bytes)
      : row_ptr_(std::move(row_ptr)) {
    col_idx_.assign(col_idx.begin(), col_idx.end());
    view_.rows = rows;
    view_.cols = cols;
    view_.nnz = row_ptr_.back();
    view_.row_ptr = row_ptr_.data();
    view_.col_idx = col_idx_.data();
    view_.index_bytes = index_bytes;
    sparsenet::validate_csr(view_);
  }

  // y = x A^T (+ bias) with A's values read from `values` (float32, nnz entries); x is
  // (batch, cols) float32 with unit inner stride, y (batch, rows) likewise.
  void matmul(const py::buffer& values, const py::buffer& x, const py::buffer& y, const py::object& bias) const {
    const float* value_data = values_pointer(values, view_.nnz);
    const py::buffer_info xi = x.request(), yi = y.request(/*writable=*/true);
    const Dense2D xd = dense_from_buffer(xi, "x");
    check_x(xd, view_.cols);
    run(value_data, xd, dense_from_buffer(yi, "out"), bias_pointer(bias, view_.rows));
  }

  // out[:] = the 2-D convolution of x with A read as (out_channels, in_channels / groups, kh, kw)
  // weights (+ bias), see cpu/conv.h. x (batch, in_channels, h, w) and out (batch, rows, out_h,
  // out_w) are C-contiguous float32 and must not overlap; geometry is (kh, kw, stride_h, stride_w,
  // pad_h, pad_w, dil_h, dil_w, groups).
  void conv2d(const py::buffer& values, const py::buffer& x, const py::buffer& y, const py::object& bias,
              const std::vector<int64_t>& geometry) const {
    const float* value_data = values_pointer(values, view_.nnz);
    const py::buffer_info xi = x.request(), yi = y.request(/*writable=*/true);
    const auto contiguous4 = [](const py::buffer_info& b, const char* name) {
      if (b.ndim != 4) throw py::value_error(std::string(name) + " must be 4-D (batch, channels, height, width)");
      if (!format_is(b, 'f', 4)) throw py::type_error(std::string(name) + " must be float32");
      py::ssize_t expect = 4;
      for (int d = 3; d >= 0; --d) {
        if (b.shape[d] > 1 && b.strides[d] != expect) throw py::value_error(std::string(name) + " must be contiguous (NCHW)");
        expect *= b.shape[d];
      }
    };
    contiguous4(xi, "x");
    contiguous4(yi, "out");
    sparsenet::ConvShape s = sparsenet::conv_shape(xi.shape[0], xi.shape[1], xi.shape[2], xi.shape[3], view_.rows,
                                                   geometry);  // std::invalid_argument -> ValueError
    sparsenet::validate_conv(s, view_);
    if (yi.shape[0] != s.batch || yi.shape[1] != s.out_channels || yi.shape[2] != s.out_h || yi.shape[3] != s.out_w)
      throw py::value_error("out must have shape (" + std::to_string(s.batch) + ", " + std::to_string(s.out_channels) +
                            ", " + std::to_string(s.out_h) + ", " + std::to_string(s.out_w) + ")");
    run_conv(value_data, static_cast<const float*>(xi.ptr), static_cast<float*>(yi.ptr),
             bias_pointer(bias, view_.rows), s);
  }

  // conv2d of x (a DLPack capsule: a C-contiguous float32 (batch, in_channels, h, w) CPU tensor)
  // with the values and bias this handle keeps (keep=True), into a new (batch, out_channels * out_h
  // * out_w) float32 tensor returned as a DLPack capsule: SparseConv2d's prepared path, the
  // convolution's counterpart of forward() (one native call, no numpy views, no dispatcher).
  py::object forward_conv2d(const py::object& x, const std::vector<int64_t>& geometry) const {
    if (!owners_) throw py::value_error("this handle does not keep its buffers (keep=False): use conv2d");
    namespace dl = sparsenet::dlpack;
    if (!PyCapsule_IsValid(x.ptr(), dl::kCapsuleName))
      throw py::type_error("x must be an unconsumed DLPack capsule (\"dltensor\")");
    const dl::Tensor& t = static_cast<const dl::ManagedTensor*>(PyCapsule_GetPointer(x.ptr(), dl::kCapsuleName))->dl_tensor;
    if (t.device.device_type != dl::kCPU) throw py::value_error("x must be in CPU memory");
    if (t.ndim != 4) throw py::value_error("x must be 4-D (batch, channels, height, width)");
    if (!(t.dtype.code == dl::kFloat && t.dtype.bits == 32 && t.dtype.lanes == 1)) throw py::type_error("x must be float32");
    if (t.strides) {
      int64_t expect = 1;
      for (int d = 3; d >= 0; --d) {
        if (t.shape[d] > 1 && t.strides[d] != expect) throw py::value_error("x must be contiguous (NCHW)");
        expect *= t.shape[d];
      }
    }
    sparsenet::ConvShape s = sparsenet::conv_shape(t.shape[0], t.shape[1], t.shape[2], t.shape[3], view_.rows, geometry);
    sparsenet::validate_conv(s, view_);
    Dense2D yd;
    py::object y = new_output(s.batch, s.out_channels * s.out_h * s.out_w, &yd, streams_output(s));
    run_conv(view_.values, reinterpret_cast<const float*>(static_cast<const char*>(t.data) + t.byte_offset),
             reinterpret_cast<float*>(yd.ptr), bias_, s);
    return y;
  }

  // x A^T (+ the bias given at construction) as a new (batch, rows) float32 tensor; x and the
  // result are DLPack capsules (torch.utils.dlpack.to_dlpack / from_dlpack). Only for a handle
  // that keeps its buffers alive (keep=True), so nothing else is handed over: the fewest objects
  // touched per call, which is what a batch-1 call after a cache-flushing layer pays for (building
  // a numpy view of x alone cost ~15 us there, exporting a capsule well under 1 us).
  py::object forward(const py::object& x) const {
    return forward_new(x, static_cast<bool>(owners_), view_.rows, view_.cols,
                       [&](const Dense2D& xd, const Dense2D& yd) { run(view_.values, xd, yd, bias_); });
  }

  // The validated structure as read-only numpy views of this handle's own copy, which they keep
  // alive: for code that needs the structure elsewhere (the backward pass) and must not trust the
  // caller's tensors, which may have been written to behind torch's back since.
  static py::tuple structure(const py::object& self) {
    const CsrHandle& h = self.cast<const CsrHandle&>();
    py::array row_ptr(py::dtype::of<int64_t>(), {h.view_.rows + 1}, {int64_t{8}}, h.row_ptr_.data(), self);
    py::array col = h.view_.index_bytes == 2
        ? py::array(py::dtype::of<uint16_t>(), {h.view_.nnz}, {int64_t{2}}, h.col_idx_.data(), self)
        : py::array(py::dtype::of<int32_t>(), {h.view_.nnz}, {int64_t{4}}, h.col_idx_.data(), self);
    for (py::array* a : {&row_ptr, &col}) a->attr("flags").attr("writeable") = false;
    return py::make_tuple(row_ptr, col);
  }

  double rows_run_together() const { return sparsenet::rows_run_together(view_); }
  int64_t rows() const { return view_.rows; }
  int64_t cols() const { return view_.cols; }
  int64_t nnz() const { return view_.nnz; }
  int index_bytes() const { return view_.index_bytes; }
  bool keeps_buffers() const { return static_cast<bool>(owners_); }
  // The column-tiled copy the last call built or kept (tiled.h): (padding multiple, longest first,
  // entries stored with the padding), or None.
  py::object tiled_layout() const {
    const auto held = tiled_.held();
    if (!held) return py::none();
    return py::make_tuple(held->pad, held->longest_first, static_cast<int64_t>(held->values.size()));
  }

 private:
  friend class NmHandle;      // run their batches on a CsrHandle over a derived structure
  friend class BitmapHandle;

  // A handle over a structure derived from another format's, over the same values (in their order):
  // fill(row_ptr, col_idx, index_bytes) writes its rows + 1 offsets and nnz column indices
  // (index_bytes 2 for up to 65536 columns, else 4).
  template <typename Fill>
  static std::unique_ptr<const CsrHandle> derived(int64_t rows, int64_t cols, int64_t nnz, Fill fill) {
    const int index_bytes = cols <= 65536 ? 2 : 4;
    std::vector<int64_t> row_ptr(rows + 1);
    std::vector<uint8_t> col(static_cast<size_t>(nnz * index_bytes));
    fill(row_ptr.data(), col.data(), index_bytes);
    return std::make_unique<const CsrHandle>(rows, cols, std::move(row_ptr), std::move(col), index_bytes);
  }

  // Whether the kernel writes shape s's output past the caches (conv.h's stream_output): forward_conv2d
  // takes such an output from the pool (new_output), run_conv tells the kernel.
  static bool streams_output(const sparsenet::ConvShape& s) {
    return sparsenet::cpu::plan::streams_conv_output(s.batch * s.out_channels * s.out_h * s.out_w *
                                                     static_cast<int64_t>(sizeof(float)));
  }

  // The convolution of validated shape s: x and y checked for shape and layout by the caller; here
  // the overlap check, the kernel and the non-finite pass.
  void run_conv(const float* values, const float* x, float* y, const float* bias, const sparsenet::ConvShape& s) const {
    const int64_t xsize = s.batch * s.in_channels * s.in_h * s.in_w, ysize = s.batch * s.out_channels * s.out_h * s.out_w;
    if (xsize > 0 && ysize > 0 && y < x + xsize && x < y + ysize) throw py::value_error("out must not overlap x");
    if (ysize == 0) return;
    sparsenet::ConvArgs c;
    c.x = x;
    c.y = y;
    c.bias = bias;
    c.num_threads = g_num_threads.load(std::memory_order_relaxed);
    c.stream_output = streams_output(s);
    c.prefetch_input = sparsenet::cpu::plan::prefetches_conv_input(xsize * static_cast<int64_t>(sizeof(float)));
    sparsenet::CsrView view = view_;
    view.values = values;
    // (held here: a call from another thread on another input size may replace the handle's plan
    // while this one's kernel still reads it)
    const std::shared_ptr<const ConvPlan> plan = direct_for(s);
    // Where the offsets do not fit int32 (planes of over 2^31 floats), the portable kernel.
    const auto kernel = plan ? sparsenet::cpu::csr_conv2d_kernel() : &sparsenet::cpu::fallback::csr_conv2d;
    const sparsenet::DirectConv none;
    py::gil_scoped_release nogil;
    if (!kernel(view, s, c, plan ? plan->direct : none)) sparsenet::propagate_nonfinite(view, s, c);
  }

  // x has passed check_x (before forward allocates its output).
  void run(const float* values, const Dense2D& x, const Dense2D& y, const float* bias) const {
    sparsenet::XCheck check;  // (the kernels may check x for Inf and NaN as they load it)
    sparsenet::DenseArgs d = dense_args(x, y, view_.rows, view_.cols, bias);
    d.x_check = &check;
    const int64_t batch = d.batch;
    if (batch == 0 || view_.rows == 0) return;
    const auto kernel = sparsenet::cpu::csr_matmul_kernel();
    sparsenet::CsrView view = view_;
    view.values = values;
    // (held here: a call from another thread with other values may replace the handle's copy while
    // this one's kernel still reads it)
    const std::shared_ptr<const sparsenet::cpu::TiledCsr> tiled = tiled_for(batch, values);
    view.tiled = tiled.get();
    py::gil_scoped_release nogil;
    kernel(view, d);
    sparsenet::propagate_nonfinite(view, d);
  }

  // The convolution's input offsets (cpu/conv.h) for one input size and geometry; `direct` points
  // into the vectors beside it.
  struct ConvPlan {
    std::vector<uint16_t> offsets;
    std::vector<int64_t> blocks;
    std::vector<int32_t> sources;
    std::vector<uint8_t> same_rows;
    sparsenet::DirectConv direct;
  };

  // The plan for shape s, built on first use and kept while calls keep that shape; null where its
  // offsets would not fit int32.
  std::shared_ptr<const ConvPlan> direct_for(const sparsenet::ConvShape& s) const {
    const std::vector<int64_t> key = {s.in_h, s.in_w, s.kernel_h, s.kernel_w, s.stride_h, s.stride_w, s.pad_h,
                                      s.pad_w, s.dil_h, s.dil_w, s.in_channels, s.groups};
    return direct_.get(key, [&]() -> std::shared_ptr<const ConvPlan> {
      auto plan = std::make_shared<ConvPlan>();
      plan->offsets.resize(static_cast<size_t>(view_.nnz));
      if (!sparsenet::direct_offsets(view_, s, &plan->direct, plan->offsets.data(), &plan->blocks, &plan->sources,
                                     &plan->same_rows))
        return nullptr;
      return plan;
    });
  }

  // The column-tiled copy (cpu/tiled.h), where the planner says a call gains from it. It copies the
  // values too, so it is rebuilt when handed others, and when the kernel family (set_isa) asks for
  // another layout.
  std::shared_ptr<const sparsenet::cpu::TiledCsr> tiled_for(int64_t batch, const float* values) const {
    if (batch < sparsenet::cpu::plan::kPanelMinBatch) return nullptr;  // batch 1 pays nothing for this
    const std::string isa = sparsenet::cpu::active_isa();
    const double density = sparsenet::cpu::baseline::density(view_);
    if (!sparsenet::cpu::plan::wants_tiled_csr(isa, batch, density)) return nullptr;
    const int64_t pad = sparsenet::cpu::plan::tiled_row_padding(
        isa, density, view_.rows * sparsenet::cpu::TiledCsr::tiles_for(view_.cols));
    const bool longest_first = sparsenet::cpu::plan::tiled_longest_first(isa);
    return tiled_.get({values, pad, longest_first}, [&] {
      sparsenet::CsrView from = view_;
      from.values = values;
      return std::make_shared<const sparsenet::cpu::TiledCsr>(sparsenet::cpu::build_tiled(from, pad, longest_first));
    });
  }

  CsrView view_;  // structure: this handle's private copy; values: the kept buffer (keep=True)
  std::vector<int64_t> row_ptr_;
  std::vector<uint8_t, sparsenet::cpu::HugePageAllocator<uint8_t>> col_idx_;  // streamed on every call
  const float* bias_ = nullptr;              // keep=True: the bias given at construction, if any
  std::shared_ptr<const py::tuple> owners_;  // keep=True: the values (and bias), kept alive
  DerivedCache<sparsenet::cpu::TiledCsr, std::tuple<const float*, int64_t, bool>> tiled_;  // values, layout
  DerivedCache<ConvPlan, std::vector<int64_t>> direct_;          // keyed by the input shape
};


// What the handles of the formats besides CSR share: forward() over DLPack for a handle that keeps
// its buffers, matmul() over buffers handed to it, and the bias and values a keep=True handle holds.
// Derived keeps its validated structure in view_ and provides nnz() (the values it reads) and
// run(view, x, y, bias) (x has passed check_x).
template <typename Derived, typename View>
class FormatHandle {
 public:
  // x A^T (+ the bias given at construction) as a new tensor; x and the result are DLPack capsules
  // (keep=True handles only): the few objects touched per call that a batch-1 call can afford.
  py::object forward(const py::object& x) const {
    return forward_new(x, static_cast<bool>(owners_), view_.rows, view_.cols,
                       [&](const Dense2D& xd, const Dense2D& yd) { self().run(view_, xd, yd, bias_); });
  }

  // out[:] = x A^T (+ bias) with A's values read from `values` (float32, nnz() entries).
  void matmul(const py::buffer& values, const py::buffer& x, const py::buffer& y, const py::object& bias) const {
    const float* value_data = values_pointer(values, self().nnz());
    const py::buffer_info xi = x.request(), yi = y.request(/*writable=*/true);
    const Dense2D xd = dense_from_buffer(xi, "x");
    check_x(xd, view_.cols);
    View view = view_;
    view.values = value_data;
    self().run(view, xd, dense_from_buffer(yi, "out"), bias_pointer(bias, view_.rows));
  }

  int64_t rows() const { return view_.rows; }
  int64_t cols() const { return view_.cols; }
  bool keeps_buffers() const { return static_cast<bool>(owners_); }

 protected:
  // Once the structure is validated: the bias (keep=True only) and, with keep=True, the values
  // (and bias) held alive by the handle itself, for forward().
  void hold(bool keep, const py::buffer& values, const py::buffer_info& va, const py::object& bias) {
    if (!bias.is_none() && !keep) throw py::value_error("bias is kept only by a handle with keep=True");
    bias_ = bias_pointer(bias, view_.rows);
    if (keep) {
      owners_ = std::make_shared<const py::tuple>(py::make_tuple(values, bias));
      view_.values = static_cast<const float*>(va.ptr);
    }
  }

  View view_;  // structure: the handle's private copy; values: the kept buffer (keep=True)

 private:
  const Derived& self() const { return static_cast<const Derived&>(*this); }

  const float* bias_ = nullptr;              // keep=True: the bias given at construction, if any
  std::shared_ptr<const py::tuple> owners_;  // keep=True: the values (and bias), kept alive
};

// A bitmap-compressed weight checked once and ready to multiply (see csrc/cpu/bitmap_view.h for the
// layout). As CsrHandle: it copies the structure (masks and row offsets), validates the copy and
// reads only that; the values are handed over on every call (any float is memory-safe to read, and
// the copy's row offsets, checked against the value count, bound every read of them).
class BitmapHandle : public FormatHandle<BitmapHandle, sparsenet::BitmapView> {
 public:
  BitmapHandle(int64_t rows, int64_t cols, const py::buffer& masks, const py::buffer& row_ptr, const py::buffer& values,
               bool keep, const py::object& bias) {
    if (rows < 0 || cols < 0) throw py::value_error("rows and cols must be non-negative");
    const auto ma = vector_info(masks, "masks");
    const auto rp = vector_info(row_ptr, "row_ptr");
    const auto va = vector_info(values, "values");
    if (!format_is(ma, 'H', 2)) throw py::type_error("masks must be uint16, got format '" + ma.format + "'");
    if (!format_is(rp, 'q', 8)) throw py::type_error("row_ptr must be int64");
    if (!format_is(va, 'f', 4)) throw py::type_error("values must be float32");
    const int64_t chunks = sparsenet::bitmap_chunks(cols);
    if (ma.size != rows * chunks)
      throw py::value_error("masks has " + std::to_string(ma.size) + " entries, expected rows * ceil(cols / 16) = " +
                            std::to_string(rows * chunks));
    if (rp.size != rows + 1)
      throw py::value_error("row_ptr has " + std::to_string(rp.size) + " entries, expected rows + 1 = " +
                            std::to_string(rows + 1));
    const auto* mask_data = static_cast<const uint16_t*>(ma.ptr);
    const auto* rp_data = static_cast<const int64_t*>(rp.ptr);
    masks_.assign(mask_data, mask_data + ma.size);
    row_ptr_.assign(rp_data, rp_data + rp.size);
    view_.rows = rows;
    view_.cols = cols;
    view_.chunks = chunks;
    view_.nnz = va.size;
    view_.masks = masks_.data();
    view_.row_ptr = row_ptr_.data();
    sparsenet::validate_bitmap(view_);  // throws std::invalid_argument -> ValueError
    hold(keep, values, va, bias);
  }

  // (masks, row_ptr): read-only numpy views of the handle's validated copy, which they keep alive.
  static py::tuple structure(const py::object& self) {
    const BitmapHandle& h = self.cast<const BitmapHandle&>();
    py::array masks(py::dtype::of<uint16_t>(), {static_cast<int64_t>(h.masks_.size())}, {int64_t{2}}, h.masks_.data(), self);
    py::array row_ptr(py::dtype::of<int64_t>(), {h.view_.rows + 1}, {int64_t{8}}, h.row_ptr_.data(), self);
    for (py::array* a : {&masks, &row_ptr}) a->attr("flags").attr("writeable") = false;
    return py::make_tuple(masks, row_ptr);
  }

  int64_t nnz() const { return view_.nnz; }

 private:
  friend class FormatHandle<BitmapHandle, sparsenet::BitmapView>;

  // x has passed check_x.
  void run(const sparsenet::BitmapView& view, const Dense2D& x, const Dense2D& y, const float* bias) const {
    if (x.rows >= sparsenet::cpu::plan::kBitmapCsrMinBatchAvx2 &&  // (small batches pay nothing for this)
        sparsenet::cpu::plan::bitmap_batch_on_csr(sparsenet::cpu::active_isa(), x.rows)) {
      derived_csr().run(view.values, x, y, bias);  // (before the GIL is released: builds under it)
      return;
    }
    sparsenet::XCheck check;  // (the kernels may check x for Inf and NaN as they load it)
    sparsenet::DenseArgs d = dense_args(x, y, view.rows, view.cols, bias);
    d.x_check = &check;
    if (d.batch == 0 || view.rows == 0) return;
    const auto kernel = sparsenet::cpu::bitmap_matmul_kernel();
    py::gil_scoped_release nogil;
    kernel(view, d);
    sparsenet::propagate_nonfinite(view, d);
  }

  // A CSR structure over the same values (planner: bitmap_batch_on_csr), built on first use.
  const CsrHandle& derived_csr() const {
    if (!csr_)
      csr_ = CsrHandle::derived(view_.rows, view_.cols, view_.nnz, [&](int64_t* row_ptr, void* col, int index_bytes) {
        std::copy(row_ptr_.begin(), row_ptr_.end(), row_ptr);
        sparsenet::bitmap_to_csr(view_, col, index_bytes);
      });
    return *csr_;
  }

  std::vector<uint16_t, sparsenet::cpu::HugePageAllocator<uint16_t>> masks_;  // streamed on every call
  std::vector<int64_t> row_ptr_;
  mutable std::unique_ptr<const CsrHandle> csr_;
};

// A block-sparse (BSR) weight checked once and ready to multiply (see csrc/cpu/bsr_view.h for the
// layout). As CsrHandle: it copies the structure (block shape, block row pointers, block columns),
// validates the copy and reads only that; the values are handed over on every call, their count
// checked against the copy's blocks.
class BsrHandle : public FormatHandle<BsrHandle, sparsenet::BsrView> {
 public:
  BsrHandle(int64_t rows, int64_t cols, const py::buffer& block_shape, const py::buffer& block_ptr,
            const py::buffer& block_cols, const py::buffer& values, bool keep, const py::object& bias) {
    if (rows < 0 || cols < 0) throw py::value_error("rows and cols must be non-negative");
    const auto bs = vector_info(block_shape, "block_shape");
    const auto bp = vector_info(block_ptr, "block_ptr");
    const auto bc = vector_info(block_cols, "block_cols");
    const auto va = vector_info(values, "values");
    if (!format_is(bs, 'q', 8) || bs.size != 2) throw py::type_error("block_shape must be 2 int64 (r, c)");
    if (!format_is(bp, 'q', 8)) throw py::type_error("block_ptr must be int64");
    if (!format_is(bc, 'i', 4)) throw py::type_error("block_cols must be int32, got format '" + bc.format + "'");
    if (!format_is(va, 'f', 4)) throw py::type_error("values must be float32");
    const auto* shape = static_cast<const int64_t*>(bs.ptr);
    view_.rows = rows;
    view_.cols = cols;
    view_.r = shape_[0] = shape[0];
    view_.c = shape_[1] = shape[1];
    if (view_.r < 1 || view_.c < 1 || view_.r > sparsenet::kBsrMaxBlock || view_.c > sparsenet::kBsrMaxBlock)
      throw py::value_error("block shape must be 1..64 x 1..64, got " + std::to_string(view_.r) + "x" +
                            std::to_string(view_.c));
    view_.block_rows = sparsenet::bsr_block_rows(rows, view_.r);
    if (bp.size != view_.block_rows + 1)
      throw py::value_error("block_ptr has " + std::to_string(bp.size) + " entries, expected ceil(rows / r) + 1 = " +
                            std::to_string(view_.block_rows + 1));
    view_.nnzb = bc.size;
    if (va.size != bc.size * view_.r * view_.c)
      throw py::value_error("values has " + std::to_string(va.size) + " entries, expected " + std::to_string(bc.size) +
                            " blocks x " + std::to_string(view_.r * view_.c));
    const auto* bp_data = static_cast<const int64_t*>(bp.ptr);
    const auto* bc_data = static_cast<const int32_t*>(bc.ptr);
    block_ptr_.assign(bp_data, bp_data + bp.size);
    block_cols_.assign(bc_data, bc_data + bc.size);
    view_.block_ptr = block_ptr_.data();
    view_.block_cols = block_cols_.data();
    sparsenet::validate_bsr(view_);  // throws std::invalid_argument -> ValueError
    hold(keep, values, va, bias);
  }

  // (block_shape, block_ptr, block_cols): read-only numpy views of the validated copy.
  static py::tuple structure(const py::object& self) {
    const BsrHandle& h = self.cast<const BsrHandle&>();
    py::array shape = py::array(py::dtype::of<int64_t>(), {int64_t{2}}, {int64_t{8}}, h.shape_, self);
    py::array block_ptr(py::dtype::of<int64_t>(), {h.view_.block_rows + 1}, {int64_t{8}}, h.block_ptr_.data(), self);
    py::array block_cols(py::dtype::of<int32_t>(), {h.view_.nnzb}, {int64_t{4}}, h.block_cols_.data(), self);
    for (py::array* a : {&shape, &block_ptr, &block_cols}) a->attr("flags").attr("writeable") = false;
    return py::make_tuple(shape, block_ptr, block_cols);
  }

  int64_t nnz() const { return view_.nnzb * view_.r * view_.c; }

 private:
  friend class FormatHandle<BsrHandle, sparsenet::BsrView>;

  void run(sparsenet::BsrView view, const Dense2D& x, const Dense2D& y, const float* bias) const {
    sparsenet::XCheck check;  // (the kernels may check x for Inf and NaN as they load it)
    sparsenet::DenseArgs d = dense_args(x, y, view.rows, view.cols, bias);
    d.x_check = &check;
    if (d.batch == 0 || view.rows == 0) return;
    const auto kernel = sparsenet::cpu::bsr_matmul_kernel();
    // (built under the GIL, and held here: a call from another thread with other values may replace
    // the handle's copy while this one's kernel still reads it)
    const std::shared_ptr<const Transposed> transposed = transposed_for(view);
    if (transposed) {
      view.values_t = transposed->values.data();
      view.slice = transposed->slice;
    }
    py::gil_scoped_release nogil;
    kernel(view, d);
    sparsenet::propagate_nonfinite(view, d);
  }

  // The block-transposed copy of view's values (bsr_transpose_blocks) where the planner runs this
  // ISA and block shape on it, else null: built on first use, rebuilt when handed other values.
  struct Transposed {
    std::vector<float, sparsenet::cpu::HugePageAllocator<float>> values;
    int64_t slice = 0;
  };
  std::shared_ptr<const Transposed> transposed_for(const sparsenet::BsrView& view) const {
    const int64_t slice = sparsenet::cpu::plan::bsr_direct_slice(sparsenet::cpu::active_isa(), view.r, view.c);
    if (slice == 0) return nullptr;
    return transposed_.get({view.values, slice}, [&] {
      auto t = std::make_shared<Transposed>();
      t->values.resize(static_cast<size_t>(view.nnzb * view.r * view.c));
      sparsenet::bsr_transpose_blocks(view, slice, t->values.data());
      t->slice = slice;
      return std::shared_ptr<const Transposed>(std::move(t));
    });
  }

  int64_t shape_[2] = {1, 1};  // (r, c), as structure() shows it
  std::vector<int64_t> block_ptr_;
  std::vector<int32_t, sparsenet::cpu::HugePageAllocator<int32_t>> block_cols_;
  DerivedCache<Transposed, std::pair<const float*, int64_t>> transposed_;  // keyed by (values, slice)
};

// An N:M weight checked once and ready to multiply (see csrc/cpu/nm_view.h for the layout). As the
// other handles, it copies the structure (pattern, packed indices), validates the copy and reads
// only that. Below plan::kNmPanelMinBatch inputs its own kernels run; from there a CsrHandle over
// a CSR structure derived from the copy (built on first use, under the GIL) runs CSR's batch
// kernels on the very same values.
class NmHandle : public FormatHandle<NmHandle, sparsenet::NmView> {
 public:
  NmHandle(int64_t rows, int64_t cols, const py::buffer& pattern, const py::buffer& indices, const py::buffer& values,
           bool keep, const py::object& bias) {
    if (rows < 0 || cols < 0) throw py::value_error("rows and cols must be non-negative");
    const auto pa = vector_info(pattern, "pattern");
    const auto ix = vector_info(indices, "indices");
    const auto va = vector_info(values, "values");
    if (!format_is(pa, 'q', 8) || pa.size != 2) throw py::type_error("pattern must be 2 int64 (n, m)");
    if (!format_is(ix, 'B', 1)) throw py::type_error("indices must be uint8, got format '" + ix.format + "'");
    if (!format_is(va, 'f', 4)) throw py::type_error("values must be float32");
    const auto* nm = static_cast<const int64_t*>(pa.ptr);
    pattern_[0] = nm[0];
    pattern_[1] = nm[1];
    if (nm[1] < 2 || nm[1] > sparsenet::kNmMaxM || nm[0] < 1 || nm[0] >= nm[1])
      throw py::value_error("pattern must be N:M with 1 <= N < M <= 16, got " + std::to_string(nm[0]) + ":" +
                            std::to_string(nm[1]));
    view_.rows = rows;
    view_.cols = cols;
    view_.n = nm[0];
    view_.m = nm[1];
    view_.bits = sparsenet::nm_index_bits(view_.m);
    view_.groups = sparsenet::nm_groups(cols, view_.m);
    view_.row_bytes = sparsenet::nm_row_bytes(cols, view_.n, view_.m);
    if (ix.size != rows * view_.row_bytes)
      throw py::value_error("indices has " + std::to_string(ix.size) + " bytes, expected rows x " +
                            std::to_string(view_.row_bytes));
    if (va.size != rows * view_.slots())
      throw py::value_error("values has " + std::to_string(va.size) + " entries, expected rows x groups x n = " +
                            std::to_string(rows * view_.slots()));
    const auto* ix_data = static_cast<const uint8_t*>(ix.ptr);
    indices_.assign(ix_data, ix_data + ix.size);
    view_.indices = indices_.data();
    sparsenet::validate_nm(view_);  // throws std::invalid_argument -> ValueError
    hold(keep, values, va, bias);
  }

  // (pattern, indices): read-only numpy views of the validated copy.
  static py::tuple structure(const py::object& self) {
    const NmHandle& h = self.cast<const NmHandle&>();
    py::array pattern(py::dtype::of<int64_t>(), {int64_t{2}}, {int64_t{8}}, h.pattern_, self);
    py::array indices(py::dtype::of<uint8_t>(), {static_cast<int64_t>(h.indices_.size())}, {int64_t{1}},
                      h.indices_.data(), self);
    for (py::array* a : {&pattern, &indices}) a->attr("flags").attr("writeable") = false;
    return py::make_tuple(pattern, indices);
  }

  int64_t nnz() const { return view_.rows * view_.slots(); }

 private:
  friend class FormatHandle<NmHandle, sparsenet::NmView>;

  void run(const sparsenet::NmView& view, const Dense2D& x, const Dense2D& y, const float* bias) const {
    if (sparsenet::cpu::plan::nm_batch_on_csr(x.rows)) {  // before the GIL is released: builds under it
      derived_csr().run(view.values, x, y, bias);
      return;
    }
    sparsenet::XCheck check;  // (the kernels may check x for Inf and NaN as they load it)
    sparsenet::DenseArgs d = dense_args(x, y, view.rows, view.cols, bias);
    d.x_check = &check;
    if (d.batch == 0 || view.rows == 0) return;
    const auto kernel = sparsenet::cpu::nm_matmul_kernel();
    py::gil_scoped_release nogil;
    kernel(view, d);
    sparsenet::propagate_nonfinite(view, d);
  }

  const CsrHandle& derived_csr() const {
    if (!csr_)
      csr_ = CsrHandle::derived(view_.rows, view_.cols, nnz(), [&](int64_t* row_ptr, void* col, int index_bytes) {
        sparsenet::nm_to_csr(view_, row_ptr, col, index_bytes);
      });
    return *csr_;
  }

  int64_t pattern_[2] = {2, 4};
  std::vector<uint8_t, sparsenet::cpu::HugePageAllocator<uint8_t>> indices_;  // streamed on every call
  mutable std::unique_ptr<const CsrHandle> csr_;
};

constexpr const char* kCopyDoc =
    "Copy and validate the weight's structure once; matmul is handed the values on every call. keep=True holds the "
    "values (and the optional bias) instead, and enables forward().";

// The methods every FormatHandle binds alike.
template <typename Handle>
void bind_format_handle(py::class_<Handle> cls, const char* structure_doc) {
  cls.def("forward", &Handle::forward, py::arg("x"),
          "x @ A.T (+ bias) as a new tensor; x and the result are DLPack capsules (keep=True handles only)")
      .def("matmul", &Handle::matmul, py::arg("values"), py::arg("x"), py::arg("out"), py::arg("bias") = py::none(),
           "out[:] = x @ A.T (+ bias), A being the validated structure with these values")
      .def("structure", &Handle::structure, structure_doc)
      .def_property_readonly("keeps_buffers", &Handle::keeps_buffers)
      .def_property_readonly("rows", &Handle::rows)
      .def_property_readonly("cols", &Handle::cols)
      .def_property_readonly("nnz", &Handle::nnz);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparsenet CPU kernels (torch-free; see sparsenet/ops for the torch integration)";

  py::class_<CsrHandle>(m, "CsrHandle")
      .def(py::init<int64_t, int64_t, const py::buffer&, const py::buffer&, const py::buffer&, bool, const py::object&>(),
           py::arg("rows"), py::arg("cols"), py::arg("crow_indices"), py::arg("col_indices"), py::arg("values"),
           py::arg("keep") = false, py::arg("bias") = py::none(),
           "Copy and validate a packed CSR weight's structure once; matmul is handed the values on every call. "
           "keep=True holds the values (and the optional bias) instead, and enables forward().")
      .def("matmul", &CsrHandle::matmul, py::arg("values"), py::arg("x"), py::arg("out"),
           py::arg("bias") = py::none(),
           "out[:] = x @ A.T (+ bias), A being the validated structure with these values (nnz float32)")
      .def("tiled_layout", &CsrHandle::tiled_layout,
           "(pad, longest_first, entries) of the column-tiled copy the last call built or kept, None "
           "before one: each row's share of a tile padded with zero weights to a multiple of pad (1: "
           "none), a block's shares held longest first, entries stored with the padding")
      .def("rows_run_together", &CsrHandle::rows_run_together,
           "the share of rows the convolution kernels run together with others (runs of rows storing the "
           "same columns, taken 4 and 2 at a time)")
      .def("forward_conv2d", &CsrHandle::forward_conv2d, py::arg("x"), py::arg("geometry"),
           "conv2d of x (a DLPack capsule of a contiguous float32 NCHW CPU tensor) with the kept values and "
           "bias, as a new (batch, out_channels * out_h * out_w) tensor's DLPack capsule; keep=True handles only. "
           "geometry as conv2d's.")
      .def("conv2d", &CsrHandle::conv2d, py::arg("values"), py::arg("x"), py::arg("out"), py::arg("bias"),
           py::arg("geometry"),
           "out[:] = conv2d(x, A as (out_channels, in_channels / groups, kh, kw)) (+ bias); NCHW float32; "
           "geometry = (kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups)")
      .def("forward", &CsrHandle::forward, py::arg("x"),
           "x @ A.T (+ bias) as a new tensor; x and the result are DLPack capsules (keep=True handles only)")
      .def("structure", &CsrHandle::structure,
           "(crow_indices, col_indices): read-only numpy views of the handle's validated copy")
      .def_property_readonly("keeps_buffers", &CsrHandle::keeps_buffers)
      .def_property_readonly("rows", &CsrHandle::rows)
      .def_property_readonly("cols", &CsrHandle::cols)
      .def_property_readonly("nnz", &CsrHandle::nnz)
      .def_property_readonly("index_bytes", &CsrHandle::index_bytes);

  bind_format_handle(py::class_<BitmapHandle>(m, "BitmapHandle")
      .def(py::init<int64_t, int64_t, const py::buffer&, const py::buffer&, const py::buffer&, bool, const py::object&>(),
           py::arg("rows"), py::arg("cols"), py::arg("masks"), py::arg("row_ptr"), py::arg("values"),
           py::arg("keep") = false, py::arg("bias") = py::none(), kCopyDoc),
      "(masks, row_ptr): read-only numpy views of the validated copy");
  bind_format_handle(py::class_<BsrHandle>(m, "BsrHandle")
      .def(py::init<int64_t, int64_t, const py::buffer&, const py::buffer&, const py::buffer&, const py::buffer&, bool,
                    const py::object&>(),
           py::arg("rows"), py::arg("cols"), py::arg("block_shape"), py::arg("block_ptr"), py::arg("block_cols"),
           py::arg("values"), py::arg("keep") = false, py::arg("bias") = py::none(), kCopyDoc),
      "(block_shape, block_ptr, block_cols): read-only numpy views of the validated copy");
  bind_format_handle(py::class_<NmHandle>(m, "NmHandle")
      .def(py::init<int64_t, int64_t, const py::buffer&, const py::buffer&, const py::buffer&, bool, const py::object&>(),
           py::arg("rows"), py::arg("cols"), py::arg("pattern"), py::arg("indices"), py::arg("values"),
           py::arg("keep") = false, py::arg("bias") = py::none(), kCopyDoc),
      "(pattern, indices): read-only numpy views of the validated copy");

  m.def("compiled_isas", &sparsenet::cpu::compiled_isas);
  m.def("supported_isas", &sparsenet::cpu::supported_isas);
  m.def("active_isa", &sparsenet::cpu::active_isa);
  m.def(
      "runs_csr_kernels",
      [](const std::string& format, int64_t rows) {
        return sparsenet::cpu::plan::batch_on_derived_csr(format, sparsenet::cpu::active_isa(), rows);
      },
      py::arg("format"), py::arg("rows"),
      "Whether a CPU layer of `format` called on `rows` rows runs CSR's kernels over a structure derived "
      "from its own (bitmap on AVX2 from 5 rows, N:M from 4), with the active ISA");
  m.def("set_isa", &sparsenet::cpu::set_isa, py::arg("name"));
  sparsenet::cpu::OutputPool::instance();  // created now, so that the fork handler never allocates
  pthread_atfork(nullptr, nullptr, after_fork_in_child);
  m.def("set_num_threads", &set_num_threads, py::arg("n"),
        "threads for the kernels: at least 1, at most usable_threads(); 1 in a forked child");
  m.def("get_num_threads", []() { return g_num_threads.load(); });
  m.def("usable_threads", &usable_threads, "CPUs this process may run on (affinity mask, OpenMP's thread limit)");
  m.def("in_forked_child", []() { return g_forked.load(); });
  m.def("output_cache_bytes", []() { return sparsenet::cpu::OutputPool::instance().kept_bytes(); },
        "bytes of freed large outputs kept for reuse (see csrc/cpu/output_pool.h)");
  m.def("release_output_cache", []() { return sparsenet::cpu::OutputPool::instance().release(); },
        "unmaps the freed large outputs kept for reuse; returns the bytes given back");
  m.def("max_threads", []() { return omp_get_max_threads(); });
  m.def("last_level_cache_bytes", &sparsenet::cpu::plan::last_level_cache_bytes,
        "the last-level cache size the kernels plan by (0: unknown); convolutions stream outputs of more than "
        "a third of it past the caches");
  m.def("set_last_level_cache_bytes", &sparsenet::cpu::plan::set_last_level_cache_bytes, py::arg("bytes"),
        "sets the last-level cache size the kernels plan by (the package hands over Linux's at import); "
        "returns the size before");
  m.attr("compiler") = SPARSENET_COMPILER;
  m.attr("openmp_version") = _OPENMP;
}
