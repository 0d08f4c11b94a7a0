// nanorun._cuda: Python bindings of the CUDA kernels. Export list only: validation and error
// translation live in ops.cpp / checks.cpp, the kernels in kernels/*.cu.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "checks.h"
#include "ops.h"

namespace py = pybind11;
using nanorun::TensorView;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "nanorun CUDA kernels (call through nanorun.cuda_ops)";

  py::class_<TensorView>(m, "TensorArg",
                         "A non-owning tensor description: pointer, dtype, shape, strides "
                         "(elements), device (-1 = host). The tensor must outlive the call.")
      .def(py::init(&nanorun::checks::make_tensor_view), py::arg("data_ptr"), py::arg("dtype"),
           py::arg("shape"), py::arg("strides"), py::arg("device"))
      .def_property_readonly("data_ptr", [](const TensorView& t) {
        return reinterpret_cast<uintptr_t>(t.data);
      })
      .def_property_readonly("dtype", [](const TensorView& t) {
        return nanorun::dtype_name(t.dtype);
      })
      .def_property_readonly("shape", [](const TensorView& t) {
        return std::vector<int64_t>(t.shape, t.shape + t.ndim);
      })
      .def_property_readonly("strides", [](const TensorView& t) {
        return std::vector<int64_t>(t.strides, t.strides + t.ndim);
      })
      .def_readonly("device", &TensorView::device)
      .def("__repr__", &nanorun::checks::describe);

  namespace ops = nanorun::ops;
  m.def("kv_append", &ops::kv_append, py::arg("key"), py::arg("value"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("slot_mapping"), py::arg("stream"));
  m.def("rms_norm", &ops::rms_norm, py::arg("out"), py::arg("x"), py::arg("weight"),
        py::arg("eps"), py::arg("stream"));
  m.def("fused_add_rms_norm", &ops::fused_add_rms_norm, py::arg("x"), py::arg("residual"),
        py::arg("weight"), py::arg("eps"), py::arg("stream"));
  m.def("silu_and_mul", &ops::silu_and_mul, py::arg("out"), py::arg("x"), py::arg("stream"));
}
