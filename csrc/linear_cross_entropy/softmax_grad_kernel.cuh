// Device code of linear_cross_entropy_softmax_grad (launcher: linear_cross_entropy.cu): per-row
// log-sum-exp, loss and d loss / d logits over a chunk of fp32 logits that cuBLAS
// (through torch) has just written. One thread block per row, two passes over the row:
//
//   pass 1  online softmax (Milakov & Gimelshein 2018, "Online normalizer calculation for
//           softmax"): each thread keeps a running max and a sum of exp(z - max) that it
//           rescales whenever the max grows, plus the plain sum of logits for label
//           smoothing; warps merge these with shuffles, the block through shared memory.
//   pass 2  (only when a gradient is wanted) re-reads the row and writes
//           row_scale * (softmax - (1 - eps) * onehot - eps / V) in place and/or as 16 bits.
//
// Rows are read with 16-byte float4 loads; a row of odd length V starts at any 4-byte
// boundary, so each row is split into a scalar head (up to the first 16-byte boundary),
// a float4 body and a scalar tail. Every element offset is int64: rows * V can exceed 2^31.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace fastft {
namespace softmax_grad_detail {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / kWarpSize;
constexpr unsigned kFullWarp = 0xffffffffu;

// Softmax statistics of the logits a thread (then a warp, then the block) has seen.
struct RowStats {
  float max;      // largest logit so far; -inf when none (or all -inf)
  float sum_exp;  // sum of exp(z - max) over the logits seen
  float sum;      // plain sum of the logits (label smoothing's mean term)
};

__device__ __forceinline__ RowStats empty_stats() { return {-INFINITY, 0.0f, 0.0f}; }

// Online softmax update with one logit.
__device__ __forceinline__ void add_logit(RowStats& s, float z) {
  if (z > s.max) {
    // New maximum: rescale what was summed against the old one. On the first finite
    // logit s.max is -inf and s.sum_exp is 0, and expf(-inf) = 0, so this gives 1.
    s.sum_exp = s.sum_exp * expf(s.max - z) + 1.0f;
    s.max = z;
  } else if (z != -INFINITY) {
    // A -inf logit adds exp(-inf) = 0; skipping it avoids (-inf) - (-inf) = NaN while
    // s.max is still -inf. A NaN logit lands here and makes the sum (and the loss) NaN.
    s.sum_exp += expf(z - s.max);
  }
  s.sum += z;
}

// Merge two partial statistics: both sums are re-expressed relative to the larger max.
__device__ __forceinline__ RowStats merge_stats(const RowStats& a, const RowStats& b) {
  RowStats out;
  out.max = fmaxf(a.max, b.max);
  out.sum = a.sum + b.sum;
  // Both sides empty (max -inf): the sum stays 0 instead of 0 * expf(NaN).
  out.sum_exp = out.max == -INFINITY
                    ? 0.0f
                    : a.sum_exp * expf(a.max - out.max) + b.sum_exp * expf(b.max - out.max);
  return out;
}

__device__ __forceinline__ RowStats warp_reduce(RowStats s) {
  // Butterfly: after log2(32) steps every lane holds the merge of all 32 lanes.
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    RowStats other;
    other.max = __shfl_xor_sync(kFullWarp, s.max, offset);
    other.sum_exp = __shfl_xor_sync(kFullWarp, s.sum_exp, offset);
    other.sum = __shfl_xor_sync(kFullWarp, s.sum, offset);
    s = merge_stats(s, other);
  }
  return s;
}

// Every thread of the block must call this (it synchronises); all get the block's result.
// blockDim.x is a multiple of 32, at most kMaxThreads.
__device__ inline RowStats block_reduce(RowStats s) {
  __shared__ RowStats warp_stats[kMaxWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  s = warp_reduce(s);
  if (lane == 0) warp_stats[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < num_warps ? warp_stats[lane] : empty_stats();
    s = warp_reduce(s);
    if (lane == 0) warp_stats[0] = s;
  }
  __syncthreads();
  return warp_stats[0];
}

// Calls new_value = visit(j, row[j]) for every j in [0, n), the threads of the block
// striding over the row, and stores new_value back when `store`. The 16-byte aligned
// body goes through float4 loads/stores; the head before the first 16-byte boundary and
// the tail after the last full float4 are scalar. Requires a 4-byte aligned row.
template <typename Visit>
__device__ __forceinline__ void for_each_logit(float* row, int64_t n, bool store, Visit visit) {
  const int64_t floats_past_boundary = static_cast<int64_t>((reinterpret_cast<std::uintptr_t>(row) / sizeof(float)) % 4);
  const int64_t head = min(n, (4 - floats_past_boundary) % 4);
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x) {
    const float value = visit(j, row[j]);
    if (store) row[j] = value;
  }
  float4* body = reinterpret_cast<float4*>(row + head);
  const int64_t num_vectors = (n - head) / 4;
  for (int64_t v = threadIdx.x; v < num_vectors; v += blockDim.x) {
    float4 q = body[v];
    const int64_t j = head + 4 * v;
    q.x = visit(j, q.x);
    q.y = visit(j + 1, q.y);
    q.z = visit(j + 2, q.z);
    q.w = visit(j + 3, q.w);
    if (store) body[v] = q;
  }
  for (int64_t j = head + 4 * num_vectors + threadIdx.x; j < n; j += blockDim.x) {
    const float value = visit(j, row[j]);
    if (store) row[j] = value;
  }
}

template <typename BiasT>
__device__ __forceinline__ float bias_at(const BiasT* bias, int64_t j) {
  return bias == nullptr ? 0.0f : to_float(bias[j]);
}

template <typename BiasT, typename Grad16T>
__global__ void __launch_bounds__(kMaxThreads) linear_cross_entropy_softmax_grad_kernel(
    float* __restrict__ logits,          // (rows, vocab) fp32; overwritten by the gradient when write_in_place
    int64_t vocab,
    const BiasT* __restrict__ bias,      // (vocab,) or nullptr
    const int64_t* __restrict__ labels,  // (rows,)
    float label_smoothing,
    const float* __restrict__ row_scale, // (rows,) or nullptr: no gradient
    bool write_in_place,
    Grad16T* __restrict__ grad_logits_16,  // (rows, vocab) or nullptr
    float* __restrict__ loss,            // (rows,)
    float* __restrict__ lse_out) {       // (rows,) or nullptr
  const int64_t row_index = blockIdx.x;
  float* row = logits + row_index * vocab;
  const int64_t label = labels[row_index];
  const bool label_valid = label >= 0 && label < vocab;

  // Read the target logit before pass 2 may overwrite it (pass 2 starts after the
  // __syncthreads inside block_reduce).
  float target = NAN;
  if (threadIdx.x == 0 && label_valid) target = row[label] + bias_at(bias, label);

  // ---- pass 1: max, sum of exp and sum of the row in one read (online softmax)
  RowStats stats = empty_stats();
  for_each_logit(row, vocab, /*store=*/false, [&](int64_t j, float x) {
    add_logit(stats, x + bias_at(bias, j));
    return x;
  });
  stats = block_reduce(stats);
  // log-sum-exp = max + log(sum exp(z - max)): exact rescaling, no overflow.
  const float lse = stats.max + logf(stats.sum_exp);

  if (threadIdx.x == 0) {
    // Smoothed cross-entropy (as torch.nn.functional.cross_entropy):
    // (1 - eps) * (lse - z_y) + eps * (lse - mean_j z_j) = lse - (1 - eps) z_y - eps mean_j z_j.
    // The smoothing term only when eps != 0: a -inf logit (e.g. a masked vocab entry)
    // makes the mean -inf, and 0 * -inf would turn a finite loss into NaN.
    float row_loss = lse - (1.0f - label_smoothing) * target;
    if (label_smoothing != 0.0f) row_loss -= label_smoothing * (stats.sum / static_cast<float>(vocab));
    loss[row_index] = row_loss;
    if (lse_out != nullptr) lse_out[row_index] = lse;
  }

  const bool want_grad = row_scale != nullptr && (write_in_place || grad_logits_16 != nullptr);
  if (!want_grad) return;  // uniform across the block: no thread is left waiting at a barrier

  // ---- pass 2: d(row_scale * loss) / dz = row_scale * (softmax - (1-eps) onehot - eps/V)
  const float scale = row_scale[row_index];
  const float uniform_target = label_smoothing / static_cast<float>(vocab);
  const float onehot_target = 1.0f - label_smoothing;
  Grad16T* row_16 = grad_logits_16 == nullptr ? nullptr : grad_logits_16 + row_index * vocab;
  for_each_logit(row, vocab, write_in_place, [&](int64_t j, float x) {
    const float z = x + bias_at(bias, j);
    float grad = expf(z - lse) - uniform_target;
    if (j == label) grad -= onehot_target;
    grad *= scale;
    if (row_16 != nullptr) row_16[j] = from_float<Grad16T>(grad);
    return grad;
  });
}

// Fewer threads for short rows: most of a 512-thread block would idle on V = 50.
inline int threads_for(int64_t vocab) {
  if (vocab >= 8192) return 512;
  if (vocab >= 1024) return 256;
  return 128;
}

}  // namespace softmax_grad_detail
}  // namespace fastft
