// nanorun._core: Python bindings of the CPU-side C++ core. Bindings only; logic lives in
// page_allocator.cpp. Every call holds the GIL, which is what makes the (unsynchronized)
// allocator safe to use from Python threads.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "nanorun/page_allocator.h"

namespace py = pybind11;
using nanorun::PageAllocator;

PYBIND11_MODULE(_core, m) {
  m.doc() = "nanorun C++ core: KV-cache page allocator";

  // OutOfPages -> nanorun._core.OutOfPagesError(RuntimeError). std::invalid_argument maps to
  // ValueError through pybind11's default translator.
  py::register_exception<nanorun::OutOfPages>(m, "OutOfPagesError", PyExc_RuntimeError);

  py::class_<PageAllocator>(m, "PageAllocator",
                            "Reference-counted allocator of KV-cache page ids 0..num_pages-1.")
      .def(py::init<int32_t>(), py::arg("num_pages"))
      .def("allocate", &PageAllocator::allocate, py::arg("n"),
           "n distinct free pages (list[int]), each with refcount 1. All-or-nothing: raises "
           "OutOfPagesError, changing nothing, if fewer than n are free.")
      .def("free", &PageAllocator::free, py::arg("pages"),
           "Drop one reference per listed page; pages reaching 0 become free. Raises ValueError, "
           "changing nothing, on an out-of-range id or a page freed more often than referenced.")
      .def("incref", &PageAllocator::incref, py::arg("pages"),
           "Add one reference per listed page (prefix sharing, fork). Pages must be allocated; "
           "otherwise raises ValueError, changing nothing.")
      .def("refcount", &PageAllocator::refcount, py::arg("page"),
           "Reference count of a page (0 = free).")
      .def("reset", &PageAllocator::reset, "Free every page and restore the initial order.")
      .def_property_readonly("num_free", &PageAllocator::num_free)
      .def_property_readonly("num_pages", &PageAllocator::num_pages)
      .def("__repr__", [](const PageAllocator& a) {
        return "PageAllocator(num_pages=" + std::to_string(a.num_pages()) +
               ", num_free=" + std::to_string(a.num_free()) + ")";
      });
}
