// Launcher of the fused LoRA linear kernel (csrc/lora_linear/lora_linear.cu); bound to
// Python in bindings.h and wrapped with all tensor checks in fastft/ops/lora_linear_cuda.py.
#pragma once

#include <cstdint>

namespace fastft {

// out[z] (M, N) = [out +] X (M, K_z) @ W' (K_z, N) [+ bias] + scale * mask∘(L (M, rank) @ R' (rank, N))
// over the z-th slice K_z of K (k_per_split wide), z = 0 .. ceil(K / k_per_split) - 1.
//
//   W' is 16-bit like X, or int8 dequantised on load with fp32 per-channel scales running
//      along N (forward: W' = Wᵀ) or along K (backward dx: W' = W);
//   the dropout keep-mask of x (a hash of seed_key, token, feature; see
//      fastft/ops/lora_linear.py) zeroes X at (m, k) (mask_x), W' at (k, n) (mask_w) or
//      the rank-r product at (m, n) (mask_lora);
//   out is 16-bit like X, or fp32 split-K partials (out_fp32) summed by the caller.
//
// Pointers are device addresses as integers (0 = absent), strides in elements, dtype a
// code from csrc/common.h (fp16 or bf16), stream a cudaStream_t as an integer.
void lora_fused_linear(
    std::int64_t x, std::int64_t w, std::int64_t w_scale, std::int64_t bias,
    std::int64_t lora_l, std::int64_t lora_r, std::int64_t out,
    std::int64_t rows, std::int64_t cols, std::int64_t reduce, std::int64_t rank, std::int64_t k_per_split,
    std::int64_t stride_xm, std::int64_t stride_xk, std::int64_t stride_wk, std::int64_t stride_wn,
    std::int64_t stride_lm, std::int64_t stride_lr, std::int64_t stride_rr, std::int64_t stride_rn,
    std::int64_t stride_om, std::int64_t stride_on, std::int64_t stride_os,
    double scale, std::int64_t seed_key, std::int64_t threshold,
    int dtype, bool weight_int8, bool scale_along_n,
    bool mask_x, bool mask_w, bool mask_lora, bool accumulate, bool out_fp32,
    std::int64_t stream);

}  // namespace fastft
