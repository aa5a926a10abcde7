// Host-side launchers of the linear cross-entropy kernels. Plain C++ (no pybind11, no
// CUDA headers needed by callers): pointers arrive as integers from Python, where
// fastft/ops/linear_cross_entropy_cuda.py has already checked device, dtype, contiguity and shapes.
#pragma once

#include <cstdint>

namespace fastft {

// The memory-bound middle of the chunked linear cross-entropy, for `rows` rows of fp32
// logits laid out contiguously as (rows, vocab):
//
//   z       = logits[r, :] + bias                      (bias optional, any of fp32/fp16/bf16)
//   lse[r]  = log(sum_j exp(z_j))
//   loss[r] = lse - (1 - eps) * z[label] - eps * mean_j z_j     (eps = label_smoothing)
//
// and, when row_scale is given (fp32, one per row) and a gradient output is asked for,
//
//   g = row_scale[r] * (softmax(z) - (1 - eps) * onehot(label) - eps / vocab)
//
// written over the logits in place (write_in_place) and/or as a 16-bit copy
// (grad_logits_16, (rows, vocab) fp16/bf16) for the following tensor-core GEMMs.
// labels are int64 in [0, vocab); a row with any other label gets a NaN loss and no
// one-hot term (never an out-of-bounds read). lse may be 0 (not written).
// Runs on `stream`; throws std::invalid_argument for bad arguments and
// std::runtime_error when the launch fails.
void linear_cross_entropy_softmax_grad(
    std::uintptr_t logits, std::int64_t rows, std::int64_t vocab,
    std::uintptr_t bias, int bias_dtype,
    std::uintptr_t labels,
    float label_smoothing,
    std::uintptr_t row_scale,
    bool write_in_place,
    std::uintptr_t grad_logits_16, int grad_logits_16_dtype,
    std::uintptr_t loss, std::uintptr_t lse,
    std::uintptr_t stream);

}  // namespace fastft
