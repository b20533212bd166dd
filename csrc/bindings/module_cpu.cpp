// sparsenet._C: the CPU kernels, bound with pybind11. Knows nothing of torch: it is handed buffers
// (anything exposing the Python buffer protocol, numpy arrays in practice) and checks every size,
// dtype and stride it relies on, raising ValueError/TypeError rather than crashing.
#include <omp.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <memory>
#include <string>

#include "cpu/csr_view.h"
#include "cpu/dispatch.h"
#include "cpu/tiled.h"

namespace py = pybind11;
using sparsenet::CsrView;

namespace {

std::atomic<int> g_num_threads{1};

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

// A validated, non-owning view of a packed CSR weight (see csrc/cpu/csr_view.h for the layout).
// It holds no reference to the buffers (so caching it never pins memory); instead every matmul is
// handed the three buffers again and checks, in O(1), that they are the very buffers it validated
// (same addresses, sizes and types), so a freed or swapped buffer is an error, never a wild read.
// Modifying the validated memory in place is the one thing it cannot see: the Python side checks
// torch's version counters for that (sparsenet/ops/handles.py).
// Built with keep=True it holds references to the three buffers instead (SparseLinear's prepared
// path, which owns the tensors anyway), and forward(x) needs nothing else handed over.
class CsrHandle {
 public:
  CsrHandle(int64_t rows, int64_t cols, const py::buffer& row_ptr, const py::buffer& col_idx,
            const py::buffer& values, bool keep) {
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
    view_.rows = rows;
    view_.cols = cols;
    view_.nnz = va.size;
    view_.row_ptr = static_cast<const int64_t*>(rp.ptr);
    view_.col_idx = ci.ptr;
    view_.values = static_cast<const float*>(va.ptr);
    sparsenet::validate_csr(view_);  // throws std::invalid_argument -> ValueError
    // Holding the exporters keeps the memory alive (numpy arrays pin what they view); they must
    // still not be modified in place, as for the non-owning handle.
    if (keep) owners_ = std::make_shared<const py::tuple>(py::make_tuple(row_ptr, col_idx, values));
  }

  // y = x A^T (+ bias): x is (batch, cols) float32 with unit inner stride, y (batch, rows) likewise.
  void matmul(const py::buffer& row_ptr, const py::buffer& col_idx, const py::buffer& values,
              const py::buffer& x, const py::buffer& y, const py::object& bias) const {
    check_same(row_ptr, view_.row_ptr, view_.rows + 1, 8, "crow_indices");
    check_same(col_idx, view_.col_idx, view_.nnz, view_.index_bytes, "col_indices");
    check_same(values, view_.values, view_.nnz, 4, "values");
    run(x.request(), y.request(/*writable=*/true), bias);
  }

  // Returns x A^T (+ bias) as a new (batch, rows) float32 array. Only for a handle that keeps its
  // buffers alive (built with keep=True), so nothing needs handing over again: the fewest Python
  // objects touched per call, which is what a batch-1 call after a cache-flushing layer pays for.
  py::array_t<float> forward(const py::buffer& x, const py::object& bias) const {
    if (!owners_) throw py::value_error("this handle does not keep its buffers (keep=False): use matmul");
    const py::buffer_info xi = x.request();
    if (xi.ndim != 2) throw py::value_error("x must be 2-D");
    py::array_t<float> y({static_cast<py::ssize_t>(xi.shape[0]), static_cast<py::ssize_t>(view_.rows)});
    run(xi, y.request(/*writable=*/true), bias);
    return y;
  }

  int64_t rows() const { return view_.rows; }
  int64_t cols() const { return view_.cols; }
  int64_t nnz() const { return view_.nnz; }
  int index_bytes() const { return view_.index_bytes; }
  bool keeps_buffers() const { return static_cast<bool>(owners_); }

 private:
  void run(const py::buffer_info& xi, const py::buffer_info& yi, const py::object& bias) const {
    if (!format_is(xi, 'f', 4) || !format_is(yi, 'f', 4)) throw py::type_error("x and out must be float32");
    if (xi.ndim != 2 || yi.ndim != 2) throw py::value_error("x and out must be 2-D");
    const int64_t batch = xi.shape[0];
    if (xi.shape[1] != view_.cols)
      throw py::value_error("x has " + std::to_string(xi.shape[1]) + " features, the weight expects " +
                            std::to_string(view_.cols));
    if (yi.shape[0] != batch || yi.shape[1] != view_.rows)
      throw py::value_error("out must have shape (" + std::to_string(batch) + ", " + std::to_string(view_.rows) + ")");
    if ((xi.shape[1] > 1 && xi.strides[1] != 4) || (yi.shape[1] > 1 && yi.strides[1] != 4))
      throw py::value_error("x and out need unit stride along features");
    if ((batch > 1 && (xi.strides[0] % 4 != 0 || xi.strides[0] < 4 * xi.shape[1] || yi.strides[0] != 4 * yi.shape[1])) ||
        xi.strides[0] < 0)
      throw py::value_error("x rows must not overlap and out must be contiguous");
    const char* ylo = static_cast<const char*>(yi.ptr);
    const char* yhi = ylo + 4 * batch * view_.rows;
    const char* xlo = static_cast<const char*>(xi.ptr);
    const char* xhi = xlo + (batch > 0 ? xi.strides[0] * (batch - 1) + 4 * view_.cols : 0);
    if (batch > 0 && view_.rows > 0 && ylo < xhi && xlo < yhi) throw py::value_error("out must not overlap x");

    sparsenet::DenseArgs d;
    d.x = static_cast<const float*>(xi.ptr);
    d.batch = batch;
    d.ldx = batch > 1 ? xi.strides[0] / 4 : view_.cols;
    d.y = static_cast<float*>(yi.ptr);
    d.ldy = view_.rows;
    d.num_threads = g_num_threads.load(std::memory_order_relaxed);
    if (!bias.is_none()) {
      const auto bi = vector_info(bias.cast<py::buffer>(), "bias");
      if (!format_is(bi, 'f', 4)) throw py::type_error("bias must be float32");
      if (bi.size != view_.rows)
        throw py::value_error("bias has " + std::to_string(bi.size) + " entries, expected " + std::to_string(view_.rows));
      d.bias = static_cast<const float*>(bi.ptr);
    }
    if (batch == 0 || view_.rows == 0) return;
    const auto kernel = sparsenet::cpu::csr_matmul_kernel();
    sparsenet::CsrView view = view_;
    view.tiled = tiled_for(batch);
    py::gil_scoped_release nogil;
    kernel(view, d);
  }

  static void check_same(const py::buffer& b, const void* ptr, int64_t size, int64_t itemsize, const char* name) {
    const py::buffer_info info = b.request();
    if ((size > 0 && info.ptr != ptr) || info.size != size || info.itemsize != itemsize || info.ndim != 1)
      throw py::value_error(std::string(name) + " is not the buffer this handle validated");
  }

  // The column-tiled copy (cpu/tiled.h), built on first use under the GIL (so two threads never
  // build it at once), and only where a panel kernel gains from it, as measured on 4096x4096 (see
  // BENCHMARKS.md): the 16-wide AVX-512 panels (batch >= 16) from 7.5% density, the 8-wide AVX2
  // panels (batch 4-15 on AVX-512 CPUs, batch >= 4 on AVX2 ones) from 20%; sparser weights gained
  // nothing there and would only pay the memory.
  const sparsenet::cpu::TiledCsr* tiled_for(int64_t batch) const {
    if (batch < 4) return nullptr;  // the common batch-1 call pays nothing for this
    const double density = view_.rows * view_.cols > 0
                               ? static_cast<double>(view_.nnz) / (static_cast<double>(view_.rows) * view_.cols)
                               : 0.0;
    const std::string isa = sparsenet::cpu::active_isa();
    const bool wide = isa == "avx512" && batch >= 16 && density >= 0.075;
    const bool narrow = (isa == "avx512" || isa == "avx2") && batch >= 4 && density >= 0.2;
    if (!wide && !narrow) return nullptr;
    if (!tiled_) tiled_ = std::make_shared<const sparsenet::cpu::TiledCsr>(sparsenet::cpu::build_tiled(view_));
    return tiled_.get();
  }

  CsrView view_;
  std::shared_ptr<const py::tuple> owners_;  // keep=True: the three buffers, kept alive
  mutable std::shared_ptr<const sparsenet::cpu::TiledCsr> tiled_;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparsenet CPU kernels (torch-free; see sparsenet/ops for the torch integration)";

  py::class_<CsrHandle>(m, "CsrHandle")
      .def(py::init<int64_t, int64_t, const py::buffer&, const py::buffer&, const py::buffer&, bool>(),
           py::arg("rows"), py::arg("cols"), py::arg("crow_indices"), py::arg("col_indices"), py::arg("values"),
           py::arg("keep") = false,
           "Validate a packed CSR weight once; matmul is then handed the same buffers on every call. "
           "keep=True holds references to the buffers instead, and enables forward().")
      .def("matmul", &CsrHandle::matmul, py::arg("crow_indices"), py::arg("col_indices"), py::arg("values"),
           py::arg("x"), py::arg("out"), py::arg("bias") = py::none(),
           "out[:] = x @ A.T (+ bias); the first three must be the buffers the handle was built from")
      .def("forward", &CsrHandle::forward, py::arg("x"), py::arg("bias") = py::none(),
           "x @ A.T (+ bias) as a new array (keep=True handles only)")
      .def_property_readonly("keeps_buffers", &CsrHandle::keeps_buffers)
      .def_property_readonly("rows", &CsrHandle::rows)
      .def_property_readonly("cols", &CsrHandle::cols)
      .def_property_readonly("nnz", &CsrHandle::nnz)
      .def_property_readonly("index_bytes", &CsrHandle::index_bytes);

  m.def("compiled_isas", &sparsenet::cpu::compiled_isas);
  m.def("supported_isas", &sparsenet::cpu::supported_isas);
  m.def("active_isa", &sparsenet::cpu::active_isa);
  m.def("set_isa", &sparsenet::cpu::set_isa, py::arg("name"));
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw py::value_error("num_threads must be >= 1");
    g_num_threads.store(n);
  }, py::arg("n"));
  m.def("get_num_threads", []() { return g_num_threads.load(); });
  m.def("max_threads", []() { return omp_get_max_threads(); });
  m.attr("compiler") = SPARSENET_COMPILER;
  m.attr("openmp_version") = _OPENMP;
}
