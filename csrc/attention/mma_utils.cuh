// Warp-level tensor-core building blocks for the attention kernels (sm_80+):
// mma.sync m16n8k16 with fp32 accumulation, ldmatrix fragment loads from shared memory,
// and cp.async global->shared copies. Fragment layouts are those of the PTX ISA manual,
// section "Matrix Fragments for mma.m16n8k16 with floating point type"; with
//   group = lane / 4  (0..7)   and   quad_lane = lane % 4  (0..3)
// a thread holds
//   A (16x16, row-major):  a0 = A[group   ][2q, 2q+1]   a1 = A[group+8][2q, 2q+1]
//                          a2 = A[group   ][2q+8, +9]   a3 = A[group+8][2q+8, +9]
//   B (16x8,  K x N):      b0 = B[2q, 2q+1][group]      b1 = B[2q+8, 2q+9][group]
//   C (16x8,  fp32):       c0, c1 = C[group][2q, 2q+1]  c2, c3 = C[group+8][2q, 2q+1]
// (q = quad_lane; pairs are packed low index in the low 16 bits). The C layout of two
// adjacent 8-column tiles is exactly the A layout of one 16-wide k-step, which is how a
// softmax probability tile computed in registers feeds the next product without a trip
// through shared memory (FlashAttention-2, Dao 2023, section 3.3).
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>

namespace fastft {
namespace attention {

// ----------------------------------------------------------------------------- mma

template <typename T> struct MmaOp;

template <> struct MmaOp<__half> {
  // c += a @ b for one 16x8 tile, fp16 inputs, fp32 accumulators.
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <> struct MmaOp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  MmaOp<T>::run(c, a, b0, b1);
}

// Two fp32 values -> one register holding two 16-bit values (lo in the low half).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);  // .x = lo (low 16 bits), .y = hi
  return *reinterpret_cast<uint32_t*>(&h);
}

template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// ----------------------------------------------------------------------------- ldmatrix

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// ldmatrix.x4: lanes 8i..8i+7 give the row addresses of 8x8 matrix i; register i of
// every lane receives matrix i with the C-fragment-like layout (row = group,
// columns 2q, 2q+1). With .trans the lane receives column `group`, rows 2q, 2q+1.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_ptr)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_ptr)));
}

// In the four loaders below `tile` is a row-major shared-memory array of 16-bit values
// with `stride` elements per row; (row0, col0) index that storage.

// A fragment of the 16x16 block A[m0.., k0..] where A is stored as [m][k].
// Matrices: 0 = rows 0-7 / cols 0-7, 1 = rows 8-15 / cols 0-7, 2 = rows 0-7 / cols 8-15,
// 3 = rows 8-15 / cols 8-15, which is the order a0..a3.
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int stride, int m0, int k0) {
  const int lane = threadIdx.x % 32;
  const int matrix = lane / 8, row = lane % 8;
  ldmatrix_x4(a, tile + (m0 + (matrix % 2) * 8 + row) * stride + k0 + (matrix / 2) * 8);
}

// A fragment of the 16x16 block A[m0.., k0..] where A is stored transposed, as [k][m]:
// matrix i = (rows 8*(i%2).., cols 8*(i/2)..) of A = storage rows k0 + 8*(i/2), cols m0 + 8*(i%2).
template <typename T>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], const T* tile, int stride, int k0, int m0) {
  const int lane = threadIdx.x % 32;
  const int matrix = lane / 8, row = lane % 8;
  ldmatrix_x4_trans(a, tile + (k0 + (matrix / 2) * 8 + row) * stride + m0 + (matrix % 2) * 8);
}

// B fragments for two adjacent 8-column tiles (n0.., n0+8..) of a 16-deep k-step, where
// B (K x N) is stored as [n][k] (e.g. B = K^T with K stored [key][d]).
// b[0], b[1] = (b0, b1) of tile n0;  b[2], b[3] = (b0, b1) of tile n0 + 8.
template <typename T>
__device__ __forceinline__ void load_b(uint32_t (&b)[4], const T* tile, int stride, int n0, int k0) {
  const int lane = threadIdx.x % 32;
  const int matrix = lane / 8, row = lane % 8;
  ldmatrix_x4(b, tile + (n0 + (matrix / 2) * 8 + row) * stride + k0 + (matrix % 2) * 8);
}

// Same as load_b, with B stored as [k][n] (e.g. B = V stored [key][d]).
template <typename T>
__device__ __forceinline__ void load_b_trans(uint32_t (&b)[4], const T* tile, int stride, int k0, int n0) {
  const int lane = threadIdx.x % 32;
  const int matrix = lane / 8, row = lane % 8;
  ldmatrix_x4_trans(b, tile + (k0 + (matrix % 2) * 8 + row) * stride + n0 + (matrix / 2) * 8);
}

// ----------------------------------------------------------------------------- cp.async

// 16-byte asynchronous copy global -> shared. When `valid` is false nothing is read and
// the 16 destination bytes are zero-filled (src-size 0): rows past the end of a sequence
// become zeros, never garbage that could turn into NaN inside a product.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(smem_addr(smem_dst)), "l"(gmem_src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(kPending));
}

// Asynchronously copies rows [row0, row0 + kRows) of a (seqlen, kHeadDim) matrix whose
// rows are `row_stride` elements apart into a shared tile with `smem_stride` elements
// per row; rows at or past `seqlen` are zero-filled. All kThreads threads take part.
template <typename T, int kRows, int kHeadDim, int kThreads>
__device__ __forceinline__ void load_tile_async(T* smem, int smem_stride, const T* gmem, int64_t row_stride,
                                                int row0, int seqlen) {
  constexpr int kChunksPerRow = kHeadDim * int(sizeof(T)) / 16;  // 16-byte chunks
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "tile must split evenly over the threads");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int chunk = i * kThreads + threadIdx.x;
    const int row = chunk / kChunksPerRow;
    const int col = (chunk % kChunksPerRow) * (16 / int(sizeof(T)));
    const bool valid = row0 + row < seqlen;
    // An out-of-range row reads nothing; point it at row 0 anyway so no invalid address is formed.
    const T* src = gmem + (valid ? int64_t(row0 + row) * row_stride : int64_t(0)) + col;
    cp_async_16(smem + row * smem_stride + col, src, valid);
  }
}

// Copies a shared tile (kRows x kHeadDim, `smem_stride` per row) to global rows
// [row0, row0 + kRows) with 16-byte stores, skipping rows at or past `seqlen`.
template <typename T, int kRows, int kHeadDim, int kThreads>
__device__ __forceinline__ void store_tile(T* gmem, int64_t row_stride, const T* smem, int smem_stride,
                                           int row0, int seqlen) {
  constexpr int kChunksPerRow = kHeadDim * int(sizeof(T)) / 16;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "tile must split evenly over the threads");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int chunk = i * kThreads + threadIdx.x;
    const int row = chunk / kChunksPerRow;
    const int col = (chunk % kChunksPerRow) * (16 / int(sizeof(T)));
    if (row0 + row < seqlen) {
      *reinterpret_cast<uint4*>(gmem + int64_t(row0 + row) * row_stride + col) =
          *reinterpret_cast<const uint4*>(smem + row * smem_stride + col);
    }
  }
}

// Writes one warp's 16 x kHeadDim fp32 accumulator tile (C layout, kHeadDim/8 tiles of
// 16x8) into rows [row0, row0 + 16) of a shared tile as T, scaling row `group` by
// scale_lo and row `group + 8` by scale_hi.
template <typename T, int kHeadDim>
__device__ __forceinline__ void store_acc_to_smem(T* smem, int smem_stride, int row0,
                                                  const float (&acc)[kHeadDim / 8][4], float scale_lo,
                                                  float scale_hi) {
  const int lane = threadIdx.x % 32;
  const int group = lane / 4, quad_lane = lane % 4;
#pragma unroll
  for (int nt = 0; nt < kHeadDim / 8; ++nt) {
    const int col = nt * 8 + quad_lane * 2;
    *reinterpret_cast<uint32_t*>(smem + (row0 + group) * smem_stride + col) =
        pack2<T>(acc[nt][0] * scale_lo, acc[nt][1] * scale_lo);
    *reinterpret_cast<uint32_t*>(smem + (row0 + group + 8) * smem_stride + col) =
        pack2<T>(acc[nt][2] * scale_hi, acc[nt][3] * scale_hi);
  }
}

// tanh with one MUFU.TANH instruction (sm_75+; max relative error 2^-10.99, the PTX ISA's
// "tanh.approx.f32"): soft-capping's tanh, as FlashAttention computes it. The accurate
// tanhf costs ~20 instructions and enough registers to make the forward kernel spill.
__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Max / sum over the 4 lanes of a quad, which together hold one accumulator row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace attention
}  // namespace fastft
