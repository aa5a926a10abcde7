// The extension module fastft._cuda. It only sees raw device pointers (as integers),
// sizes and the caller's CUDA stream handle: no libtorch, so one build serves every
// torch version. Each op declares `void bind_<op>(pybind11::module_&)` in its own
// csrc/<op>/bindings.h; tensor checks happen in fastft/ops/<op>_cuda.py.
#include <pybind11/pybind11.h>

#include "attention/bindings.h"
#include "linear_cross_entropy/bindings.h"
#include "lora_linear/bindings.h"

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fastft CUDA kernels (raw-pointer interface; see fastft/ops/<op>_cuda.py)";
  fastft::bind_linear_cross_entropy(m);
  fastft::bind_attention(m);
  fastft::bind_lora_linear(m);
}
