// Host-side interface of the FlashAttention-2 style kernels (Dao 2023,
// "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning").
//
// Layout: q (B, Hq, Sq, D), k / v (B, Hkv, Sk, D) with the last dimension contiguous and
// any batch / head / sequence strides (in elements). Grouped-query attention maps query
// head h to key/value head h / (Hq / Hkv). All pointers are device pointers; every check
// on them happens in fastft/ops/attention_cuda.py before they get here.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention/window.h"

namespace fastft {
namespace attention {

struct Strides {  // element strides of a (B, H, S, D) tensor; the D stride is 1
  int64_t batch = 0, head = 0, seq = 0;
};

struct ForwardParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;                     // (B, Hq, Sq, D), same dtype as q
  float* lse = nullptr;                    // (B, Hq, Sq) contiguous fp32, natural log
  const uint8_t* key_padding_mask = nullptr;  // (B, Sk) bytes, nonzero = attend; nullptr = none
  int64_t mask_batch_stride = 0;
  Strides q_strides, k_strides, v_strides, out_strides;
  int batch = 0, heads_q = 0, heads_kv = 0, seqlen_q = 0, seqlen_k = 0, head_dim = 0;
  // Query i attends keys [i + shift - window_left, i + shift + window_right] (-1: unbounded;
  // causal is window_right = 0), shift = seqlen_k - seqlen_q when bottom_right, else 0.
  int window_left = -1, window_right = -1;
  bool bottom_right = false;
  float softcap = 0.f;  // > 0: scores s -> softcap * tanh(s / softcap) before the softmax
  float softmax_scale = 1.f;
  int dtype = 0;  // fastft::DType
};

struct BackwardParams {
  const void* grad_out = nullptr;  // (B, Hq, Sq, D)
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* out = nullptr;
  const float* lse = nullptr;      // (B, Hq, Sq) contiguous, from the forward pass
  float* delta = nullptr;          // (B, Hq, Sq) contiguous scratch: rowsum(dO * O)
  float* grad_q_accum = nullptr;   // (B, Hq, Sq, D) contiguous fp32, zero-initialised
  void* grad_q = nullptr;          // (B, Hq, Sq, D) contiguous, dtype of q
  void* grad_k = nullptr;          // (B, Hkv, Sk, D), dtype of q
  void* grad_v = nullptr;          // (B, Hkv, Sk, D), dtype of q
  const uint8_t* key_padding_mask = nullptr;
  int64_t mask_batch_stride = 0;
  Strides grad_out_strides, q_strides, k_strides, v_strides, out_strides, grad_k_strides, grad_v_strides;
  int batch = 0, heads_q = 0, heads_kv = 0, seqlen_q = 0, seqlen_k = 0, head_dim = 0;
  int window_left = -1, window_right = -1;  // as in ForwardParams
  bool bottom_right = false;
  float softcap = 0.f;
  const float* grad_lse = nullptr;  // (B, Hq, Sq) contiguous gradient of a returned lse, or nullptr
  float softmax_scale = 1.f;
  int dtype = 0;
  // Which dK/dV kernel (attention_bwd.cu): kBackwardClassic, or kBackwardPipelined (Q / dO
  // loads double-buffered; with kv_splits > 1 each (key block, kv head) is split over
  // kv_splits thread blocks, each taking a contiguous share of the group's (query head,
  // query block) steps and writing fp32 partial dK / dV to dkv_workspace, which a second
  // kernel sums in a fixed order: deterministic).
  int variant = 0;
  int kv_splits = 1;
  float* dkv_workspace = nullptr;  // 2 x (kv_splits, B, Hkv, Sk, D) contiguous fp32 when kv_splits > 1
};

constexpr int kBackwardClassic = 0;
constexpr int kBackwardPipelined = 1;

// The key band of every query (window.h) for these parameters.
template <typename Params>
FASTFT_HOST_DEVICE Window window_of(const Params& p) {
  Window w;
  w.left = p.window_left;
  w.right = p.window_right;
  w.shift = p.bottom_right ? p.seqlen_k - p.seqlen_q : 0;
  return w;
}

// Both throw std::runtime_error on an unsupported dtype / head_dim or a failed launch.
void run_forward(const ForwardParams& params, cudaStream_t stream);
void run_backward(const BackwardParams& params, cudaStream_t stream);

}  // namespace attention
}  // namespace fastft
