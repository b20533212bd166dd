// sparsenet._C_cuda: the CUDA kernels (csrc/cuda) behind Python handles. Tensors cross as DLPack
// capsules (bindings/dlpack_abi.h), whose device, dtype, shape and strides are checked here before
// any launch; streams cross as the integer handle torch.cuda.Stream.cuda_stream gives.
//
// A handle copies the packed structure to the host once, validates it there (cpu/csr_view.h) and
// uploads its own device copy, which its kernels read from then on: no later write to the caller's
// tensors can make a kernel read out of bounds, as for the CPU handles.
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings/dlpack_abi.h"
#include "cpu/csr_view.h"
#include "cuda/csr_cuda.h"

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

class CsrHandle {
 public:
  CsrHandle(int64_t rows, int64_t cols, const py::object& row_ptr, const py::object& col_idx) {
    const dl::Tensor& rp = tensor_of(row_ptr, "row_ptr");
    const dl::Tensor& ci = tensor_of(col_idx, "col_idx");
    if (rp.device.device_type != dl::kCUDA || ci.device.device_type != dl::kCUDA || rp.device.device_id != ci.device.device_id)
      throw py::value_error("row_ptr and col_idx must be on one CUDA device");
    if (rows < 0 || cols < 0) throw py::value_error("rows and cols must be non-negative");
    if (rp.ndim != 1 || rp.shape[0] != rows + 1 || rp.dtype.code != dl::kInt || rp.dtype.bits != 64 || !contiguous(rp))
      throw py::value_error("row_ptr must be a contiguous int64 tensor of rows + 1 = " + std::to_string(rows + 1) +
                            " entries, got shape " + shape_of(rp));
    if (ci.ndim != 1 || !contiguous(ci) || !((ci.dtype.bits == 16 && (ci.dtype.code == dl::kInt || ci.dtype.code == dl::kUInt)) ||
                                             (ci.dtype.bits == 32 && ci.dtype.code == dl::kInt)))
      throw py::value_error("col_idx must be a contiguous 1-D 16-bit or int32 tensor");
    device_ = rp.device.device_id;
    DeviceScope scope(device_);
    // The host copy, validated (the copies synchronise; a handle is built once per weight).
    row_ptr_.resize(static_cast<size_t>(rows + 1));
    check(cudaMemcpy(row_ptr_.data(), data_of(rp), row_ptr_.size() * 8, cudaMemcpyDeviceToHost), "copying row_ptr");
    const int64_t nnz = ci.shape[0];
    const int index_bytes = ci.dtype.bits / 8;
    std::vector<uint8_t> cols_host(static_cast<size_t>(nnz * index_bytes));
    check(cudaMemcpy(cols_host.data(), data_of(ci), cols_host.size(), cudaMemcpyDeviceToHost), "copying col_idx");
    sparsenet::CsrView view;
    view.rows = rows;
    view.cols = cols;
    view.nnz = nnz;
    view.row_ptr = row_ptr_.data();
    view.col_idx = cols_host.data();
    view.index_bytes = index_bytes;
    sparsenet::validate_csr(view);  // std::invalid_argument -> ValueError
    // The device copy the kernels read.
    check(cudaMalloc(&device_row_ptr_, row_ptr_.size() * 8), "cudaMalloc");
    check(cudaMalloc(&device_col_idx_, cols_host.empty() ? 1 : cols_host.size()), "cudaMalloc");
    check(cudaMemcpy(device_row_ptr_, row_ptr_.data(), row_ptr_.size() * 8, cudaMemcpyHostToDevice), "uploading row_ptr");
    check(cudaMemcpy(device_col_idx_, cols_host.data(), cols_host.size(), cudaMemcpyHostToDevice), "uploading col_idx");
    a_.rows = rows;
    a_.cols = cols;
    a_.nnz = nnz;
    a_.row_ptr = static_cast<const int64_t*>(device_row_ptr_);
    a_.col_idx = device_col_idx_;
    a_.index_bytes = index_bytes;
  }

  ~CsrHandle() {
    int previous = 0;
    if (cudaGetDevice(&previous) == cudaSuccess) {
      cudaSetDevice(device_);
      cudaFree(device_row_ptr_);
      cudaFree(device_col_idx_);
      cudaSetDevice(previous);
    }
  }
  CsrHandle(const CsrHandle&) = delete;
  CsrHandle& operator=(const CsrHandle&) = delete;

  // out[:] = x A^T (+ bias) on `stream` (an integer cudaStream_t; 0 is the legacy default stream).
  // values, x, out and bias share one dtype (float32, float16 or bfloat16) and this handle's device.
  void matmul(const py::object& values, const py::object& x, const py::object& out, const py::object& bias,
              uintptr_t stream) const {
    const dl::Tensor& v = tensor_of(values, "values");
    const dl::Tensor& xt = tensor_of(x, "x");
    const dl::Tensor& yt = tensor_of(out, "out");
    const dl::Tensor* bt = bias.is_none() ? nullptr : &tensor_of(bias, "bias");
    for (const dl::Tensor* t : {&v, &xt, &yt, bt}) {
      if (t && (t->device.device_type != dl::kCUDA || t->device.device_id != device_))
        throw py::value_error("values, x, out and bias must be on cuda:" + std::to_string(device_) +
                              ", where this weight's structure is");
    }
    const sparsenet::cuda::DType dtype = value_type(v, "values");
    for (const auto& [t, name] : {std::pair{&xt, "x"}, std::pair{&yt, "out"}, std::pair{bt, "bias"}}) {
      if (t && value_type(*t, name) != dtype) throw py::type_error(std::string(name) + " must have the values' dtype");
    }
    if (v.ndim != 1 || v.shape[0] != a_.nnz || !contiguous(v))
      throw py::value_error("values must be contiguous with nnz = " + std::to_string(a_.nnz) + " entries, got shape " +
                            shape_of(v));
    if (xt.ndim != 2 || xt.shape[1] != a_.cols)
      throw py::value_error("x must have shape (batch, " + std::to_string(a_.cols) + "), got " + shape_of(xt));
    const int64_t batch = xt.shape[0];
    const int64_t x_col_stride = xt.strides ? xt.strides[1] : 1;
    const int64_t ldx = xt.strides ? xt.strides[0] : a_.cols;
    if ((a_.cols > 1 && x_col_stride != 1) || (batch > 1 && ldx < a_.cols))
      throw py::value_error("x's rows must be contiguous and must not overlap");
    if (yt.ndim != 2 || yt.shape[0] != batch || yt.shape[1] != a_.rows || !contiguous(yt))
      throw py::value_error("out must be a contiguous (" + std::to_string(batch) + ", " + std::to_string(a_.rows) +
                            ") tensor, got " + shape_of(yt));
    if (bt && (bt->ndim != 1 || bt->shape[0] != a_.rows || !contiguous(*bt)))
      throw py::value_error("bias must be contiguous with " + std::to_string(a_.rows) + " entries");
    const size_t item = dtype == sparsenet::cuda::DType::kFloat32 ? 4 : 2;
    const char* ylo = data_of(yt);
    const char* xlo = data_of(xt);
    const size_t ybytes = static_cast<size_t>(batch * a_.rows) * item;
    const size_t xbytes = batch == 0 ? 0 : static_cast<size_t>((batch - 1) * ldx + a_.cols) * item;
    if (xbytes && ybytes && ylo < xlo + xbytes && xlo < ylo + ybytes) throw py::value_error("out must not overlap x");
    sparsenet::cuda::DenseDevice d;
    d.x = xlo;
    d.batch = batch;
    d.ldx = ldx;
    d.y = const_cast<char*>(ylo);
    d.ldy = a_.rows;
    d.bias = bt ? data_of(*bt) : nullptr;
    DeviceScope scope(device_);
    sparsenet::cuda::csr_matmul(a_, dtype, data_of(v), d, reinterpret_cast<cudaStream_t>(stream));
  }

  int64_t rows() const { return a_.rows; }
  int64_t cols() const { return a_.cols; }
  int64_t nnz() const { return a_.nnz; }
  int device() const { return device_; }

 private:
  int device_ = 0;
  std::vector<int64_t> row_ptr_;
  void* device_row_ptr_ = nullptr;
  void* device_col_idx_ = nullptr;
  sparsenet::cuda::CsrDevice a_;
};

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "sparsenet's CUDA kernels (optional at build time)";
  m.def("device_count", [] {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
  }, "CUDA devices this module can use (0 without a driver or a GPU)");
  py::class_<CsrHandle>(m, "CsrHandle")
      .def(py::init<int64_t, int64_t, const py::object&, const py::object&>(), py::arg("rows"), py::arg("cols"),
           py::arg("row_ptr"), py::arg("col_idx"),
           "Copies, validates and uploads a packed CSR structure held on a CUDA device (DLPack capsules).")
      .def("matmul", &CsrHandle::matmul, py::arg("values"), py::arg("x"), py::arg("out"), py::arg("bias"),
           py::arg("stream"), "out[:] = x A^T (+ bias), enqueued on the given CUDA stream; DLPack capsules")
      .def_property_readonly("rows", &CsrHandle::rows)
      .def_property_readonly("cols", &CsrHandle::cols)
      .def_property_readonly("nnz", &CsrHandle::nnz)
      .def_property_readonly("device", &CsrHandle::device);
}
