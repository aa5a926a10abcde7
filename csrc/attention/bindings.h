// pybind11 face of the attention kernels: raw device pointers (integers), sizes, strides
// (in elements) and the caller's CUDA stream handle. fastft/ops/attention_cuda.py checks every
// tensor before calling these; see csrc/attention/attention.h for the layouts.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "attention/attention.h"

namespace fastft {

inline void bind_attention(pybind11::module_& m) {
  namespace py = pybind11;
  using Strides3 = std::array<int64_t, 3>;  // (batch, head, seq); the head_dim stride is 1
  auto strides = [](const Strides3& s) {
    attention::Strides out;
    out.batch = s[0];
    out.head = s[1];
    out.seq = s[2];
    return out;
  };

  m.def(
      "attention_forward",
      [strides](std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out, std::uintptr_t lse,
                std::uintptr_t key_padding_mask, int64_t mask_batch_stride, int batch, int heads_q, int heads_kv,
                int seqlen_q, int seqlen_k, int head_dim, Strides3 q_strides, Strides3 k_strides, Strides3 v_strides,
                Strides3 out_strides, int window_left, int window_right, bool bottom_right, float softcap,
                float softmax_scale, int dtype, std::uintptr_t stream) {
        attention::ForwardParams p;
        p.q = reinterpret_cast<const void*>(q);
        p.k = reinterpret_cast<const void*>(k);
        p.v = reinterpret_cast<const void*>(v);
        p.out = reinterpret_cast<void*>(out);
        p.lse = reinterpret_cast<float*>(lse);
        p.key_padding_mask = reinterpret_cast<const uint8_t*>(key_padding_mask);  // 0 -> nullptr: no mask
        p.mask_batch_stride = mask_batch_stride;
        p.q_strides = strides(q_strides);
        p.k_strides = strides(k_strides);
        p.v_strides = strides(v_strides);
        p.out_strides = strides(out_strides);
        p.batch = batch;
        p.heads_q = heads_q;
        p.heads_kv = heads_kv;
        p.seqlen_q = seqlen_q;
        p.seqlen_k = seqlen_k;
        p.head_dim = head_dim;
        p.window_left = window_left;
        p.window_right = window_right;
        p.bottom_right = bottom_right;
        p.softcap = softcap;
        p.softmax_scale = softmax_scale;
        p.dtype = dtype;
        attention::run_forward(p, reinterpret_cast<cudaStream_t>(stream));
      },
      "FlashAttention-2 forward: writes out (B, Hq, Sq, D) and lse (B, Hq, Sq) fp32. Query i attends keys "
      "[i + shift - window_left, i + shift + window_right] (-1: unbounded; shift = seqlen_k - seqlen_q when "
      "bottom_right, else 0); softcap > 0 caps the scaled scores at softcap * tanh(s / softcap).", py::arg("q"), py::arg("k"),
      py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("key_padding_mask"), py::arg("mask_batch_stride"),
      py::arg("batch"), py::arg("heads_q"), py::arg("heads_kv"), py::arg("seqlen_q"), py::arg("seqlen_k"),
      py::arg("head_dim"), py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"),
      py::arg("out_strides"), py::arg("window_left"), py::arg("window_right"), py::arg("bottom_right"),
      py::arg("softcap"), py::arg("softmax_scale"), py::arg("dtype"), py::arg("stream"));

  m.def(
      "attention_backward",
      [strides](std::uintptr_t grad_out, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out,
                std::uintptr_t lse, std::uintptr_t delta, std::uintptr_t grad_q_accum, std::uintptr_t grad_q,
                std::uintptr_t grad_k, std::uintptr_t grad_v, std::uintptr_t grad_lse, std::uintptr_t key_padding_mask,
                int64_t mask_batch_stride, int batch, int heads_q, int heads_kv, int seqlen_q, int seqlen_k,
                int head_dim, Strides3 grad_out_strides, Strides3 q_strides, Strides3 k_strides, Strides3 v_strides,
                Strides3 out_strides, Strides3 grad_k_strides, Strides3 grad_v_strides, int window_left,
                int window_right, bool bottom_right, float softcap, float softmax_scale, int dtype, int variant,
                int kv_splits, std::uintptr_t dkv_workspace, std::uintptr_t stream) {
        attention::BackwardParams p;
        p.grad_out = reinterpret_cast<const void*>(grad_out);
        p.q = reinterpret_cast<const void*>(q);
        p.k = reinterpret_cast<const void*>(k);
        p.v = reinterpret_cast<const void*>(v);
        p.out = reinterpret_cast<const void*>(out);
        p.lse = reinterpret_cast<const float*>(lse);
        p.delta = reinterpret_cast<float*>(delta);
        p.grad_q_accum = reinterpret_cast<float*>(grad_q_accum);
        p.grad_q = reinterpret_cast<void*>(grad_q);
        p.grad_k = reinterpret_cast<void*>(grad_k);
        p.grad_v = reinterpret_cast<void*>(grad_v);
        p.grad_lse = reinterpret_cast<const float*>(grad_lse);  // 0 -> nullptr: no lse gradient
        p.key_padding_mask = reinterpret_cast<const uint8_t*>(key_padding_mask);
        p.mask_batch_stride = mask_batch_stride;
        p.grad_out_strides = strides(grad_out_strides);
        p.q_strides = strides(q_strides);
        p.k_strides = strides(k_strides);
        p.v_strides = strides(v_strides);
        p.out_strides = strides(out_strides);
        p.grad_k_strides = strides(grad_k_strides);
        p.grad_v_strides = strides(grad_v_strides);
        p.batch = batch;
        p.heads_q = heads_q;
        p.heads_kv = heads_kv;
        p.seqlen_q = seqlen_q;
        p.seqlen_k = seqlen_k;
        p.head_dim = head_dim;
        p.window_left = window_left;
        p.window_right = window_right;
        p.bottom_right = bottom_right;
        p.softcap = softcap;
        p.softmax_scale = softmax_scale;
        p.dtype = dtype;
        p.variant = variant;
        p.kv_splits = kv_splits;
        p.dkv_workspace = reinterpret_cast<float*>(dkv_workspace);  // 0 -> nullptr: kv_splits must be 1
        attention::run_backward(p, reinterpret_cast<cudaStream_t>(stream));
      },
      "FlashAttention-2 backward: writes grad_q (via the zeroed fp32 grad_q_accum), grad_k, grad_v. variant 0: "
      "the classic dK/dV kernel; 1: Q/dO loads double-buffered, and with kv_splits > 1 the query steps of each "
      "key block split over kv_splits thread blocks whose fp32 partials (dkv_workspace: 2 x (kv_splits, B, Hkv, "
      "Sk, D)) a second kernel sums in a fixed order.",
      py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
      py::arg("delta"), py::arg("grad_q_accum"), py::arg("grad_q"), py::arg("grad_k"), py::arg("grad_v"),
      py::arg("grad_lse"), py::arg("key_padding_mask"), py::arg("mask_batch_stride"), py::arg("batch"), py::arg("heads_q"),
      py::arg("heads_kv"), py::arg("seqlen_q"), py::arg("seqlen_k"), py::arg("head_dim"),
      py::arg("grad_out_strides"), py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"),
      py::arg("out_strides"), py::arg("grad_k_strides"), py::arg("grad_v_strides"), py::arg("window_left"),
      py::arg("window_right"), py::arg("bottom_right"), py::arg("softcap"), py::arg("softmax_scale"),
      py::arg("dtype"), py::arg("variant"), py::arg("kv_splits"), py::arg("dkv_workspace"), py::arg("stream"));
}

}  // namespace fastft
