// FlashAttention-2 backward pass (Dao 2023, Algorithm 2) on sm_80+ tensor cores.
//
// Three launches:
//   1. delta = rowsum(dO * O) - dlse   (B, Hq, Sq) fp32: the "D_i" of the paper, which turns
//      the softmax Jacobian-vector product into dS = P * (dP - delta) without a row
//      reduction inside the main loop; dlse is the gradient of a returned lse (0 without:
//      d lse / d s = P, so it enters as dS = P * (dP - rowsum(dO * O) + dlse)).
//   2. One thread block per (batch, key/value head, kBlockN = 64 keys). It holds K and V of
//      its keys in shared memory and dK, dV in registers (each of the 4 warps owns 16 keys),
//      and walks every query block of every query head of its group (GQA: dK and dV are
//      sums over the group, so they are accumulated in registers and written once):
//         S^T  = K Q^T                      P^T = exp(scale * S^T - lse)   (recomputed)
//         dV  += P^T dO                     dP^T = V dO^T
//         dS^T = P^T * (dP^T - delta)       dK  += dS^T Q
//         dQ  += dS K                       (fp32 atomicAdd into a (B, Hq, Sq, D) buffer)
//      visiting only the query blocks whose window reaches its keys (window.h). With
//      soft-capping (s -> c tanh(s / c)), dS is multiplied by 1 - tanh^2.
//   3. dQ = softmax_scale * dQ_accum, converted to the input dtype.
//
// Why atomics for dQ rather than a separate dQ kernel: a separate kernel looping over key
// blocks per query block would recompute S = Q K^T, P and dP = dO V^T (3 of the 5 matrix
// products of the backward pass, i.e. ~60% more tensor-core work) plus re-read K and V.
// The atomic adds cost an fp32 (B, Hq, Sq, D) buffer, one red.global.add per dQ element
// per key block, and a summation order that is not deterministic run to run; the paper
// (section 3.1.2 / Algorithm 2) makes the same choice.
//
// Scaling: with Z = scale * Q K^T, dZ = P * (dP - delta); dQ = scale * dZ K and
// dK = scale * dZ^T Q. The kernel accumulates dZ products and applies `scale` once, when
// dK is written and when dQ is converted.
#include "attention/attention.h"
#include "attention/mma_utils.cuh"
#include "common.h"

#include <cmath>
#include <stdexcept>
#include <string>

namespace fastft {
namespace attention {
namespace {

constexpr int kBlockN = 64;  // keys per thread block (16 per warp)
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;  // log2(e)

static_assert(kBlockN == kWarps * 16, "each warp owns 16 keys");

// Queries per inner step. With head_dim 128 the dK and dV accumulators already take 128
// fp32 registers per thread, so the query step shrinks to 32 to keep S^T and dP^T small.
template <int kHeadDim> constexpr int backward_block_m() { return kHeadDim >= 128 ? 32 : 64; }

template <int kHeadDim, typename T>
constexpr int backward_smem_bytes() {
  constexpr int kBlockM = backward_block_m<kHeadDim>();
  return (2 * kBlockN * (kHeadDim + 8) + 2 * kBlockM * (kHeadDim + 8) + kBlockN * (kBlockM + 8)) * int(sizeof(T)) +
         2 * kBlockM * int(sizeof(float));
}

// ----------------------------------------------------------------------------- 1. delta

// One warp per query row: delta = sum_d dO[d] * O[d] in fp32.
template <typename T>
__global__ void __launch_bounds__(kThreads)
attention_backward_delta_kernel(const BackwardParams p) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t rows = int64_t(p.batch) * p.heads_q * p.seqlen_q;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t batch = row / (int64_t(p.heads_q) * p.seqlen_q);
  const int64_t head = (row / p.seqlen_q) % p.heads_q;
  const int64_t query = row % p.seqlen_q;
  const T* grad_out = static_cast<const T*>(p.grad_out) + batch * p.grad_out_strides.batch +
                      head * p.grad_out_strides.head + query * p.grad_out_strides.seq;
  const T* out = static_cast<const T*>(p.out) + batch * p.out_strides.batch + head * p.out_strides.head +
                 query * p.out_strides.seq;
  float sum = 0.f;
  for (int d = lane; d < p.head_dim; d += 32) sum += to_float(grad_out[d]) * to_float(out[d]);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) p.delta[row] = p.grad_lse == nullptr ? sum : sum - p.grad_lse[row];  // contiguous (B, Hq, Sq)
}

// ----------------------------------------------------------------------------- 2. dK, dV, dQ

// One query block's share of the backward pass, the part both dK/dV kernels share: with K,
// V, this block's Q and dO (kBlockM rows from m_start) and its lse2 / delta in shared
// memory, adds its terms to this warp's dK / dV accumulators and its dQ to grad_q_accum
// (fp32 atomics). One __syncthreads() inside: dS^T of all warps must be in shared memory
// before the dQ product reads it. The caller owns the barriers around the buffers.
template <typename T, int kHeadDim>
__device__ __forceinline__ void backward_query_block(const T* smem_k, const T* smem_v, const T* smem_q,
                                                     const T* smem_do, T* smem_ds, const float* smem_lse2,
                                                     const float* smem_delta, int m_start, int seqlen_q,
                                                     const int (&query_first)[2], const int (&query_last)[2],
                                                     float scale_log2, bool softcap, float cap_in, float cap_out,
                                                     float inv_cap_log2, float* grad_q_accum,
                                                     float (&dk_acc)[kHeadDim / 8][4],
                                                     float (&dv_acc)[kHeadDim / 8][4]) {
  constexpr int kBlockM = backward_block_m<kHeadDim>();
  constexpr int kStride = kHeadDim + 8;
  constexpr int kStrideDs = kBlockM + 8;
  constexpr int kRowGroups = kBlockM / 16;
  constexpr int kPartsPerRowGroup = kWarps / kRowGroups;
  constexpr int kDqTiles = kHeadDim / 8 / kPartsPerRowGroup;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane / 4, quad_lane = lane % 4;

  // S^T = K Q^T for this warp's 16 keys x kBlockM queries.
  float s[kBlockM / 8][4];
#pragma unroll
  for (int nt = 0; nt < kBlockM / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
  for (int ks = 0; ks < kHeadDim / 16; ++ks) {
    uint32_t a[4];
    load_a(a, smem_k, kStride, warp * 16, ks * 16);
#pragma unroll
    for (int np = 0; np < kBlockM / 16; ++np) {
      uint32_t b[4];
      load_b(b, smem_q, kStride, np * 16, ks * 16);
      mma_16x8x16<T>(s[2 * np], a, b[0], b[1]);
      mma_16x8x16<T>(s[2 * np + 1], a, b[2], b[3]);
    }
  }

  if (softcap) {  // uniform branch
#pragma unroll
    for (int nt = 0; nt < kBlockM / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = cap_out * tanh_approx(s[nt][e] * cap_in);
  }

  // P^T = exp2(s * scale * log2(e) - lse * log2(e)) = exp(scale * s - lse): the
  // forward probabilities recomputed from the saved log-sum-exp. Masked entries are 0.
#pragma unroll
  for (int nt = 0; nt < kBlockM / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int query_local = nt * 8 + quad_lane * 2 + (e & 1);
      const int query = m_start + query_local;
      const int r = e / 2;
      const bool allowed = query >= query_first[r] && query <= query_last[r];
      s[nt][e] = allowed ? exp2f(s[nt][e] * scale_log2 - smem_lse2[query_local]) : 0.f;
    }
  }

  // dV += P^T dO: P^T (keys x queries) is already in the A layout (C of two tiles).
#pragma unroll
  for (int ks = 0; ks < kBlockM / 16; ++ks) {
    const uint32_t a[4] = {pack2<T>(s[2 * ks][0], s[2 * ks][1]), pack2<T>(s[2 * ks][2], s[2 * ks][3]),
                           pack2<T>(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                           pack2<T>(s[2 * ks + 1][2], s[2 * ks + 1][3])};
#pragma unroll
    for (int np = 0; np < kHeadDim / 16; ++np) {
      uint32_t b[4];
      load_b_trans(b, smem_do, kStride, ks * 16, np * 16);
      mma_16x8x16<T>(dv_acc[2 * np], a, b[0], b[1]);
      mma_16x8x16<T>(dv_acc[2 * np + 1], a, b[2], b[3]);
    }
  }

  // dP^T = V dO^T for this warp's 16 keys x kBlockM queries.
  float dp[kBlockM / 8][4];
#pragma unroll
  for (int nt = 0; nt < kBlockM / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dp[nt][e] = 0.f;
#pragma unroll
  for (int ks = 0; ks < kHeadDim / 16; ++ks) {
    uint32_t a[4];
    load_a(a, smem_v, kStride, warp * 16, ks * 16);
#pragma unroll
    for (int np = 0; np < kBlockM / 16; ++np) {
      uint32_t b[4];
      load_b(b, smem_do, kStride, np * 16, ks * 16);
      mma_16x8x16<T>(dp[2 * np], a, b[0], b[1]);
      mma_16x8x16<T>(dp[2 * np + 1], a, b[2], b[3]);
    }
  }

  // dS^T = P^T * (dP^T - delta): the softmax backward, row by row of P (= column of P^T).
#pragma unroll
  for (int nt = 0; nt < kBlockM / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dp[nt][e] = s[nt][e] * (dp[nt][e] - smem_delta[nt * 8 + quad_lane * 2 + (e & 1)]);
  if (softcap) {
    // Through c tanh(u): times 1 - tanh(u)^2. tanh(u) is read back from P itself,
    // log2(P) + lse2 = c log2(e) tanh(u), instead of keeping a second register tile
    // (P = 0, masked or underflowed, has dS = 0 whatever the factor).
#pragma unroll
    for (int nt = 0; nt < kBlockM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float prob = s[nt][e];
        const float t = prob > 0.f ? (log2f(prob) + smem_lse2[nt * 8 + quad_lane * 2 + (e & 1)]) * inv_cap_log2 : 0.f;
        dp[nt][e] *= 1.f - t * t;
      }
    }
  }

  // dK += dS^T Q, and dS^T to shared memory (16-bit) for dQ = dS K below.
#pragma unroll
  for (int ks = 0; ks < kBlockM / 16; ++ks) {
    const uint32_t a[4] = {pack2<T>(dp[2 * ks][0], dp[2 * ks][1]), pack2<T>(dp[2 * ks][2], dp[2 * ks][3]),
                           pack2<T>(dp[2 * ks + 1][0], dp[2 * ks + 1][1]),
                           pack2<T>(dp[2 * ks + 1][2], dp[2 * ks + 1][3])};
    const int row = warp * 16 + group;
    *reinterpret_cast<uint32_t*>(smem_ds + row * kStrideDs + (2 * ks) * 8 + quad_lane * 2) = a[0];
    *reinterpret_cast<uint32_t*>(smem_ds + (row + 8) * kStrideDs + (2 * ks) * 8 + quad_lane * 2) = a[1];
    *reinterpret_cast<uint32_t*>(smem_ds + row * kStrideDs + (2 * ks + 1) * 8 + quad_lane * 2) = a[2];
    *reinterpret_cast<uint32_t*>(smem_ds + (row + 8) * kStrideDs + (2 * ks + 1) * 8 + quad_lane * 2) = a[3];
#pragma unroll
    for (int np = 0; np < kHeadDim / 16; ++np) {
      uint32_t b[4];
      load_b_trans(b, smem_q, kStride, ks * 16, np * 16);
      mma_16x8x16<T>(dk_acc[2 * np], a, b[0], b[1]);
      mma_16x8x16<T>(dk_acc[2 * np + 1], a, b[2], b[3]);
    }
  }
  __syncthreads();  // dS^T of all 4 warps (all 64 keys) is in shared memory

  // dQ (kBlockM x kHeadDim) += dS (kBlockM x 64 keys) K (64 keys x kHeadDim). Warp
  // `warp` takes 16 query rows and kDqTiles * 8 columns; dS is read transposed from
  // its [key][query] storage.
  {
    const int row_group = warp % kRowGroups;
    const int col0 = (warp / kRowGroups) * kDqTiles * 8;
    float dq[kDqTiles][4];
#pragma unroll
    for (int nt = 0; nt < kDqTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dq[nt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks) {
      uint32_t a[4];
      load_a_trans(a, smem_ds, kStrideDs, ks * 16, row_group * 16);
#pragma unroll
      for (int np = 0; np < kDqTiles / 2; ++np) {
        uint32_t b[4];
        load_b_trans(b, smem_k, kStride, ks * 16, col0 + np * 16);
        mma_16x8x16<T>(dq[2 * np], a, b[0], b[1]);
        mma_16x8x16<T>(dq[2 * np + 1], a, b[2], b[3]);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int query = m_start + row_group * 16 + group + r * 8;
      if (query < seqlen_q) {
        float* dst = grad_q_accum + int64_t(query) * kHeadDim + col0 + quad_lane * 2;
#pragma unroll
        for (int nt = 0; nt < kDqTiles; ++nt) {
          atomicAdd(dst + nt * 8, dq[nt][2 * r]);
          atomicAdd(dst + nt * 8 + 1, dq[nt][2 * r + 1]);
        }
      }
    }
  }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads)
attention_backward_kernel(const BackwardParams p) {
  constexpr int kBlockM = backward_block_m<kHeadDim>();
  constexpr int kStride = kHeadDim + 8;  // +16 bytes per row: conflict-free ldmatrix
  constexpr int kStrideDs = kBlockM + 8;
  // dQ work split: (kBlockM / 16) row groups of 16 queries x kHeadDim columns over 4 warps.
  constexpr int kRowGroups = kBlockM / 16;
  constexpr int kPartsPerRowGroup = kWarps / kRowGroups;
  constexpr int kDqTiles = kHeadDim / 8 / kPartsPerRowGroup;  // 8-column tiles per warp
  static_assert(kWarps % kRowGroups == 0 && kDqTiles % 2 == 0, "dQ tiles split evenly over warps");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem_k = reinterpret_cast<T*>(smem_raw);            // (kBlockN, kStride)
  T* smem_v = smem_k + kBlockN * kStride;                // (kBlockN, kStride)
  T* smem_q = smem_v + kBlockN * kStride;                // (kBlockM, kStride)
  T* smem_do = smem_q + kBlockM * kStride;               // (kBlockM, kStride)
  T* smem_ds = smem_do + kBlockM * kStride;              // (kBlockN, kStrideDs): dS^T, [key][query]
  float* smem_lse2 = reinterpret_cast<float*>(smem_ds + kBlockN * kStrideDs);  // (kBlockM,)
  float* smem_delta = smem_lse2 + kBlockM;               // (kBlockM,)

  const int n_block = blockIdx.x;
  const int head_kv = blockIdx.y;
  const int batch = blockIdx.z;
  const int group_size = p.heads_q / p.heads_kv;
  const int n_start = n_block * kBlockN;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane / 4;

  const T* k = static_cast<const T*>(p.k) + batch * p.k_strides.batch + head_kv * p.k_strides.head;
  const T* v = static_cast<const T*>(p.v) + batch * p.v_strides.batch + head_kv * p.v_strides.head;
  T* grad_k = static_cast<T*>(p.grad_k) + batch * p.grad_k_strides.batch + head_kv * p.grad_k_strides.head;
  T* grad_v = static_cast<T*>(p.grad_v) + batch * p.grad_v_strides.batch + head_kv * p.grad_v_strides.head;

  load_tile_async<T, kBlockN, kHeadDim, kThreads>(smem_k, kStride, k, p.k_strides.seq, n_start, p.seqlen_k);
  load_tile_async<T, kBlockN, kHeadDim, kThreads>(smem_v, kStride, v, p.v_strides.seq, n_start, p.seqlen_k);
  cp_async_commit();

  // This thread's two keys (accumulator rows `group` and `group + 8` of its warp) are fixed
  // for the whole block: fold "past the end" and the padding mask into one flag each.
  // The queries [first, last] that may see each of them (window.h) are fixed too.
  const Window window = window_of(p);
  int query_first[2], query_last[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = n_start + warp * 16 + group + r * 8;
    queries_of_key(window, key, p.seqlen_q, query_first[r], query_last[r]);
    const bool key_allowed = key < p.seqlen_k && (p.key_padding_mask == nullptr ||
                                                  p.key_padding_mask[batch * p.mask_batch_stride + key] != 0);
    if (!key_allowed) query_first[r] = p.seqlen_q;  // an empty range: no query sees it
  }

  float dk_acc[kHeadDim / 8][4], dv_acc[kHeadDim / 8][4];
#pragma unroll
  for (int nt = 0; nt < kHeadDim / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[nt][e] = dv_acc[nt][e] = 0.f;

  const float scale_log2 = p.softmax_scale * kLog2e;  // exp(scale * s) = exp2(s * scale_log2)
  // Query blocks whose window does not reach this key block (causal: those that end
  // before it starts; sliding windows: those far after it too) contribute nothing and are
  // skipped.
  const int m_first = query_begin(window, n_start, kBlockM, p.seqlen_q);
  const int m_end = query_end(window, n_start, kBlockN, p.seqlen_q, p.seqlen_k);
  // Soft-capping, as in the forward pass: scores in raw units s -> (c / scale) tanh(s scale / c).
  const bool softcap = p.softcap > 0.f;
  const float cap_in = p.softmax_scale / p.softcap, cap_out = p.softcap / p.softmax_scale;
  const float inv_cap_log2 = 1.f / (p.softcap * kLog2e);

  for (int head = head_kv * group_size; head < (head_kv + 1) * group_size; ++head) {
    const T* q = static_cast<const T*>(p.q) + batch * p.q_strides.batch + head * p.q_strides.head;
    const T* grad_out =
        static_cast<const T*>(p.grad_out) + batch * p.grad_out_strides.batch + head * p.grad_out_strides.head;
    const int64_t row_offset = (int64_t(batch) * p.heads_q + head) * p.seqlen_q;  // into (B, Hq, Sq)
    const float* lse = p.lse + row_offset;
    const float* delta = p.delta + row_offset;
    float* grad_q_accum = p.grad_q_accum + row_offset * kHeadDim;

    for (int m_start = m_first; m_start < m_end; m_start += kBlockM) {
      load_tile_async<T, kBlockM, kHeadDim, kThreads>(smem_q, kStride, q, p.q_strides.seq, m_start, p.seqlen_q);
      load_tile_async<T, kBlockM, kHeadDim, kThreads>(smem_do, kStride, grad_out, p.grad_out_strides.seq, m_start,
                                                      p.seqlen_q);
      cp_async_commit();
      if (threadIdx.x < kBlockM) {
        // lse in the log2 domain. Rows past the end and rows that attended no key
        // (lse = -inf) get +inf, so that exp2(s2 - lse2) = 0 for them instead of NaN.
        const int query = m_start + threadIdx.x;
        const float row_lse = query < p.seqlen_q ? lse[query] : -INFINITY;
        smem_lse2[threadIdx.x] = row_lse == -INFINITY ? INFINITY : row_lse * kLog2e;
        smem_delta[threadIdx.x] = query < p.seqlen_q ? delta[query] : 0.f;
      }
      cp_async_wait<0>();
      __syncthreads();

      backward_query_block<T, kHeadDim>(smem_k, smem_v, smem_q, smem_do, smem_ds, smem_lse2, smem_delta, m_start,
                                        p.seqlen_q, query_first, query_last, scale_log2, softcap, cap_in, cap_out,
                                        inv_cap_log2, grad_q_accum, dk_acc, dv_acc);
      __syncthreads();  // Q, dO, dS^T buffers are overwritten by the next step
    }
  }

  // Epilogue: dK = scale * dZ^T Q and dV through shared memory, 16-byte coalesced stores.
  cp_async_wait<0>();  // K/V copies are still in flight if no query block was visited
  __syncthreads();
  store_acc_to_smem<T, kHeadDim>(smem_k, kStride, warp * 16, dk_acc, p.softmax_scale, p.softmax_scale);
  store_acc_to_smem<T, kHeadDim>(smem_v, kStride, warp * 16, dv_acc, 1.f, 1.f);
  __syncthreads();
  store_tile<T, kBlockN, kHeadDim, kThreads>(grad_k, p.grad_k_strides.seq, smem_k, kStride, n_start, p.seqlen_k);
  store_tile<T, kBlockN, kHeadDim, kThreads>(grad_v, p.grad_v_strides.seq, smem_v, kStride, n_start, p.seqlen_k);
}

// ----------------------------------------------------------------------------- 2b. pipelined dK, dV, dQ
//
// The same products as attention_backward_kernel, with two changes (issue 15, defect 8):
//
// Software pipelining. The query blocks a thread block visits are one flat sequence of
// steps (query head of the group, query block); Q and dO of step i + 1 go to the other of
// two shared-memory stages by cp.async while step i computes on its stage, and its lse /
// delta travel in registers (loaded with the cp.async, stored to that stage's shared
// arrays after the step's dQ). Two barriers per step, instead of three:
//   A (top): cp_async_wait<0> + __syncthreads: the current stage's Q / dO / lse / delta
//     are visible to every warp, AND every warp has finished the previous step, i.e. its
//     reads of the other stage (dK += dS^T Q, dV += P^T dO) and of dS^T (dQ). Only after A
//     is the other stage overwritten by the prefetch, and dS^T by this step.
//   B (inside backward_query_block): dS^T of all warps is in shared memory before dQ reads it.
// The classic kernel's third barrier (end of step: "buffers are overwritten next") is the
// next step's barrier A. One commit group is in flight at A (the prefetch issued one step
// earlier), so wait<0> does not wait for anything issued later than needed.
//
// Small-grid split. B x Hkv x key blocks thread blocks may be too few to fill the GPU (GQA
// with short sequences: Llama 8 kv heads at 1024 tokens is 128 for 132 SMs). With
// kv_splits > 1, blockIdx.y = head_kv * kv_splits + split, and split s takes steps
// [s T / S, (s + 1) T / S) of the T steps (over query heads of the group, then query
// blocks, so a split is a run of query heads for long sequences and a run of query blocks
// of one head for short ones). Each writes its fp32 partial dK / dV (every row < seqlen_k,
// zeros if it had no step) to dkv_workspace; attention_backward_reduce_dkv_kernel adds the
// kv_splits partials in split order. A fixed order, so dK / dV are bitwise repeatable,
// which fp32 atomics into one buffer would not be; the cost is 2 x S x B x Hkv x Sk x D x 4
// bytes written and read once, small exactly when the split is used (small grids).

template <int kHeadDim, typename T>
constexpr int pipelined_smem_bytes() {
  constexpr int kBlockM = backward_block_m<kHeadDim>();
  // K, V + two stages of (Q, dO) + dS^T, then two stages of (lse2, delta).
  return (2 * kBlockN * (kHeadDim + 8) + 4 * kBlockM * (kHeadDim + 8) + kBlockN * (kBlockM + 8)) * int(sizeof(T)) +
         4 * kBlockM * int(sizeof(float));
}
// sm_80 lets a block opt in to 163 KB (166,912 bytes) of shared memory, sm_90 to 227 KB.
static_assert(pipelined_smem_bytes<128, __half>() <= 166912 && pipelined_smem_bytes<64, __half>() <= 166912 &&
                  pipelined_smem_bytes<32, __half>() <= 166912,
              "the pipelined backward must fit sm_80's shared memory");

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads)
attention_backward_pipelined_kernel(const BackwardParams p) {
  constexpr int kBlockM = backward_block_m<kHeadDim>();
  constexpr int kStride = kHeadDim + 8;
  constexpr int kStrideDs = kBlockM + 8;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem_k = reinterpret_cast<T*>(smem_raw);       // (kBlockN, kStride)
  T* smem_v = smem_k + kBlockN * kStride;           // (kBlockN, kStride)
  T* smem_q0 = smem_v + kBlockN * kStride;          // stage s: Q at smem_q0 + s * kStageElems
  T* smem_do0 = smem_q0 + kBlockM * kStride;        //          dO at smem_do0 + s * kStageElems
  constexpr int kStageElems = 2 * kBlockM * kStride;
  T* smem_ds = smem_q0 + 2 * kStageElems;           // (kBlockN, kStrideDs)
  float* smem_lse2_0 = reinterpret_cast<float*>(smem_ds + kBlockN * kStrideDs);  // stage s: + s * 2 * kBlockM
  float* smem_delta0 = smem_lse2_0 + kBlockM;

  const int n_block = blockIdx.x;
  const int splits = p.kv_splits;
  const int head_kv = blockIdx.y / splits;
  const int split = blockIdx.y % splits;
  const int batch = blockIdx.z;
  const int group_size = p.heads_q / p.heads_kv;
  const int n_start = n_block * kBlockN;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane / 4;

  const T* k = static_cast<const T*>(p.k) + batch * p.k_strides.batch + head_kv * p.k_strides.head;
  const T* v = static_cast<const T*>(p.v) + batch * p.v_strides.batch + head_kv * p.v_strides.head;
  load_tile_async<T, kBlockN, kHeadDim, kThreads>(smem_k, kStride, k, p.k_strides.seq, n_start, p.seqlen_k);
  load_tile_async<T, kBlockN, kHeadDim, kThreads>(smem_v, kStride, v, p.v_strides.seq, n_start, p.seqlen_k);
  cp_async_commit();

  const Window window = window_of(p);
  int query_first[2], query_last[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = n_start + warp * 16 + group + r * 8;
    queries_of_key(window, key, p.seqlen_q, query_first[r], query_last[r]);
    const bool key_allowed = key < p.seqlen_k && (p.key_padding_mask == nullptr ||
                                                  p.key_padding_mask[batch * p.mask_batch_stride + key] != 0);
    if (!key_allowed) query_first[r] = p.seqlen_q;
  }

  float dk_acc[kHeadDim / 8][4], dv_acc[kHeadDim / 8][4];
#pragma unroll
  for (int nt = 0; nt < kHeadDim / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[nt][e] = dv_acc[nt][e] = 0.f;

  const float scale_log2 = p.softmax_scale * kLog2e;
  const int m_first = query_begin(window, n_start, kBlockM, p.seqlen_q);
  const int m_end = query_end(window, n_start, kBlockN, p.seqlen_q, p.seqlen_k);
  const bool softcap = p.softcap > 0.f;
  const float cap_in = p.softmax_scale / p.softcap, cap_out = p.softcap / p.softmax_scale;
  const float inv_cap_log2 = 1.f / (p.softcap * kLog2e);

  // Steps: (query head of the group, query block) flattened, query blocks fastest. int is
  // enough: group_size * m_blocks >= 2^31 would need a q of more than 2^36 rows.
  const int m_blocks = m_end > m_first ? (m_end - m_first + kBlockM - 1) / kBlockM : 0;
  const int64_t steps = int64_t(group_size) * m_blocks;
  const int step_begin = int(steps * split / splits);
  const int step_end = int(steps * (split + 1) / splits);

  // The step after the current one, as (query head, first query), advanced step by step
  // (no division in the loop).
  int next_head = head_kv * group_size + (m_blocks > 0 ? step_begin / m_blocks : 0);
  int next_m = m_first + (m_blocks > 0 ? step_begin % m_blocks : 0) * kBlockM;
  float next_lse2 = 0.f, next_delta = 0.f;
  // Issues the cp.async copies of the next step's Q and dO into `stage` (one commit group),
  // loads its lse / delta of row threadIdx.x (threads < kBlockM) into registers.
  auto issue = [&](int stage) {
    const T* q = static_cast<const T*>(p.q) + batch * p.q_strides.batch + next_head * p.q_strides.head;
    const T* grad_out =
        static_cast<const T*>(p.grad_out) + batch * p.grad_out_strides.batch + next_head * p.grad_out_strides.head;
    load_tile_async<T, kBlockM, kHeadDim, kThreads>(smem_q0 + stage * kStageElems, kStride, q, p.q_strides.seq,
                                                    next_m, p.seqlen_q);
    load_tile_async<T, kBlockM, kHeadDim, kThreads>(smem_do0 + stage * kStageElems, kStride, grad_out,
                                                    p.grad_out_strides.seq, next_m, p.seqlen_q);
    cp_async_commit();
    if (threadIdx.x < kBlockM) {
      // As in the classic kernel: lse in the log2 domain, +inf for rows past the end or
      // without any key, so that exp2(s2 - lse2) = 0 there instead of NaN.
      const int64_t row = (int64_t(batch) * p.heads_q + next_head) * p.seqlen_q + next_m + threadIdx.x;
      const bool inside = next_m + int(threadIdx.x) < p.seqlen_q;
      const float row_lse = inside ? p.lse[row] : -INFINITY;
      next_lse2 = row_lse == -INFINITY ? INFINITY : row_lse * kLog2e;
      next_delta = inside ? p.delta[row] : 0.f;
    }
  };

  if (step_begin < step_end) {
    issue(0);
    if (threadIdx.x < kBlockM) {  // the prologue stores directly; barrier A of the first step publishes them
      smem_lse2_0[threadIdx.x] = next_lse2;
      smem_delta0[threadIdx.x] = next_delta;
    }
  }

  for (int step = step_begin; step < step_end; ++step) {
    const int stage = (step - step_begin) & 1;
    const int head = next_head, m_start = next_m;
    next_m += kBlockM;
    if (next_m >= m_end) next_m = m_first, ++next_head;
    cp_async_wait<0>();  // this stage's Q / dO (and, on the first step, K / V) have landed
    __syncthreads();     // barrier A (see above)
    const bool prefetch = step + 1 < step_end;
    if (prefetch) issue(stage ^ 1);

    float* grad_q_accum = p.grad_q_accum + (int64_t(batch) * p.heads_q + head) * p.seqlen_q * kHeadDim;
    backward_query_block<T, kHeadDim>(smem_k, smem_v, smem_q0 + stage * kStageElems, smem_do0 + stage * kStageElems,
                                      smem_ds, smem_lse2_0 + stage * 2 * kBlockM, smem_delta0 + stage * 2 * kBlockM,
                                      m_start, p.seqlen_q, query_first, query_last, scale_log2, softcap, cap_in,
                                      cap_out, inv_cap_log2, grad_q_accum, dk_acc, dv_acc);
    if (prefetch && threadIdx.x < kBlockM) {  // the other stage was last read before barrier A
      smem_lse2_0[(stage ^ 1) * 2 * kBlockM + threadIdx.x] = next_lse2;
      smem_delta0[(stage ^ 1) * 2 * kBlockM + threadIdx.x] = next_delta;
    }
  }

  cp_async_wait<0>();  // K/V copies are still in flight if this block had no step
  if (splits > 1) {
    // fp32 partials straight from the accumulators (C layout: rows group / group + 8 of this
    // warp's 16 keys, columns nt * 8 + 2 quad_lane, + 1): 8-byte stores, every row < seqlen_k.
    const int quad_lane = lane % 4;
    const int64_t rows = int64_t(p.batch) * p.heads_kv * p.seqlen_k;  // rows of one partial
    const int64_t row0 = (int64_t(batch) * p.heads_kv + head_kv) * p.seqlen_k;
    float* dk_part = p.dkv_workspace + (int64_t(split) * rows + row0) * kHeadDim;
    float* dv_part = dk_part + int64_t(splits) * rows * kHeadDim;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = n_start + warp * 16 + group + r * 8;
      if (key < p.seqlen_k) {
#pragma unroll
        for (int nt = 0; nt < kHeadDim / 8; ++nt) {
          const int64_t at = int64_t(key) * kHeadDim + nt * 8 + quad_lane * 2;
          *reinterpret_cast<float2*>(dk_part + at) = make_float2(dk_acc[nt][2 * r], dk_acc[nt][2 * r + 1]);
          *reinterpret_cast<float2*>(dv_part + at) = make_float2(dv_acc[nt][2 * r], dv_acc[nt][2 * r + 1]);
        }
      }
    }
    return;
  }
  // One split: the classic epilogue (dK = scale * dZ^T Q, dV) through shared memory.
  __syncthreads();  // every warp is done with K (the last dQ) before it is overwritten
  T* grad_k = static_cast<T*>(p.grad_k) + batch * p.grad_k_strides.batch + head_kv * p.grad_k_strides.head;
  T* grad_v = static_cast<T*>(p.grad_v) + batch * p.grad_v_strides.batch + head_kv * p.grad_v_strides.head;
  store_acc_to_smem<T, kHeadDim>(smem_k, kStride, warp * 16, dk_acc, p.softmax_scale, p.softmax_scale);
  store_acc_to_smem<T, kHeadDim>(smem_v, kStride, warp * 16, dv_acc, 1.f, 1.f);
  __syncthreads();
  store_tile<T, kBlockN, kHeadDim, kThreads>(grad_k, p.grad_k_strides.seq, smem_k, kStride, n_start, p.seqlen_k);
  store_tile<T, kBlockN, kHeadDim, kThreads>(grad_v, p.grad_v_strides.seq, smem_v, kStride, n_start, p.seqlen_k);
}

// dK = scale * sum_s dK_s, dV = sum_s dV_s over the kv_splits partials, in split order;
// 4 consecutive head_dim elements per thread (head_dim is a multiple of 32).
template <typename T>
__global__ void __launch_bounds__(256)
attention_backward_reduce_dkv_kernel(const BackwardParams p) {
  const int64_t rows = int64_t(p.batch) * p.heads_kv * p.seqlen_k;
  const int64_t quads = rows * p.head_dim / 4;
  const int64_t part = rows * p.head_dim;  // elements of one partial
  const float* dk_parts = p.dkv_workspace;
  const float* dv_parts = p.dkv_workspace + int64_t(p.kv_splits) * part;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < quads; i += int64_t(gridDim.x) * blockDim.x) {
    float4 dk = reinterpret_cast<const float4*>(dk_parts)[i];
    float4 dv = reinterpret_cast<const float4*>(dv_parts)[i];
    for (int s = 1; s < p.kv_splits; ++s) {
      const float4 a = reinterpret_cast<const float4*>(dk_parts + s * part)[i];
      const float4 b = reinterpret_cast<const float4*>(dv_parts + s * part)[i];
      dk.x += a.x, dk.y += a.y, dk.z += a.z, dk.w += a.w;
      dv.x += b.x, dv.y += b.y, dv.z += b.z, dv.w += b.w;
    }
    const int64_t element = i * 4;
    const int64_t row = element / p.head_dim;
    const int col = int(element % p.head_dim);
    const int64_t batch = row / (int64_t(p.heads_kv) * p.seqlen_k);
    const int64_t head = (row / p.seqlen_k) % p.heads_kv;
    const int64_t key = row % p.seqlen_k;
    T* grad_k = static_cast<T*>(p.grad_k) + batch * p.grad_k_strides.batch + head * p.grad_k_strides.head +
                key * p.grad_k_strides.seq + col;
    T* grad_v = static_cast<T*>(p.grad_v) + batch * p.grad_v_strides.batch + head * p.grad_v_strides.head +
                key * p.grad_v_strides.seq + col;
    const float scale = p.softmax_scale;
    const uint2 k_out = make_uint2(pack2<T>(dk.x * scale, dk.y * scale), pack2<T>(dk.z * scale, dk.w * scale));
    const uint2 v_out = make_uint2(pack2<T>(dv.x, dv.y), pack2<T>(dv.z, dv.w));
    *reinterpret_cast<uint2*>(grad_k) = k_out;  // 8-byte aligned: rows are 16-byte aligned, col % 4 == 0
    *reinterpret_cast<uint2*>(grad_v) = v_out;
  }
}

// ----------------------------------------------------------------------------- 3. dQ

template <typename T>
__global__ void __launch_bounds__(256)
attention_backward_convert_dq_kernel(const float* grad_q_accum, T* grad_q, int64_t numel, float scale) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    grad_q[i] = from_float<T>(grad_q_accum[i] * scale);
  }
}

// ----------------------------------------------------------------------------- launchers

// Above 48 KB of dynamic shared memory a kernel must opt in.
void allow_smem(const void* kernel, int bytes) {
  if (bytes <= 48 * 1024) return;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("attention_backward: cannot raise the shared-memory limit to ") +
                             std::to_string(bytes) + " bytes: " + cudaGetErrorString(err));
  }
}

template <typename T, int kHeadDim>
void launch_backward(const BackwardParams& p, cudaStream_t stream) {
  const int64_t rows = int64_t(p.batch) * p.heads_q * p.seqlen_q;
  attention_backward_delta_kernel<T><<<unsigned((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(p);
  check_launch("attention_backward (delta)");

  if (p.seqlen_k > 0 && p.variant == kBackwardPipelined) {
    constexpr int kSmemBytes = pipelined_smem_bytes<kHeadDim, T>();
    auto kernel = attention_backward_pipelined_kernel<T, kHeadDim>;
    allow_smem(reinterpret_cast<const void*>(kernel), kSmemBytes);
    const dim3 grid((p.seqlen_k + kBlockN - 1) / kBlockN, p.heads_kv * p.kv_splits, p.batch);
    kernel<<<grid, kThreads, kSmemBytes, stream>>>(p);
    check_launch("attention_backward (pipelined dk, dv, dq)");
    if (p.kv_splits > 1) {
      const int64_t quads = int64_t(p.batch) * p.heads_kv * p.seqlen_k * p.head_dim / 4;
      const int64_t blocks = (quads + 255) / 256;
      attention_backward_reduce_dkv_kernel<T><<<unsigned(blocks < 65536 ? blocks : 65536), 256, 0, stream>>>(p);
      check_launch("attention_backward (reduce dk, dv partials)");
    }
  } else if (p.seqlen_k > 0) {
    constexpr int kSmemBytes = backward_smem_bytes<kHeadDim, T>();
    auto kernel = attention_backward_kernel<T, kHeadDim>;
    allow_smem(reinterpret_cast<const void*>(kernel), kSmemBytes);
    const dim3 grid((p.seqlen_k + kBlockN - 1) / kBlockN, p.heads_kv, p.batch);
    kernel<<<grid, kThreads, kSmemBytes, stream>>>(p);
    check_launch("attention_backward (dk, dv, dq)");
  }

  const int64_t numel = rows * p.head_dim;
  const int64_t blocks = (numel + 255) / 256;
  const unsigned grid = unsigned(blocks < 65536 ? blocks : 65536);  // grid-stride beyond that
  attention_backward_convert_dq_kernel<T>
      <<<grid, 256, 0, stream>>>(p.grad_q_accum, static_cast<T*>(p.grad_q), numel, p.softmax_scale);
  check_launch("attention_backward (convert dq)");
}

template <typename T>
void dispatch_head_dim(const BackwardParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: return launch_backward<T, 32>(p, stream);
    case 64: return launch_backward<T, 64>(p, stream);
    case 128: return launch_backward<T, 128>(p, stream);
    default: throw std::runtime_error("attention_backward: head_dim " + std::to_string(p.head_dim) +
                                      " is not supported (32, 64 or 128)");
  }
}

}  // namespace

void run_backward(const BackwardParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads_q == 0 || p.seqlen_q == 0) {
    // No query: dQ is empty, and dK / dV are zero (the caller allocates them zeroed).
    return;
  }
  if (p.variant != kBackwardClassic && p.variant != kBackwardPipelined) {
    throw std::runtime_error("attention_backward: variant " + std::to_string(p.variant) +
                             " is not 0 (classic) or 1 (pipelined)");
  }
  if (p.kv_splits < 1 || (p.kv_splits > 1 && (p.variant != kBackwardPipelined || p.dkv_workspace == nullptr)) ||
      int64_t(p.heads_kv) * p.kv_splits > 65535) {
    throw std::runtime_error("attention_backward: kv_splits " + std::to_string(p.kv_splits) +
                             " needs the pipelined variant, a workspace and heads_kv * kv_splits <= 65535");
  }
  switch (p.dtype) {
    case kFloat16: return dispatch_head_dim<__half>(p, stream);
    case kBFloat16: return dispatch_head_dim<__nv_bfloat16>(p, stream);
    default: throw std::runtime_error("attention_backward: dtype code " + std::to_string(p.dtype) +
                                      " is not supported (float16 or bfloat16)");
  }
}

}  // namespace attention
}  // namespace fastft
