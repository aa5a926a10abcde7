// Host launcher of linear_cross_entropy_softmax_grad (kernel: softmax_grad_kernel.cuh,
// kept apart so the device code can also be compiled on its own).
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "common.h"
#include "linear_cross_entropy/linear_cross_entropy.h"
#include "linear_cross_entropy/softmax_grad_kernel.cuh"

namespace fastft {
namespace {

using softmax_grad_detail::linear_cross_entropy_softmax_grad_kernel;
using softmax_grad_detail::threads_for;

template <typename BiasT, typename Grad16T>
void launch(std::uintptr_t logits, std::int64_t rows, std::int64_t vocab, std::uintptr_t bias,
            std::uintptr_t labels, float label_smoothing, std::uintptr_t row_scale, bool write_in_place,
            std::uintptr_t grad_logits_16, std::uintptr_t loss, std::uintptr_t lse, std::uintptr_t stream) {
  linear_cross_entropy_softmax_grad_kernel<BiasT, Grad16T>
      <<<static_cast<unsigned>(rows), threads_for(vocab), 0, reinterpret_cast<cudaStream_t>(stream)>>>(
          reinterpret_cast<float*>(logits), vocab, reinterpret_cast<const BiasT*>(bias),
          reinterpret_cast<const int64_t*>(labels), label_smoothing,
          reinterpret_cast<const float*>(row_scale), write_in_place,
          reinterpret_cast<Grad16T*>(grad_logits_16), reinterpret_cast<float*>(loss),
          reinterpret_cast<float*>(lse));
  check_launch("linear_cross_entropy_softmax_grad");
}

template <typename BiasT>
void launch_for_bias(int grad_logits_16_dtype, std::uintptr_t logits, std::int64_t rows,
                     std::int64_t vocab, std::uintptr_t bias, std::uintptr_t labels,
                     float label_smoothing, std::uintptr_t row_scale, bool write_in_place,
                     std::uintptr_t grad_logits_16, std::uintptr_t loss, std::uintptr_t lse,
                     std::uintptr_t stream) {
  // Without a 16-bit copy the Grad16T instantiation is irrelevant: __half's is used.
  if (grad_logits_16 != 0 && grad_logits_16_dtype == kBFloat16) {
    launch<BiasT, __nv_bfloat16>(logits, rows, vocab, bias, labels, label_smoothing, row_scale,
                                 write_in_place, grad_logits_16, loss, lse, stream);
  } else {
    launch<BiasT, __half>(logits, rows, vocab, bias, labels, label_smoothing, row_scale,
                          write_in_place, grad_logits_16, loss, lse, stream);
  }
}

}  // namespace

void linear_cross_entropy_softmax_grad(
    std::uintptr_t logits, std::int64_t rows, std::int64_t vocab,
    std::uintptr_t bias, int bias_dtype,
    std::uintptr_t labels,
    float label_smoothing,
    std::uintptr_t row_scale,
    bool write_in_place,
    std::uintptr_t grad_logits_16, int grad_logits_16_dtype,
    std::uintptr_t loss, std::uintptr_t lse,
    std::uintptr_t stream) {
  if (rows < 0) throw std::invalid_argument("linear_cross_entropy_softmax_grad: rows must be >= 0");
  if (vocab < 1) throw std::invalid_argument("linear_cross_entropy_softmax_grad: vocab must be >= 1");
  if (rows > std::numeric_limits<int>::max()) {  // one block per row; gridDim.x < 2^31
    throw std::invalid_argument("linear_cross_entropy_softmax_grad: at most 2^31 - 1 rows per launch, got " +
                                std::to_string(rows));
  }
  if (logits == 0 || labels == 0 || loss == 0) {
    throw std::invalid_argument("linear_cross_entropy_softmax_grad: logits, labels and loss are required");
  }
  if ((write_in_place || grad_logits_16 != 0) && row_scale == 0) {
    throw std::invalid_argument("linear_cross_entropy_softmax_grad: a gradient output needs row_scale");
  }
  if (bias != 0 && bias_dtype != kFloat32 && bias_dtype != kFloat16 && bias_dtype != kBFloat16) {
    throw std::invalid_argument("linear_cross_entropy_softmax_grad: bad bias dtype code " + std::to_string(bias_dtype));
  }
  if (grad_logits_16 != 0 && grad_logits_16_dtype != kFloat16 && grad_logits_16_dtype != kBFloat16) {
    throw std::invalid_argument("linear_cross_entropy_softmax_grad: grad_logits_16 must be fp16 or bf16, got dtype code " +
                                std::to_string(grad_logits_16_dtype));
  }
  if (rows == 0) return;  // an empty grid is a launch error
  const int effective_bias_dtype = bias == 0 ? kFloat32 : bias_dtype;
  switch (effective_bias_dtype) {
    case kFloat16:
      launch_for_bias<__half>(grad_logits_16_dtype, logits, rows, vocab, bias, labels, label_smoothing,
                              row_scale, write_in_place, grad_logits_16, loss, lse, stream);
      break;
    case kBFloat16:
      launch_for_bias<__nv_bfloat16>(grad_logits_16_dtype, logits, rows, vocab, bias, labels, label_smoothing,
                                     row_scale, write_in_place, grad_logits_16, loss, lse, stream);
      break;
    default:
      launch_for_bias<float>(grad_logits_16_dtype, logits, rows, vocab, bias, labels, label_smoothing,
                             row_scale, write_in_place, grad_logits_16, loss, lse, stream);
  }
}

}  // namespace fastft
