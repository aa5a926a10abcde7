// pybind11 face of the fused LoRA linear kernel, included once by csrc/bindings.cpp.
// Header-only glue (keeps pybind11 out of nvcc's device compilation); tensor checks live
// in fastft/ops/lora_linear_cuda.py, the launcher re-checks what would be unsafe.
#pragma once

#include <pybind11/pybind11.h>

#include "lora_linear/lora_linear.h"

namespace fastft {

inline void bind_lora_linear(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("lora_fused_linear", &lora_fused_linear,
        // The launch is asynchronous and touches no Python object: let other threads run.
        py::call_guard<py::gil_scoped_release>(),
        py::arg("x"), py::arg("w"), py::arg("w_scale"), py::arg("bias"),
        py::arg("lora_l"), py::arg("lora_r"), py::arg("out"),
        py::arg("rows"), py::arg("cols"), py::arg("reduce"), py::arg("rank"), py::arg("k_per_split"),
        py::arg("stride_xm"), py::arg("stride_xk"), py::arg("stride_wk"), py::arg("stride_wn"),
        py::arg("stride_lm"), py::arg("stride_lr"), py::arg("stride_rr"), py::arg("stride_rn"),
        py::arg("stride_om"), py::arg("stride_on"), py::arg("stride_os"),
        py::arg("scale"), py::arg("seed_key"), py::arg("threshold"),
        py::arg("dtype"), py::arg("weight_int8"), py::arg("scale_along_n"),
        py::arg("mask_x"), py::arg("mask_w"), py::arg("mask_lora"), py::arg("accumulate"),
        py::arg("out_fp32"), py::arg("stream"),
        "out[z] = [out +] X @ W' [+ bias] + scale * mask∘(L @ R') over K slice z, with W' "
        "16-bit or int8 dequantised on load (see csrc/lora_linear/lora_linear.h). Pointers "
        "are device addresses as integers (0 = absent). Raises ValueError for bad arguments, "
        "RuntimeError when the launch fails.");
}

}  // namespace fastft
