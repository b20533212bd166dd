// sparsenet._C_cuda: the CUDA kernels (csrc/cuda) behind Python handles. Tensors cross as DLPack
// capsules (bindings/dlpack_abi.h), whose device, dtype, shape and strides are checked here before
// any launch; streams cross as the integer handle torch.cuda.Stream.cuda_stream gives.
//
// A handle copies the packed structure to the host once, validates it there (cpu/*_view.h) and
// uploads its own device copy, which its kernels read from then on: no later write to the caller's
// tensors can make a kernel read out of bounds, as for the CPU handles.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <type_traits>
#include <utility>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings/dlpack_abi.h"
#include "cpu/bitmap_view.h"
#include "cpu/bsr_view.h"
#include "cpu/csr_view.h"
#include "cpu/nm_view.h"
#include "cuda/bitmap_cuda.h"
#include "cuda/bsr_cuda.h"
#include "cuda/conv_cuda.h"
#include "cuda/csr_cuda.h"
#include "cuda/nm_cuda.h"

namespace py = pybind11;
namespace dl = sparsenet::dlpack;

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

const dl::Tensor& tensor_of(const py::object& capsule, const char* name) {
  if (!PyCapsule_IsValid(capsule.ptr(), dl::kCapsuleName))
    throw py::type_error(std::string(name) + " must be an unconsumed DLPack capsule (torch.utils.dlpack.to_dlpack)");
  return static_cast<const dl::ManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), dl::kCapsuleName))->dl_tensor;
}

const char* data_of(const dl::Tensor& t) { return static_cast<const char*>(t.data) + t.byte_offset; }

bool contiguous(const dl::Tensor& t) {
  if (!t.strides) return true;
  int64_t expect = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    if (t.shape[d] > 1 && t.strides[d] != expect) return false;
    expect *= t.shape[d];
  }
  return true;
}

std::string shape_of(const dl::Tensor& t) {
  std::string s = "(";
  for (int d = 0; d < t.ndim; ++d) s += (d ? ", " : "") + std::to_string(t.shape[d]);
  return s + (t.ndim == 1 ? ",)" : ")");
}

sparsenet::cuda::DType value_type(const dl::Tensor& t, const char* name) {
  if (t.dtype.lanes == 1 && t.dtype.code == dl::kFloat && t.dtype.bits == 32) return sparsenet::cuda::DType::kFloat32;
  if (t.dtype.lanes == 1 && t.dtype.code == dl::kFloat && t.dtype.bits == 16) return sparsenet::cuda::DType::kFloat16;
  if (t.dtype.lanes == 1 && t.dtype.code == dl::kBfloat && t.dtype.bits == 16) return sparsenet::cuda::DType::kBFloat16;
  throw py::type_error(std::string(name) + " must be float32, float16 or bfloat16");
}

// Sets the current device for the scope (a call may come from a thread whose current device is
// another GPU) and restores the caller's.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() { cudaSetDevice(previous_); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

// A device buffer this module allocated (on `device`), freed with it.
class DeviceCopy {
 public:
  DeviceCopy(int device, const void* host, size_t bytes) : device_(device) {
    check(cudaMalloc(&ptr_, bytes ? bytes : 1), "cudaMalloc");
    if (bytes) check(cudaMemcpy(ptr_, host, bytes, cudaMemcpyHostToDevice), "uploading a weight's structure");
  }
  ~DeviceCopy() {
    int previous = 0;
    if (cudaGetDevice(&previous) != cudaSuccess) return;
    cudaSetDevice(device_);
    cudaFree(ptr_);
    cudaSetDevice(previous);
  }
  DeviceCopy(const DeviceCopy&) = delete;
  DeviceCopy& operator=(const DeviceCopy&) = delete;
  const void* get() const { return ptr_; }

 private:
  int device_;
  void* ptr_ = nullptr;
};

// A 1-D contiguous CUDA tensor's bytes, copied to the host (synchronises: once per handle).
std::vector<uint8_t> to_host(const dl::Tensor& t) {
  std::vector<uint8_t> host(static_cast<size_t>(t.shape[0] * (t.dtype.bits / 8)));
  if (!host.empty()) check(cudaMemcpy(host.data(), data_of(t), host.size(), cudaMemcpyDeviceToHost), "reading a weight's structure");
  return host;
}

// What a handle's constructor needs of one structure tensor: 1-D, contiguous, on the first one's
// CUDA device, one of the given (code, bits) types. Returns it.
const dl::Tensor& structure_tensor(const py::object& capsule, const char* name, std::initializer_list<std::pair<int, int>> types,
                                   int* device) {
  const dl::Tensor& t = tensor_of(capsule, name);
  if (t.device.device_type != dl::kCUDA || (*device >= 0 && t.device.device_id != *device))
    throw py::value_error(std::string(name) + " must be on the CUDA device of the weight's other tensors");
  *device = t.device.device_id;
  bool typed = false;
  for (auto [code, bits] : types) typed |= t.dtype.code == code && t.dtype.bits == bits && t.dtype.lanes == 1;
  if (t.ndim != 1 || !contiguous(t) || !typed)
    throw py::value_error(std::string(name) + " must be a contiguous 1-D tensor of the format's index type");
  return t;
}

struct CallArgs {
  sparsenet::cuda::DType dtype;
  const void* values;
  sparsenet::cuda::DenseDevice d;
};

// One call's tensors, read from their capsules: each on `device`, all of the values' dtype, the
// values contiguous with nnz entries and the bias (if any) with rows. Shapes of x and out are the
// caller's to check.
struct CallTensors {
  const dl::Tensor& v;
  const dl::Tensor& x;
  const dl::Tensor& y;
  const dl::Tensor* bias;
  sparsenet::cuda::DType dtype;
};

CallTensors call_tensors(const py::object& values, const py::object& x, const py::object& out, const py::object& bias,
                         int device, int64_t rows, int64_t nnz) {
  const dl::Tensor& v = tensor_of(values, "values");
  const dl::Tensor& xt = tensor_of(x, "x");
  const dl::Tensor& yt = tensor_of(out, "out");
  const dl::Tensor* bt = bias.is_none() ? nullptr : &tensor_of(bias, "bias");
  for (const dl::Tensor* t : {&v, &xt, &yt, bt}) {
    if (t && (t->device.device_type != dl::kCUDA || t->device.device_id != device))
      throw py::value_error("values, x, out and bias must be on cuda:" + std::to_string(device) +
                            ", where this weight's structure is");
  }
  const sparsenet::cuda::DType dtype = value_type(v, "values");
  for (const auto& [t, name] : {std::pair{&xt, "x"}, std::pair{&yt, "out"}, std::pair{bt, "bias"}}) {
    if (t && value_type(*t, name) != dtype) throw py::type_error(std::string(name) + " must have the values' dtype");
  }
  if (v.ndim != 1 || v.shape[0] != nnz || !contiguous(v))
    throw py::value_error("values must be contiguous with nnz = " + std::to_string(nnz) + " entries, got shape " +
                          shape_of(v));
  if (bt && (bt->ndim != 1 || bt->shape[0] != rows || !contiguous(*bt)))
    throw py::value_error("bias must be contiguous with " + std::to_string(rows) + " entries");
  return {v, xt, yt, bt, dtype};
}

// Whether out's bytes overlap x's (either may be empty).
bool overlaps(const char* x, size_t xbytes, const char* y, size_t ybytes) {
  return xbytes && ybytes && y < x + xbytes && x < y + ybytes;
}

// Checks one linear call's tensors against a weight of rows x cols with nnz stored values on
// `device` (call_tensors), x (batch, cols) with contiguous rows, out (batch, rows) contiguous and
// not overlapping x.
CallArgs check_call(const py::object& values, const py::object& x, const py::object& out, const py::object& bias,
                    int device, int64_t rows, int64_t cols, int64_t nnz) {
  const CallTensors t = call_tensors(values, x, out, bias, device, rows, nnz);
  const dl::Tensor &xt = t.x, &yt = t.y;
  const dl::Tensor* bt = t.bias;
  const sparsenet::cuda::DType dtype = t.dtype;
  if (xt.ndim != 2 || xt.shape[1] != cols)
    throw py::value_error("x must have shape (batch, " + std::to_string(cols) + "), got " + shape_of(xt));
  const int64_t batch = xt.shape[0];
  const int64_t x_col_stride = xt.strides ? xt.strides[1] : 1;
  const int64_t ldx = xt.strides ? xt.strides[0] : cols;
  if ((cols > 1 && x_col_stride != 1) || (batch > 1 && ldx < cols))
    throw py::value_error("x's rows must be contiguous and must not overlap");
  if (yt.ndim != 2 || yt.shape[0] != batch || yt.shape[1] != rows || !contiguous(yt))
    throw py::value_error("out must be a contiguous (" + std::to_string(batch) + ", " + std::to_string(rows) +
                          ") tensor, got " + shape_of(yt));
  const size_t item = dtype == sparsenet::cuda::DType::kFloat32 ? 4 : 2;
  const char* ylo = data_of(yt);
  const char* xlo = data_of(xt);
  const size_t ybytes = static_cast<size_t>(batch * rows) * item;
  const size_t xbytes = batch == 0 ? 0 : static_cast<size_t>((batch - 1) * ldx + cols) * item;
  if (overlaps(xlo, xbytes, ylo, ybytes)) throw py::value_error("out must not overlap x");
  CallArgs c{dtype, data_of(t.v), {}};
  c.d.x = xlo;
  c.d.batch = batch;
  c.d.ldx = ldx;
  c.d.y = const_cast<char*>(ylo);
  c.d.ldy = rows;
  c.d.bias = bt ? data_of(*bt) : nullptr;
  return c;
}

// What every handle shares once its constructor has validated and uploaded the structure: its
// device, the device-side view its kernel reads, and the checked call.
template <typename View, void (*Kernel)(const View&, sparsenet::cuda::DType, const void*,
                                        const sparsenet::cuda::DenseDevice&, cudaStream_t)>
class HandleBase {
 public:
  // out[:] = x A^T (+ bias) on `stream` (an integer cudaStream_t; 0 is the legacy default stream).
  void matmul(const py::object& values, const py::object& x, const py::object& out, const py::object& bias,
              uintptr_t stream) const {
    const CallArgs c = check_call(values, x, out, bias, device_, a_.rows, a_.cols, a_.nnz);
    DeviceScope scope(device_);
    Kernel(a_, c.dtype, c.values, c.d, reinterpret_cast<cudaStream_t>(stream));
  }

  int64_t rows() const { return a_.rows; }
  int64_t cols() const { return a_.cols; }
  int64_t nnz() const { return a_.nnz; }
  int device() const { return device_; }

 protected:
  int device_ = -1;
  View a_;
};

class CsrHandle : public HandleBase<sparsenet::cuda::CsrDevice, &sparsenet::cuda::csr_matmul> {
 public:
  CsrHandle(int64_t rows, int64_t cols, const py::object& row_ptr, const py::object& col_idx) {
    if (rows < 0 || cols < 0) throw py::value_error("rows and cols must be non-negative");
    const dl::Tensor& rp = structure_tensor(row_ptr, "row_ptr", {{dl::kInt, 64}}, &device_);
    const dl::Tensor& ci = structure_tensor(col_idx, "col_idx", {{dl::kInt, 16}, {dl::kUInt, 16}, {dl::kInt, 32}}, &device_);
    if (rp.shape[0] != rows + 1)
      throw py::value_error("row_ptr must have rows + 1 = " + std::to_string(rows + 1) + " entries, got " + shape_of(rp));
    DeviceScope scope(device_);
    const std::vector<uint8_t> row_host = to_host(rp), col_host = to_host(ci);
    sparsenet::CsrView view;
    view.rows = rows;
    view.cols = cols;
    view.nnz = ci.shape[0];
    view.row_ptr = reinterpret_cast<const int64_t*>(row_host.data());
    view.col_idx = col_host.data();
    view.index_bytes = ci.dtype.bits / 8;
    sparsenet::validate_csr(view);  // std::invalid_argument -> ValueError
    row_ptr_.emplace(device_, row_host.data(), row_host.size());
    col_idx_.emplace(device_, col_host.data(), col_host.size());
    a_.rows = rows;
    a_.cols = cols;
    a_.nnz = view.nnz;
    a_.row_ptr = static_cast<const int64_t*>(row_ptr_->get());
    a_.col_idx = col_idx_->get();
    a_.index_bytes = view.index_bytes;
  }

  // out[:] = conv2d(x, A as (out_channels, in_channels / groups, kh, kw)) (+ bias) on `stream`;
  // geometry = [kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups]; x (N, C, H, W) and
  // out contiguous, of the values' dtype, on this handle's device.
  void conv2d(const py::object& values, const py::object& x, const py::object& out, const py::object& bias,
              const std::vector<int64_t>& geometry, uintptr_t stream) const {
    const CallTensors t = call_tensors(values, x, out, bias, device_, a_.rows, a_.nnz);
    if (t.x.ndim != 4 || !contiguous(t.x)) throw py::value_error("x must be a contiguous (N, C, H, W) tensor");
    sparsenet::ConvShape s = sparsenet::conv_shape(t.x.shape[0], t.x.shape[1], t.x.shape[2], t.x.shape[3], a_.rows,
                                                   geometry);  // std::invalid_argument -> ValueError
    sparsenet::CsrView shape_only;  // validate_conv reads the weight's rows and columns only
    shape_only.rows = a_.rows;
    shape_only.cols = a_.cols;
    sparsenet::validate_conv(s, shape_only);
    if (t.y.ndim != 4 || !contiguous(t.y) || t.y.shape[0] != s.batch || t.y.shape[1] != s.out_channels ||
        t.y.shape[2] != s.out_h || t.y.shape[3] != s.out_w)
      throw py::value_error("out must be a contiguous (" + std::to_string(s.batch) + ", " + std::to_string(s.out_channels) +
                            ", " + std::to_string(s.out_h) + ", " + std::to_string(s.out_w) + ") tensor");
    const size_t item = t.dtype == sparsenet::cuda::DType::kFloat32 ? 4 : 2;
    const char* xlo = data_of(t.x);
    const char* ylo = data_of(t.y);
    if (overlaps(xlo, static_cast<size_t>(s.batch * s.in_channels * s.in_h * s.in_w) * item, ylo,
                 static_cast<size_t>(s.batch * s.out_channels * s.out_h * s.out_w) * item))
      throw py::value_error("out must not overlap x");
    DeviceScope scope(device_);
    sparsenet::cuda::csr_conv2d(a_, s, t.dtype, data_of(t.v), xlo, const_cast<char*>(ylo),
                                t.bias ? data_of(*t.bias) : nullptr, reinterpret_cast<cudaStream_t>(stream));
  }

 private:
  std::optional<DeviceCopy> row_ptr_, col_idx_;
};

class BitmapHandle : public HandleBase<sparsenet::cuda::BitmapDevice, &sparsenet::cuda::bitmap_matmul> {
 public:
  BitmapHandle(int64_t rows, int64_t cols, const py::object& masks, const py::object& row_ptr) {
    if (rows < 0 || cols < 0) throw py::value_error("rows and cols must be non-negative");
    const dl::Tensor& mt = structure_tensor(masks, "masks", {{dl::kInt, 16}, {dl::kUInt, 16}}, &device_);
    const dl::Tensor& rp = structure_tensor(row_ptr, "row_ptr", {{dl::kInt, 64}}, &device_);
    const int64_t chunks = sparsenet::bitmap_chunks(cols);
    if (rp.shape[0] != rows + 1 || mt.shape[0] != rows * chunks)
      throw py::value_error("masks must have rows * ceil(cols / 16) = " + std::to_string(rows * chunks) +
                            " words and row_ptr rows + 1 = " + std::to_string(rows + 1) + " entries");
    DeviceScope scope(device_);
    const std::vector<uint8_t> mask_host = to_host(mt), row_host = to_host(rp);
    sparsenet::BitmapView view;
    view.rows = rows;
    view.cols = cols;
    view.chunks = chunks;
    view.row_ptr = reinterpret_cast<const int64_t*>(row_host.data());
    view.nnz = view.row_ptr[rows];
    view.masks = reinterpret_cast<const uint16_t*>(mask_host.data());
    sparsenet::validate_bitmap(view);  // std::invalid_argument -> ValueError
    masks_.emplace(device_, mask_host.data(), mask_host.size());
    row_ptr_.emplace(device_, row_host.data(), row_host.size());
    a_.rows = rows;
    a_.cols = cols;
    a_.chunks = chunks;
    a_.nnz = view.nnz;
    a_.masks = static_cast<const uint16_t*>(masks_->get());
    a_.row_ptr = static_cast<const int64_t*>(row_ptr_->get());
  }

 private:
  std::optional<DeviceCopy> masks_, row_ptr_;
};

class BsrHandle : public HandleBase<sparsenet::cuda::BsrDevice, &sparsenet::cuda::bsr_matmul> {
 public:
  BsrHandle(int64_t rows, int64_t cols, const py::object& block_shape, const py::object& block_ptr,
            const py::object& block_cols) {
    if (rows < 0 || cols < 0) throw py::value_error("rows and cols must be non-negative");
    const dl::Tensor& st = structure_tensor(block_shape, "block_shape", {{dl::kInt, 64}}, &device_);
    const dl::Tensor& bp = structure_tensor(block_ptr, "block_ptr", {{dl::kInt, 64}}, &device_);
    const dl::Tensor& bc = structure_tensor(block_cols, "block_cols", {{dl::kInt, 32}}, &device_);
    if (st.shape[0] != 2) throw py::value_error("block_shape must hold 2 entries (r, c)");
    DeviceScope scope(device_);
    const std::vector<uint8_t> shape_host = to_host(st), ptr_host = to_host(bp), cols_host = to_host(bc);
    sparsenet::BsrView view;
    view.rows = rows;
    view.cols = cols;
    view.r = reinterpret_cast<const int64_t*>(shape_host.data())[0];
    view.c = reinterpret_cast<const int64_t*>(shape_host.data())[1];
    if (view.r < 1 || view.r > sparsenet::kBsrMaxBlock || view.c < 1 || view.c > sparsenet::kBsrMaxBlock)
      throw py::value_error("block sides must be 1.." + std::to_string(sparsenet::kBsrMaxBlock));
    view.block_rows = sparsenet::bsr_block_rows(rows, view.r);
    if (bp.shape[0] != view.block_rows + 1)
      throw py::value_error("block_ptr must have ceil(rows / r) + 1 = " + std::to_string(view.block_rows + 1) + " entries");
    view.nnzb = bc.shape[0];
    view.block_ptr = reinterpret_cast<const int64_t*>(ptr_host.data());
    view.block_cols = reinterpret_cast<const int32_t*>(cols_host.data());
    sparsenet::validate_bsr(view);  // std::invalid_argument -> ValueError
    block_ptr_.emplace(device_, ptr_host.data(), ptr_host.size());
    block_cols_.emplace(device_, cols_host.data(), cols_host.size());
    a_.rows = rows;
    a_.cols = cols;
    a_.r = view.r;
    a_.c = view.c;
    a_.block_rows = view.block_rows;
    a_.nnzb = view.nnzb;
    a_.nnz = view.nnzb * view.r * view.c;
    a_.block_ptr = static_cast<const int64_t*>(block_ptr_->get());
    a_.block_cols = static_cast<const int32_t*>(block_cols_->get());
  }

 private:
  std::optional<DeviceCopy> block_ptr_, block_cols_;
};

class NmHandle : public HandleBase<sparsenet::cuda::NmDevice, &sparsenet::cuda::nm_matmul> {
 public:
  NmHandle(int64_t rows, int64_t cols, const py::object& pattern, const py::object& indices) {
    if (rows < 0 || cols < 0) throw py::value_error("rows and cols must be non-negative");
    const dl::Tensor& pt = structure_tensor(pattern, "pattern", {{dl::kInt, 64}}, &device_);
    const dl::Tensor& it = structure_tensor(indices, "indices", {{dl::kUInt, 8}}, &device_);
    if (pt.shape[0] != 2) throw py::value_error("pattern must hold 2 entries (n, m)");
    DeviceScope scope(device_);
    const std::vector<uint8_t> pattern_host = to_host(pt), index_host = to_host(it);
    sparsenet::NmView view;
    view.rows = rows;
    view.cols = cols;
    view.n = reinterpret_cast<const int64_t*>(pattern_host.data())[0];
    view.m = reinterpret_cast<const int64_t*>(pattern_host.data())[1];
    if (view.m < 2 || view.m > sparsenet::kNmMaxM || view.n < 1 || view.n >= view.m)
      throw py::value_error("pattern must be N:M with 1 <= N < M <= " + std::to_string(sparsenet::kNmMaxM));
    view.bits = sparsenet::nm_index_bits(view.m);
    view.groups = sparsenet::nm_groups(cols, view.m);
    view.row_bytes = sparsenet::nm_row_bytes(cols, view.n, view.m);
    if (it.shape[0] != rows * view.row_bytes)
      throw py::value_error("indices must hold rows * row_bytes = " + std::to_string(rows * view.row_bytes) + " bytes");
    view.indices = index_host.data();
    sparsenet::validate_nm(view);  // std::invalid_argument -> ValueError
    indices_.emplace(device_, index_host.data(), index_host.size());
    a_.rows = rows;
    a_.cols = cols;
    a_.n = view.n;
    a_.m = view.m;
    a_.bits = view.bits;
    a_.groups = view.groups;
    a_.row_bytes = view.row_bytes;
    a_.nnz = rows * view.groups * view.n;
    a_.indices = static_cast<const uint8_t*>(indices_->get());
  }

 private:
  std::optional<DeviceCopy> indices_;
};

// The Python class of a handle: Handle(rows, cols, *structure) and the same methods for every format.
template <typename Handle, typename... Names>
py::class_<Handle> bind_handle(py::module_& m, const char* name, const char* doc, Names... structure) {
  return py::class_<Handle>(m, name)
      .def(py::init<int64_t, int64_t, std::conditional_t<true, const py::object&, Names>...>(), py::arg("rows"),
           py::arg("cols"), py::arg(structure)..., doc)
      .def("matmul", &Handle::matmul, py::arg("values"), py::arg("x"), py::arg("out"), py::arg("bias"),
           py::arg("stream"), "out[:] = x A^T (+ bias), enqueued on the given CUDA stream; DLPack capsules")
      .def_property_readonly("rows", &Handle::rows)
      .def_property_readonly("cols", &Handle::cols)
      .def_property_readonly("nnz", &Handle::nnz)
      .def_property_readonly("device", &Handle::device);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "sparsenet's CUDA kernels (optional at build time)";
  m.def("device_count", [] {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
  }, "CUDA devices this module can use (0 without a driver or a GPU)");
  const char* doc = "Copies, validates and uploads a packed weight's structure held on a CUDA device (DLPack capsules).";
  bind_handle<CsrHandle>(m, "CsrHandle", doc, "row_ptr", "col_idx")
      .def("conv2d", &CsrHandle::conv2d, py::arg("values"), py::arg("x"), py::arg("out"), py::arg("bias"),
           py::arg("geometry"), py::arg("stream"),
           "out[:] = conv2d(x, A as (out_channels, in_channels / groups, kh, kw)) (+ bias) on the given stream; "
           "geometry: kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups; NCHW DLPack capsules");
  bind_handle<BitmapHandle>(m, "BitmapHandle", doc, "masks", "row_ptr");
  bind_handle<BsrHandle>(m, "BsrHandle", doc, "block_shape", "block_ptr", "block_cols");
  bind_handle<NmHandle>(m, "NmHandle", doc, "pattern", "indices");
}
