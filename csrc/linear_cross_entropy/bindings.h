// pybind11 face of the linear cross-entropy kernels, included once by csrc/bindings.cpp.
// Header-only on purpose: the glue is a few lines, and keeping pybind11 out of the .cu
// files keeps nvcc's device compilation fast. Tensor checks live in fastft/ops/linear_cross_entropy_cuda.py;
// the launcher re-checks what would be unsafe (null pointers, bad dtype codes).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "linear_cross_entropy/linear_cross_entropy.h"

namespace fastft {

inline void bind_linear_cross_entropy(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("linear_cross_entropy_softmax_grad", &linear_cross_entropy_softmax_grad,
        // The launch is asynchronous and touches no Python object: let other threads run.
        py::call_guard<py::gil_scoped_release>(),
        py::arg("logits"), py::arg("rows"), py::arg("vocab"),
        py::arg("bias"), py::arg("bias_dtype"),
        py::arg("labels"),
        py::arg("label_smoothing"),
        py::arg("row_scale"),
        py::arg("write_in_place"),
        py::arg("grad_logits_16"), py::arg("grad_logits_16_dtype"),
        py::arg("loss"), py::arg("lse"),
        py::arg("stream"),
        "Per-row log-sum-exp, (smoothed) cross-entropy loss and, when row_scale is given, "
        "row_scale * (softmax - (1 - eps) * onehot - eps / V) over a contiguous (rows, vocab) "
        "fp32 logits chunk. Pointers are device addresses as integers (0 = absent), dtype "
        "codes as in csrc/common.h, stream a cudaStream_t as an integer. Raises ValueError "
        "for bad arguments, RuntimeError when the launch fails.");
}

}  // namespace fastft
