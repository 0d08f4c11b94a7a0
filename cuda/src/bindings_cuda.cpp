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
        py::arg("v_cache"), py::arg("slot_mapping"), py::arg("cta_budget"), py::arg("stream"));
  m.def("rms_norm", &ops::rms_norm, py::arg("out"), py::arg("x"), py::arg("weight"),
        py::arg("eps"), py::arg("stream"));
  m.def("fused_add_rms_norm", &ops::fused_add_rms_norm, py::arg("x"), py::arg("residual"),
        py::arg("weight"), py::arg("eps"), py::arg("stream"));
  m.def("silu_and_mul", &ops::silu_and_mul, py::arg("out"), py::arg("x"), py::arg("stream"));
  m.def("rotary_embedding", &ops::rotary_embedding, py::arg("qk"), py::arg("positions"),
        py::arg("cos"), py::arg("sin"), py::arg("stream"));
  m.def("rotary_embedding_inv_freq", &ops::rotary_embedding_inv_freq, py::arg("qk"),
        py::arg("positions"), py::arg("inv_freq"), py::arg("stream"));

  using nanorun::kernels::AttentionPlan;
  py::class_<AttentionPlan>(m, "AttentionPlan",
                            "How paged_attention divides its work (see nanorun/kernels.h)")
      .def_readonly("tile_tokens", &AttentionPlan::tile_tokens)
      .def_readonly("row_blocks", &AttentionPlan::row_blocks)
      .def_readonly("splits", &AttentionPlan::splits)
      .def_readonly("items", &AttentionPlan::items)
      .def_readonly("grid", &AttentionPlan::grid)
      .def_readonly("combine_grid", &AttentionPlan::combine_grid)
      .def_readonly("workspace_floats", &AttentionPlan::workspace_floats);
  m.def("plan_paged_attention", &nanorun::kernels::plan_paged_attention, py::arg("num_tokens"),
        py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
        py::arg("max_context"), py::arg("max_ctas"), py::arg("workspace_floats"));
  m.def("paged_attention", &ops::paged_attention, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_tables"), py::arg("seq_ids"), py::arg("positions"),
        py::arg("out"), py::arg("workspace"), py::arg("scale"), py::arg("sliding_window"),
        py::arg("cta_budget"), py::arg("stream"));
  m.def("paged_attention_capacity", &ops::paged_attention_capacity, py::arg("q"));
  m.def("paged_attention_plan", &ops::paged_attention_plan, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_tables"), py::arg("seq_ids"), py::arg("positions"),
        py::arg("out"), py::arg("workspace"), py::arg("scale"), py::arg("sliding_window"),
        py::arg("cta_budget"));
}
