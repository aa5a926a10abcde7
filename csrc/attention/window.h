// Which keys a query may attend, and which tiles of keys (or queries) a thread block must
// visit: the index arithmetic of causal masks, both causal alignments and sliding windows,
// shared by the forward and backward kernels.
//
// Query i has a diagonal key i + shift (shift = 0: top-left alignment, SDPA's is_causal;
// shift = seqlen_k - seqlen_q: bottom-right, FlashAttention's) and may attend keys
// [i + shift - left, i + shift + right]; -1 leaves a side unbounded, causal is right = 0.
// Tiles wholly outside that band are never loaded: a sliding window of W keys makes a block
// visit about (block + W) / block tiles instead of all of them.
//
// Plain host/device functions on ints, so tests/test_attention_cuda_window.py compiles this
// header with a host C++ compiler and checks every function against brute force.
#pragma once

#if defined(__CUDACC__)
#define FASTFT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTFT_HOST_DEVICE inline
#endif

namespace fastft {
namespace attention {

struct Window {
  int left = -1;   // keys before the diagonal a query may see; -1: all
  int right = -1;  // keys after the diagonal; -1: all (causal: 0)
  int shift = 0;   // query i's diagonal key is i + shift
};

FASTFT_HOST_DEVICE int imin(int a, int b) { return a < b ? a : b; }
FASTFT_HOST_DEVICE int imax(int a, int b) { return a > b ? a : b; }

// Query `query` may attend key `key` (both in range; padding is checked elsewhere).
FASTFT_HOST_DEVICE bool in_window(const Window& w, int query, int key) {
  const int diagonal = query + w.shift;
  return (w.right < 0 || key <= diagonal + w.right) && (w.left < 0 || key >= diagonal - w.left);
}

// The keys [first, last] query `query` may attend (its window, clipped to [0, seqlen_k)):
// computed once per row, so the per-element test is two comparisons.
FASTFT_HOST_DEVICE void keys_of_query(const Window& w, int query, int seqlen_k, int& first, int& last) {
  const int diagonal = query + w.shift;
  first = w.left < 0 ? 0 : imax(diagonal - w.left, 0);
  last = w.right < 0 ? seqlen_k - 1 : imin(diagonal + w.right, seqlen_k - 1);
}

// The queries [first, last] that may attend key `key` (clipped to [0, seqlen_q)).
FASTFT_HOST_DEVICE void queries_of_key(const Window& w, int key, int seqlen_q, int& first, int& last) {
  first = w.right < 0 ? 0 : imax(key - w.shift - w.right, 0);
  last = w.left < 0 ? seqlen_q - 1 : imin(key - w.shift + w.left, seqlen_q - 1);
}

// Keys [begin, end) that queries [m_start, m_start + block_m) (clipped to seqlen_q) can see;
// begin is a multiple of block_n unless the block sees no key (then begin >= end).
FASTFT_HOST_DEVICE int key_begin(const Window& w, int m_start, int block_n, int seqlen_k) {
  if (w.left < 0) return 0;
  const int first = imax(m_start + w.shift - w.left, 0);
  return first >= seqlen_k ? seqlen_k : first / block_n * block_n;  // past the end: no tile
}

FASTFT_HOST_DEVICE int key_end(const Window& w, int m_start, int block_m, int seqlen_q, int seqlen_k) {
  if (w.right < 0) return seqlen_k;
  const int last_query = imin(m_start + block_m, seqlen_q) - 1;
  return imax(imin(seqlen_k, last_query + w.shift + w.right + 1), 0);
}

// Queries [begin, end) that can see keys [n_start, n_start + block_n) (clipped to
// seqlen_k); begin is a multiple of block_m unless no query sees them (then begin >= end).
FASTFT_HOST_DEVICE int query_begin(const Window& w, int n_start, int block_m, int seqlen_q) {
  if (w.right < 0) return 0;
  const int first = imax(n_start - w.shift - w.right, 0);
  return first >= seqlen_q ? seqlen_q : first / block_m * block_m;  // past the end: no tile
}

FASTFT_HOST_DEVICE int query_end(const Window& w, int n_start, int block_n, int seqlen_q, int seqlen_k) {
  if (w.left < 0) return seqlen_q;
  const int last_key = imin(n_start + block_n, seqlen_k) - 1;
  return imax(imin(seqlen_q, last_key - w.shift + w.left + 1), 0);
}

// False when every (query, key) of the tile is inside the window, so the per-element
// window test can be skipped (sequence ends and padding are checked separately).
FASTFT_HOST_DEVICE bool tile_crosses_window(const Window& w, int m_start, int block_m, int n_start, int block_n) {
  const bool past_right = w.right >= 0 && n_start + block_n - 1 > m_start + w.shift + w.right;
  const bool before_left = w.left >= 0 && n_start < m_start + block_m - 1 + w.shift - w.left;
  return past_right || before_left;
}

}  // namespace attention
}  // namespace fastft
