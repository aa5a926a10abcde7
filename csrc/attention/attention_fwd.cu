// FlashAttention-2 forward pass (Dao 2023, Algorithm 1) on sm_80+ tensor cores.
//
// One thread block computes kBlockM = 64 query rows of one (batch, head): each of its 4
// warps owns 16 rows, so the softmax statistics of a row never leave the 4 lanes (a
// "quad") that hold it. The block walks the key/value sequence kBlockN = 64 keys at a
// time: S = Q K^T (tensor cores, fp32 accumulators), an online softmax update in
// registers, then O += P V with P converted to 16 bits straight from the accumulator
// registers. Q stays in registers for the whole loop; K and V tiles go through shared
// memory with cp.async, V_j loading while S_j is computed and K_{j+1} loading while the
// softmax and P V_j run. Only the key blocks inside the block's window (window.h: causal,
// either alignment, sliding windows) are visited; soft-capping (softcap * tanh(s /
// softcap)) is applied to the scores in registers.
#include "attention/attention.h"
#include "attention/mma_utils.cuh"
#include "common.h"

#include <cmath>
#include <stdexcept>
#include <string>

namespace fastft {
namespace attention {
namespace {

constexpr int kBlockM = 64;   // query rows per thread block (16 per warp)
constexpr int kBlockN = 64;   // keys per inner-loop step
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;  // log2(e)
constexpr float kLn2 = 0.6931471805599453f;    // ln(2)

static_assert(kBlockM == kWarps * 16, "each warp owns 16 query rows");
static_assert(kThreads >= kBlockN, "one thread per key stages the padding mask of a key block");

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, 2)
attention_forward_kernel(const ForwardParams p) {
  // Shared-memory rows are padded by 8 elements (16 bytes): consecutive rows then start
  // 4 banks apart, so the 8 row addresses of an ldmatrix hit distinct banks.
  constexpr int kStride = kHeadDim + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem_k = reinterpret_cast<T*>(smem_raw);   // (kBlockN, kStride)
  T* smem_v = smem_k + kBlockN * kStride;       // (kBlockN, kStride); holds Q at the start
  // The key block's padding-mask bytes, read from global memory once per block (by
  // kBlockN threads) instead of once per score by every thread that masks.
  uint8_t* smem_key_mask = reinterpret_cast<uint8_t*>(smem_v + kBlockN * kStride);  // (kBlockN,)

  // Causal blocks further down the sequence have more keys to visit: start those first
  // so that the short ones fill the tail of the grid.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int head_kv = head / (p.heads_q / p.heads_kv);  // grouped-query attention
  const int m_start = m_block * kBlockM;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane / 4, quad_lane = lane % 4;

  const T* q = static_cast<const T*>(p.q) + batch * p.q_strides.batch + head * p.q_strides.head;
  const T* k = static_cast<const T*>(p.k) + batch * p.k_strides.batch + head_kv * p.k_strides.head;
  const T* v = static_cast<const T*>(p.v) + batch * p.v_strides.batch + head_kv * p.v_strides.head;
  T* out = static_cast<T*>(p.out) + batch * p.out_strides.batch + head * p.out_strides.head;
  const uint8_t* key_mask =
      p.key_padding_mask == nullptr ? nullptr : p.key_padding_mask + batch * p.mask_batch_stride;

  // The keys this block's rows can see (causal, alignment, sliding window): the key
  // blocks outside [n_begin, n_end) are fully masked and skipped entirely.
  const Window window = window_of(p);
  const int n_begin = key_begin(window, m_start, kBlockN, p.seqlen_k);
  const int n_end = key_end(window, m_start, kBlockM, p.seqlen_q, p.seqlen_k);
  const int n_blocks = n_end > n_begin ? (n_end - n_begin + kBlockN - 1) / kBlockN : 0;
  // The keys [first, last] each of this thread's two rows may see (window and sequence end).
  int key_first[2], key_last[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    keys_of_query(window, m_start + warp * 16 + group + r * 8, p.seqlen_k, key_first[r], key_last[r]);
  }

  // Prologue: Q into the V buffer and the first K block into the K buffer, in one cp.async group.
  load_tile_async<T, kBlockM, kHeadDim, kThreads>(smem_v, kStride, q, p.q_strides.seq, m_start, p.seqlen_q);
  load_tile_async<T, kBlockN, kHeadDim, kThreads>(smem_k, kStride, k, p.k_strides.seq, n_begin, p.seqlen_k);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t q_frag[kHeadDim / 16][4];  // this warp's 16 x kHeadDim slice of Q, A layout
#pragma unroll
  for (int ks = 0; ks < kHeadDim / 16; ++ks) load_a(q_frag[ks], smem_v, kStride, warp * 16, ks * 16);
  __syncthreads();  // the V buffer is overwritten next

  // Online softmax state (Milakov & Gimelshein 2018; FlashAttention-2 section 3.1) for
  // the two rows this thread holds: row `group` (index 0) and row `group + 8` (index 1).
  // Scores are kept in the log2 domain: s2 = s * softmax_scale * log2(e), so that
  // exp(scale * (s - m)) = exp2(s2 - m2) and each exponential is one ex2 instruction.
  // row_max is the running max of s2 (quad-wide); row_sum is this thread's partial sum of
  // exp2(s2 - row_max) over its own columns (summed over the quad once, at the end).
  float acc[kHeadDim / 8][4];
#pragma unroll
  for (int nt = 0; nt < kHeadDim / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};
  const float scale_log2 = p.softmax_scale * kLog2e;
  // Soft-capping keeps the scores in raw units: s -> (c / scale) tanh(s * scale / c), so the
  // scaled score is c tanh(scale s / c) and everything after it is unchanged.
  const bool softcap = p.softcap > 0.f;
  const float cap_in = p.softmax_scale / p.softcap, cap_out = p.softcap / p.softmax_scale;

  for (int nb = 0; nb < n_blocks; ++nb) {
    const int n_start = n_begin + nb * kBlockN;
    // V_nb streams in while S = Q K_nb^T is computed.
    load_tile_async<T, kBlockN, kHeadDim, kThreads>(smem_v, kStride, v, p.v_strides.seq, n_start, p.seqlen_k);
    cp_async_commit();
    if (key_mask != nullptr && threadIdx.x < kBlockN) {  // published by the barrier below
      const int key = n_start + threadIdx.x;
      smem_key_mask[threadIdx.x] = key < p.seqlen_k ? key_mask[key] : 0;
    }
    cp_async_wait<1>();  // K_nb (committed one iteration earlier) has landed
    __syncthreads();

    float s[kBlockN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
#pragma unroll
      for (int np = 0; np < kBlockN / 16; ++np) {
        uint32_t b[4];
        load_b(b, smem_k, kStride, np * 16, ks * 16);
        mma_16x8x16<T>(s[2 * np], q_frag[ks], b[0], b[1]);
        mma_16x8x16<T>(s[2 * np + 1], q_frag[ks], b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done reading K_nb: prefetch K_{nb+1} over it
    if (nb + 1 < n_blocks) {
      load_tile_async<T, kBlockN, kHeadDim, kThreads>(smem_k, kStride, k, p.k_strides.seq, n_start + kBlockN,
                                                      p.seqlen_k);
    }
    cp_async_commit();  // an empty group on the last step keeps the wait counts uniform

    if (softcap) {  // uniform branch: the common path pays one test per key block
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = cap_out * tanh_approx(s[nt][e] * cap_in);
    }

    // Masks: keys past the end (their K rows were zero-filled, so their scores are 0,
    // not -inf), keys outside the window (causal, sliding), padded keys. Blocks that need
    // none of these skip the per-element test.
    const bool need_mask = n_start + kBlockN > p.seqlen_k || key_mask != nullptr ||
                           tile_crosses_window(window, m_start, kBlockM, n_start, kBlockN);
    if (need_mask) {
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key_in_block = nt * 8 + quad_lane * 2 + (e & 1);
          const int key = n_start + key_in_block;
          const int r = e / 2;
          const bool allowed = key >= key_first[r] && key <= key_last[r] &&
                               (key_mask == nullptr || smem_key_mask[key_in_block] != 0);
          s[nt][e] = allowed ? s[nt][e] * scale_log2 : -INFINITY;
        }
      }
    } else {
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] *= scale_log2;
    }

    // Online softmax update: new max, rescale the old sum and output by
    // alpha = exp2(old_max - new_max), add this block's exp2(s2 - new_max).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float block_max = row_max[r];
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) block_max = fmaxf(block_max, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      block_max = quad_max(block_max);
      // A row with no allowed key so far has max -inf; subtracting 0 instead keeps
      // exp2(-inf - m) = 0 rather than exp2(-inf + inf) = NaN.
      const float max_used = block_max == -INFINITY ? 0.f : block_max;
      const float alpha = exp2f(row_max[r] - max_used);  // 0 when the old max was -inf
      row_max[r] = block_max;
      float block_sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
        s[nt][2 * r] = exp2f(s[nt][2 * r] - max_used);
        s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - max_used);
        block_sum += s[nt][2 * r] + s[nt][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * alpha + block_sum;
#pragma unroll
      for (int nt = 0; nt < kHeadDim / 8; ++nt) {
        acc[nt][2 * r] *= alpha;
        acc[nt][2 * r + 1] *= alpha;
      }
    }

    cp_async_wait<1>();  // V_nb has landed (K_{nb+1} may still be in flight)
    __syncthreads();
    // O += P V: the probabilities of key tiles 2ks and 2ks+1 form the A fragment of
    // k-step ks (see mma_utils.cuh), rounded to 16 bits as the tensor cores require.
#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks) {
      const uint32_t a[4] = {pack2<T>(s[2 * ks][0], s[2 * ks][1]), pack2<T>(s[2 * ks][2], s[2 * ks][3]),
                             pack2<T>(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                             pack2<T>(s[2 * ks + 1][2], s[2 * ks + 1][3])};
#pragma unroll
      for (int np = 0; np < kHeadDim / 16; ++np) {
        uint32_t b[4];
        load_b_trans(b, smem_v, kStride, ks * 16, np * 16);
        mma_16x8x16<T>(acc[2 * np], a, b[0], b[1]);
        mma_16x8x16<T>(acc[2 * np + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done reading V_nb before the next V load
  }
  cp_async_wait<0>();  // nothing is in flight now, but make the buffer reuse below obvious

  // Epilogue: O = acc / l and lse = ln(sum_j exp(scale * s_j)) = (m2 + log2(l)) * ln(2).
  // A row with no allowed key (l = 0) gets O = 0 and lse = -inf.
  float inv_sum[2], lse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = quad_sum(row_sum[r]);
    inv_sum[r] = total > 0.f ? 1.f / total : 0.f;
    lse[r] = total > 0.f ? (row_max[r] + log2f(total)) * kLn2 : -INFINITY;
  }
  __syncthreads();
  store_acc_to_smem<T, kHeadDim>(smem_k, kStride, warp * 16, acc, inv_sum[0], inv_sum[1]);
  __syncthreads();
  store_tile<T, kBlockM, kHeadDim, kThreads>(out, p.out_strides.seq, smem_k, kStride, m_start, p.seqlen_q);
  if (quad_lane == 0) {
    float* lse_row = p.lse + (int64_t(batch) * p.heads_q + head) * p.seqlen_q;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int query = m_start + warp * 16 + group + r * 8;
      if (query < p.seqlen_q) lse_row[query] = lse[r];
    }
  }
}

template <typename T, int kHeadDim>
void launch_forward(const ForwardParams& p, cudaStream_t stream) {
  constexpr int kSmemBytes = 2 * kBlockN * (kHeadDim + 8) * int(sizeof(T)) + kBlockN;  // K, V tiles, mask bytes
  static_assert(kSmemBytes <= 48 * 1024, "forward tiles fit the default shared-memory limit");
  const dim3 grid((p.seqlen_q + kBlockM - 1) / kBlockM, p.heads_q, p.batch);
  attention_forward_kernel<T, kHeadDim><<<grid, kThreads, kSmemBytes, stream>>>(p);
  check_launch("attention_forward");
}

template <typename T>
void dispatch_head_dim(const ForwardParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: return launch_forward<T, 32>(p, stream);
    case 64: return launch_forward<T, 64>(p, stream);
    case 128: return launch_forward<T, 128>(p, stream);
    default: throw std::runtime_error("attention_forward: head_dim " + std::to_string(p.head_dim) +
                                      " is not supported (32, 64 or 128)");
  }
}

}  // namespace

void run_forward(const ForwardParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads_q == 0 || p.seqlen_q == 0) return;  // nothing to compute
  switch (p.dtype) {
    case kFloat16: return dispatch_head_dim<__half>(p, stream);
    case kBFloat16: return dispatch_head_dim<__nv_bfloat16>(p, stream);
    default: throw std::runtime_error("attention_forward: dtype code " + std::to_string(p.dtype) +
                                      " is not supported (float16 or bfloat16)");
  }
}

}  // namespace attention
}  // namespace fastft
