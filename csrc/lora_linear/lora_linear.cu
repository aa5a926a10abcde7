// lora_fused_linear: the part of a LoRA linear layer that cuBLAS cannot do.
//
//   out[z] = [out +] X @ W' [+ bias] + scale * mask∘(L @ R')      (contract in lora_linear.h)
//
// It serves four uses (fastft/ops/lora_linear_cuda.py picks the arguments):
//   forward, int8 W     X = x,   W' = Wᵀ int8 (scales along N), L = xa, R' = Bᵀ, + bias
//   backward dx, int8 W X = dy,  W' = W  int8 (scales along K), L = dy B, R' = A, mask_lora
//   dropout xa          X = x (mask_x), W' = Aᵀ, no rank-r term
//   dropout dA          X = (dy B)ᵀ, W' = x (mask_w), split over tokens into fp32 partials
// while the large 16-bit GEMMs stay on cuBLAS (through torch). cuBLAS has no int8-weight x
// 16-bit-activation GEMM, and the dropout variants would otherwise materialise
// dropout(x), a full copy of the activations.
//
// Design (version 1, simple on purpose): a 64 x 64 output tile per 128-thread block, four
// warps each owning 32 x 32 as 2 x 2 WMMA 16x16x16 tensor-core fragments with fp32
// accumulators (nvcuda::wmma, CUDA C++ Programming Guide, "Warp Matrix Functions").
// Tiles of X and W' are staged through shared memory 32-deep in K; int8 weights are
// dequantised in fp32 while being staged and rounded once to the 16-bit type (exact for
// the integer, one rounding for q * scale, as QLoRA's dequantise-then-matmul). The rank-r
// product runs as a second K loop into its own accumulators, so the mask can be applied
// to it alone before it joins the base accumulators in the epilogue. Loads are scalar
// with arbitrary strides, ordered so consecutive threads read consecutive addresses along
// whichever of the two tile dimensions is contiguous in memory.
#include <mma.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.h"
#include "lora_linear/lora_linear.h"

namespace fastft {
namespace {

using namespace nvcuda;

constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
constexpr int kBlockK = 32;
constexpr int kThreads = 128;  // 4 warps in a 2 x 2 grid of 32 x 32 warp tiles
constexpr int kWarpTile = 32;
constexpr int kFrag = 16;      // WMMA m16n16k16
// Shared-memory row padding: keeps WMMA's ldm a multiple of 8 (16-bit) / 4 (fp32)
// elements and every fragment pointer 32-byte aligned, and breaks bank conflicts.
constexpr int kPadAB = 8;
constexpr int kPadC = 4;

// lowbias32 (Chris Wellons, https://nullprogram.com/blog/2018/07/31/): the same bits as
// fastft.ops.lora_linear.mix32 and the Triton kernel, so every backend drops the same
// elements for a seed.
__device__ __forceinline__ std::uint32_t mix32(std::uint32_t h) {
  h ^= h >> 16;
  h *= 0x7feb352du;
  h ^= h >> 15;
  h *= 0x846ca68bu;
  h ^= h >> 16;
  return h;
}

__device__ __forceinline__ bool dropout_keep(std::int64_t token, std::int64_t feature,
                                             std::uint32_t seed_key, std::uint32_t threshold) {
  const std::uint32_t row_hash = mix32(static_cast<std::uint32_t>(token) ^ seed_key);
  return (mix32(row_hash ^ static_cast<std::uint32_t>(feature)) >> 8) >= threshold;
}

struct Params {
  const void* x;
  const void* w;
  const float* w_scale;
  const void* bias;
  const void* lora_l;
  const void* lora_r;
  void* out;
  std::int64_t rows, cols, reduce, rank, k_per_split;
  std::int64_t stride_xm, stride_xk, stride_wk, stride_wn;
  std::int64_t stride_lm, stride_lr, stride_rr, stride_rn;
  std::int64_t stride_om, stride_on, stride_os;
  float scale;
  std::uint32_t seed_key, threshold;
  bool scale_along_n, mask_x, mask_w, mask_lora, accumulate;
};

template <typename T>
struct SharedTiles {
  T a[kBlockM][kBlockK + kPadAB];   // (BM, BK) tile of X or L
  T b[kBlockK][kBlockN + kPadAB];   // (BK, BN) tile of W' or R'
  float c[kBlockM][kBlockN + kPadC];  // epilogue staging of the fp32 accumulators
};

__device__ __forceinline__ float load_as_float(const __half* p, std::int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load_as_float(const __nv_bfloat16* p, std::int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float load_as_float(const std::int8_t* p, std::int64_t i) { return static_cast<float>(p[i]); }

// Stage the (BM, BK) tile of a row operand (X or L) at (row0, k0); elements outside
// [0, rows) x [k0, k_end) are zero. mask: X's dropout at (token = row, feature = k).
template <typename T, typename Src>
__device__ __forceinline__ void stage_a(T (*dst)[kBlockK + kPadAB], const Src* src, std::int64_t stride_m,
                                        std::int64_t stride_k, std::int64_t row0, std::int64_t rows,
                                        std::int64_t k0, std::int64_t k_end, bool mask, const Params& p) {
  const bool k_fastest = stride_k == 1;
  for (int e = threadIdx.x; e < kBlockM * kBlockK; e += kThreads) {
    const int r = k_fastest ? e / kBlockK : e % kBlockM;
    const int c = k_fastest ? e % kBlockK : e / kBlockM;
    const std::int64_t m = row0 + r, k = k0 + c;
    float v = 0.0f;
    if (m < rows && k < k_end) {
      v = load_as_float(src, m * stride_m + k * stride_k);
      if (mask && !dropout_keep(m, k, p.seed_key, p.threshold)) v = 0.0f;
    }
    dst[r][c] = from_float<T>(v);
  }
}

// Stage the (BK, BN) tile of a column operand (W' or R') at (k0, col0). int8 sources are
// dequantised with the fp32 scale of their output channel (column n, or row k when the
// scale runs along the reduction). mask: x's dropout at (token = k, feature = n).
template <typename T, typename Src>
__device__ __forceinline__ void stage_b(T (*dst)[kBlockN + kPadAB], const Src* src, std::int64_t stride_k,
                                        std::int64_t stride_n, std::int64_t k0, std::int64_t k_end,
                                        std::int64_t col0, std::int64_t cols, const float* scales,
                                        bool scale_along_n, bool mask, const Params& p) {
  const bool n_fastest = stride_n == 1;
  for (int e = threadIdx.x; e < kBlockK * kBlockN; e += kThreads) {
    const int r = n_fastest ? e / kBlockN : e % kBlockK;
    const int c = n_fastest ? e % kBlockN : e / kBlockK;
    const std::int64_t k = k0 + r, n = col0 + c;
    float v = 0.0f;
    if (k < k_end && n < cols) {
      v = load_as_float(src, k * stride_k + n * stride_n);
      if (scales != nullptr) v *= scales[scale_along_n ? n : k];
      if (mask && !dropout_keep(k, n, p.seed_key, p.threshold)) v = 0.0f;
    }
    dst[r][c] = from_float<T>(v);
  }
}

template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major>;
template <typename T>
using FragB = wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::row_major>;
using FragC = wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float>;

// acc += tiles.a[warp rows] @ tiles.b[warp cols] over the BK staged columns.
template <typename T>
__device__ __forceinline__ void mma_tile(const SharedTiles<T>& tiles, FragC (&acc)[2][2], int warp_m, int warp_n) {
#pragma unroll
  for (int kk = 0; kk < kBlockK; kk += kFrag) {
    FragA<T> a[2];
    FragB<T> b[2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
      wmma::load_matrix_sync(a[i], &tiles.a[warp_m * kWarpTile + i * kFrag][kk], kBlockK + kPadAB);
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::load_matrix_sync(b[j], &tiles.b[kk][warp_n * kWarpTile + j * kFrag], kBlockN + kPadAB);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
  }
}

__device__ __forceinline__ void store_acc(float (*c)[kBlockN + kPadC], FragC (&acc)[2][2], int warp_m, int warp_n) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&c[warp_m * kWarpTile + i * kFrag][warp_n * kWarpTile + j * kFrag], acc[i][j],
                              kBlockN + kPadC, wmma::mem_row_major);
}

// T: the 16-bit activation type; WT: the base weight's element type (T or int8_t);
// OutT: T, or float for split-K partials.
template <typename T, typename WT, typename OutT>
__global__ void __launch_bounds__(kThreads) lora_fused_linear_kernel(const Params p) {
  __shared__ __align__(128) SharedTiles<T> tiles;
  const int warp = threadIdx.x / 32;
  const int warp_m = warp / 2, warp_n = warp % 2;
  const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.y) * kBlockM;
  const std::int64_t col0 = static_cast<std::int64_t>(blockIdx.x) * kBlockN;
  const std::int64_t split = blockIdx.z;

  FragC acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  // Base GEMM over this split's slice of K: X @ W' (int8 dequantised while staged).
  const std::int64_t k_begin = split * p.k_per_split;
  const std::int64_t k_end = k_begin + p.k_per_split < p.reduce ? k_begin + p.k_per_split : p.reduce;
  const T* x = static_cast<const T*>(p.x);
  const WT* w = static_cast<const WT*>(p.w);
  for (std::int64_t k0 = k_begin; k0 < k_end; k0 += kBlockK) {
    stage_a<T>(tiles.a, x, p.stride_xm, p.stride_xk, row0, p.rows, k0, k_end, p.mask_x, p);
    stage_b<T>(tiles.b, w, p.stride_wk, p.stride_wn, k0, k_end, col0, p.cols, p.w_scale, p.scale_along_n,
               p.mask_w, p);
    __syncthreads();
    mma_tile(tiles, acc, warp_m, warp_n);
    __syncthreads();
  }

  // Rank-r term L @ R' into separate accumulators, so that scale and mask touch it alone.
  if (p.rank > 0) {
    FragC lora[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(lora[i][j], 0.0f);
    const T* lora_l = static_cast<const T*>(p.lora_l);
    const T* lora_r = static_cast<const T*>(p.lora_r);
    for (std::int64_t j0 = 0; j0 < p.rank; j0 += kBlockK) {
      stage_a<T>(tiles.a, lora_l, p.stride_lm, p.stride_lr, row0, p.rows, j0, p.rank, false, p);
      stage_b<T>(tiles.b, lora_r, p.stride_rr, p.stride_rn, j0, p.rank, col0, p.cols,
                 static_cast<const float*>(nullptr), false, false, p);
      __syncthreads();
      mma_tile(tiles, lora, warp_m, warp_n);
      __syncthreads();
    }
    // WMMA's element-to-thread mapping is opaque, so the (row, col)-dependent mask goes
    // through shared memory; the sum with the base accumulators then happens fragment
    // element by fragment element (same fragment type => same mapping).
    store_acc(tiles.c, lora, warp_m, warp_n);
    __syncthreads();
    for (int e = threadIdx.x; e < kBlockM * kBlockN; e += kThreads) {
      const int r = e / kBlockN, c = e % kBlockN;
      float v = tiles.c[r][c] * p.scale;
      if (p.mask_lora && !dropout_keep(row0 + r, col0 + c, p.seed_key, p.threshold)) v = 0.0f;
      tiles.c[r][c] = v;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(lora[i][j], &tiles.c[warp_m * kWarpTile + i * kFrag][warp_n * kWarpTile + j * kFrag],
                               kBlockN + kPadC, wmma::mem_row_major);
#pragma unroll
        for (int t = 0; t < acc[i][j].num_elements; ++t) acc[i][j].x[t] += lora[i][j].x[t];
      }
    __syncthreads();
  }

  // Epilogue: bias, accumulate into the existing output, one rounding to OutT.
  store_acc(tiles.c, acc, warp_m, warp_n);
  __syncthreads();
  OutT* out = static_cast<OutT*>(p.out) + split * p.stride_os;
  const T* bias = static_cast<const T*>(p.bias);
  for (int e = threadIdx.x; e < kBlockM * kBlockN; e += kThreads) {
    const int r = e / kBlockN, c = e % kBlockN;  // consecutive threads: consecutive columns
    const std::int64_t m = row0 + r, n = col0 + c;
    if (m >= p.rows || n >= p.cols) continue;
    float v = tiles.c[r][c];
    if (bias != nullptr) v += to_float(bias[n]);
    const std::int64_t offset = m * p.stride_om + n * p.stride_on;
    if (p.accumulate) v += to_float(out[offset]);
    out[offset] = from_float<OutT>(v);
  }
}

template <typename T, typename WT, typename OutT>
void launch(const Params& p, std::int64_t splits, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.cols + kBlockN - 1) / kBlockN),
                  static_cast<unsigned>((p.rows + kBlockM - 1) / kBlockM), static_cast<unsigned>(splits));
  lora_fused_linear_kernel<T, WT, OutT><<<grid, kThreads, 0, stream>>>(p);
  check_launch("lora_fused_linear");
}

template <typename T>
void dispatch_weight_and_out(const Params& p, bool weight_int8, bool out_fp32, std::int64_t splits,
                             cudaStream_t stream) {
  if (weight_int8) {
    out_fp32 ? launch<T, std::int8_t, float>(p, splits, stream) : launch<T, std::int8_t, T>(p, splits, stream);
  } else {
    out_fp32 ? launch<T, T, float>(p, splits, stream) : launch<T, T, T>(p, splits, stream);
  }
}

}  // namespace

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
    std::int64_t stream) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("lora_fused_linear: " + what); };
  if (dtype != kFloat16 && dtype != kBFloat16) fail("dtype must be fp16 or bf16 (code 1 or 2)");
  if (out == 0) fail("out is null");
  if (rows < 0 || cols < 0 || reduce < 0 || rank < 0) fail("negative size");
  if (reduce > 0 && (x == 0 || w == 0)) fail("x and w are required when reduce > 0");
  if (weight_int8 && w_scale == 0) fail("int8 weights need w_scale");
  if (rank > 0 && (lora_l == 0 || lora_r == 0)) fail("lora_l and lora_r are required when rank > 0");
  if (k_per_split <= 0) k_per_split = reduce > 0 ? reduce : 1;
  const std::int64_t splits = reduce > 0 ? (reduce + k_per_split - 1) / k_per_split : 1;
  if (splits > 1 && (!out_fp32 || rank > 0 || bias != 0 || accumulate))
    fail("split-K writes plain fp32 partials: no rank-r term, bias or accumulate");
  if (rows >= (std::int64_t(65535) * kBlockM) || splits > 65535) fail("too many rows or splits for the grid");
  if (seed_key < 0 || seed_key > 0xffffffffLL || threshold < 0 || threshold > (1LL << 24))
    fail("seed_key must be a uint32 and threshold in [0, 2^24]");
  if (rows == 0 || cols == 0) return;

  Params p{};
  p.x = reinterpret_cast<const void*>(x);
  p.w = reinterpret_cast<const void*>(w);
  p.w_scale = reinterpret_cast<const float*>(w_scale);
  p.bias = reinterpret_cast<const void*>(bias);
  p.lora_l = reinterpret_cast<const void*>(lora_l);
  p.lora_r = reinterpret_cast<const void*>(lora_r);
  p.out = reinterpret_cast<void*>(out);
  p.rows = rows; p.cols = cols; p.reduce = reduce; p.rank = rank; p.k_per_split = k_per_split;
  p.stride_xm = stride_xm; p.stride_xk = stride_xk; p.stride_wk = stride_wk; p.stride_wn = stride_wn;
  p.stride_lm = stride_lm; p.stride_lr = stride_lr; p.stride_rr = stride_rr; p.stride_rn = stride_rn;
  p.stride_om = stride_om; p.stride_on = stride_on; p.stride_os = stride_os;
  p.scale = static_cast<float>(scale);
  p.seed_key = static_cast<std::uint32_t>(seed_key);
  p.threshold = static_cast<std::uint32_t>(threshold);
  p.scale_along_n = scale_along_n; p.mask_x = mask_x; p.mask_w = mask_w; p.mask_lora = mask_lora;
  p.accumulate = accumulate;

  cudaStream_t cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == kFloat16) {
    dispatch_weight_and_out<__half>(p, weight_int8, out_fp32, splits, cuda_stream);
  } else {
    dispatch_weight_and_out<__nv_bfloat16>(p, weight_int8, out_fp32, splits, cuda_stream);
  }
}

}  // namespace fastft
