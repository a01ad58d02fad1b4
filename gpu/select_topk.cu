// Top-k selection kernels (ops `selection_topk_rows`, `selection_topk_global`; also the
// mask and boundary of `selection_cumulative_threshold`), see gpu/select.py. Score formats,
// keys and the bit-exactness rules: gpu/select_keys.cuh.
//
// Top-m of a row (m = min(k, #candidates)): radix select of the m-th largest key v (8-bit
// digits from the top, one 256-bin histogram per pass), which also leaves `need`, the
// number of entries equal to v that are kept; then one ordered pass keeps every key > v and
// the first `need` keys == v in index order (the last ones for tie = "high"). The boundary
// is the value of v. Kernels:
//
//   sel_topk_group<FMT, NT>  one group of NT threads per row, the row's keys in shared
//                            memory: NT = 32 (one warp per row, 4 rows per CTA) for short
//                            rows, NT = 512 (one CTA per row) for rows up to 64 KiB of keys.
//   sel_g_hist / sel_g_pick / sel_g_ties / sel_g_mask
//                            long rows (global top-k per head over Qb*Kb blocks): many CTAs
//                            per row, each over a chunk of G_CHUNK entries; histograms are
//                            summed in global memory, a one-warp kernel picks each digit, the
//                            tie pass offsets each chunk by the ties of the chunks before it.
#include "common.cuh"
#include "select_keys.cuh"
#include "select_group.cuh"

using namespace refattn;
using namespace refattn::sel;

// ============================================================================ top-m, groups
// One group of NT threads per row; blockDim.x / NT groups (rows) per CTA. Dynamic shared
// memory per group: align16(N * sizeof(K)) (keys) + 1024 (histogram) + 256 (scratch).
// kk[r] (int64 >= 0): the budget of row r, clamped to the row's candidates.
template <int FMT, int NT>
__global__ void __launch_bounds__(NT == 32 ? 128 : NT)
sel_topk_group(const typename Fmt<FMT>::S* __restrict__ s, const unsigned char* __restrict__ valid,
               long long vsr, long long vsc, const long long* __restrict__ kk, int R, int N,
               int tie_high, unsigned char* __restrict__ mask, double* __restrict__ bound) {
  using K = typename Fmt<FMT>::K;
  extern __shared__ __align__(16) unsigned char smem[];
  const int groups = blockDim.x / NT;
  const int g = threadIdx.x / NT, t = threadIdx.x % NT;
  const long long r = (long long)blockIdx.x * groups + g;
  if (r >= R) return;
  const long long keys_bytes = align16((long long)N * sizeof(K));
  unsigned char* base = smem + (size_t)g * (size_t)(keys_bytes + 1280);
  K* keys = reinterpret_cast<K*>(base);
  unsigned* hist = reinterpret_cast<unsigned*>(base + keys_bytes);
  unsigned* misc = hist + 256;

  unsigned nv = 0;
  for (int j = t; j < N; j += NT) {
    const K key = entry_key<FMT>(s, valid, r, N, j, vsr, vsc);
    keys[j] = key;
    nv += key != K(0);
  }
  nv = group_sum<NT>(nv, misc, t);
  const long long kr = kk[r];
  const long long m = kr < (long long)nv ? kr : (long long)nv;
  unsigned char* mrow = mask + r * N;
  if (m <= 0) {
    for (int j = t; j < N; j += NT) mrow[j] = 0;
    if (t == 0) bound[r] = qnan();
    return;
  }
  K v;
  unsigned need;
  radix_select<NT, K>(keys, N, (unsigned)m, hist, misc + 32, reinterpret_cast<K*>(misc), t, v,
                      need);
  ordered_select<NT, K>(
      N, v, need, 0u, tie_high != 0, t, misc, [&](int j) { return keys[j]; },
      [&](int j, bool keep) { mrow[j] = keep ? 1 : 0; });
  if (t == 0) bound[r] = key_value(v);
}

// ============================================================================ top-m, long rows
// Row r's state st[4 r ...]: prefix, prefix mask, rem (ties kept once the prefix is
// complete), m. Grid of the chunk kernels: R * nch CTAs of G_THREADS, CTA b = (row b / nch,
// chunk b % nch), chunk c = entries [c G_CHUNK, min(N, (c + 1) G_CHUNK)).

// Histogram of the digit at `shift` of the keys that match the row's prefix (st == nullptr:
// the first pass, every candidate; nvalid != nullptr: also counts the candidates).
template <int FMT>
__global__ void __launch_bounds__(G_THREADS)
sel_g_hist(const typename Fmt<FMT>::S* __restrict__ s, const unsigned char* __restrict__ valid,
           long long vsr, long long vsc, int N, int nch, const unsigned long long* __restrict__ st,
           unsigned* __restrict__ ghist, unsigned* __restrict__ nvalid, int shift) {
  using K = typename Fmt<FMT>::K;
  __shared__ unsigned hist[256];
  __shared__ unsigned red[G_THREADS / 32];
  const long long r = blockIdx.x / nch;
  const int c = blockIdx.x % nch;
  const int tid = threadIdx.x;
  K prefix = 0, pmask = 0;
  if (st != nullptr) {
    if (st[4 * r + 3] == 0ull) return;
    prefix = (K)st[4 * r];
    pmask = (K)st[4 * r + 1];
  }
  hist[tid] = 0u;
  __syncthreads();
  const int j0 = c * G_CHUNK, j1 = min(N, j0 + G_CHUNK);
  unsigned cnt = 0;
  for (int it = 0; it < G_CHUNK / G_THREADS; ++it) {
    const int j = j0 + it * G_THREADS + tid;
    const K key = j < j1 ? entry_key<FMT>(s, valid, r, N, j, vsr, vsc) : K(0);
    cnt += key != K(0);
    hist_add(hist, (unsigned)(key >> shift) & 255u, key != K(0) && (key & pmask) == prefix);
  }
  __syncthreads();
  if (hist[tid] != 0u) atomicAdd(&ghist[256 * r + tid], hist[tid]);
  if (nvalid != nullptr) {
    cnt = group_sum<G_THREADS>(cnt, red, tid);
    if (tid == 0 && cnt != 0u) atomicAdd(&nvalid[r], cnt);
  }
}

// One warp per row: picks the digit at `shift` from the summed histogram, updates the
// state, clears the histogram for the next pass. `first`: set up the state from the budget
// kk[r] and the candidate count nvalid[r].
__global__ void __launch_bounds__(32)
sel_g_pick(const long long* __restrict__ kk, const unsigned* __restrict__ nvalid,
           unsigned long long* __restrict__ st, unsigned* __restrict__ ghist, int shift, int first) {
  __shared__ unsigned bc[3];
  const long long r = blockIdx.x;
  const int lane = threadIdx.x;
  unsigned long long* sr = st + 4 * r;
  unsigned* h = ghist + 256 * r;
  unsigned long long prefix = 0, pmask = 0, rem, m;
  if (first) {
    const long long kr = kk[r], nv = (long long)nvalid[r];
    const long long mm = kr < nv ? kr : nv;
    m = mm > 0 ? (unsigned long long)mm : 0ull;
    rem = m;
  } else {
    prefix = sr[0];
    pmask = sr[1];
    rem = sr[2];
    m = sr[3];
  }
  if (m > 0ull) {
    pick_digit(h, (unsigned)rem, lane, bc);
    __syncwarp();
    const unsigned d = bc[0];
    rem = bc[1];
    prefix |= (unsigned long long)d << shift;
    pmask |= 255ull << shift;
  }
  if (lane == 0) {
    sr[0] = prefix;
    sr[1] = pmask;
    sr[2] = rem;
    sr[3] = m;
  }
  __syncwarp();
  for (int i = lane; i < 256; i += 32) h[i] = 0u;
}

// Ties (keys equal to the selected value) per chunk: tcnt[r * nch + c].
template <int FMT>
__global__ void __launch_bounds__(G_THREADS)
sel_g_ties(const typename Fmt<FMT>::S* __restrict__ s, const unsigned char* __restrict__ valid,
           long long vsr, long long vsc, int N, int nch, const unsigned long long* __restrict__ st,
           unsigned* __restrict__ tcnt) {
  using K = typename Fmt<FMT>::K;
  __shared__ unsigned red[G_THREADS / 32];
  const long long r = blockIdx.x / nch;
  const int c = blockIdx.x % nch;
  const int tid = threadIdx.x;
  if (st[4 * r + 3] == 0ull) {
    if (tid == 0) tcnt[r * nch + c] = 0u;
    return;
  }
  const K v = (K)st[4 * r];
  const int j0 = c * G_CHUNK, j1 = min(N, j0 + G_CHUNK);
  unsigned cnt = 0;
  for (int j = j0 + tid; j < j1; j += G_THREADS)
    cnt += entry_key<FMT>(s, valid, r, N, j, vsr, vsc) == v;
  cnt = group_sum<G_THREADS>(cnt, red, tid);
  if (tid == 0) tcnt[r * nch + c] = cnt;
}

// The mask of each chunk (ordered tie pass, offset by the ties of the chunks before it in
// tie order) and the boundary (chunk 0).
template <int FMT>
__global__ void __launch_bounds__(G_THREADS)
sel_g_mask(const typename Fmt<FMT>::S* __restrict__ s, const unsigned char* __restrict__ valid,
           long long vsr, long long vsc, int N, int nch, const unsigned long long* __restrict__ st,
           const unsigned* __restrict__ tcnt, int tie_high, unsigned char* __restrict__ mask,
           double* __restrict__ bound) {
  using K = typename Fmt<FMT>::K;
  __shared__ unsigned red[G_THREADS / 32];
  const long long r = blockIdx.x / nch;
  const int c = blockIdx.x % nch;
  const int tid = threadIdx.x;
  const int j0 = c * G_CHUNK, j1 = min(N, j0 + G_CHUNK);
  unsigned char* mrow = mask + r * N;
  if (st[4 * r + 3] == 0ull) {
    for (int j = j0 + tid; j < j1; j += G_THREADS) mrow[j] = 0;
    if (c == 0 && tid == 0) bound[r] = qnan();
    return;
  }
  const K v = (K)st[4 * r];
  const unsigned need = (unsigned)st[4 * r + 2];
  unsigned off = 0;
  for (int i = tid; i < nch; i += G_THREADS)
    if (tie_high ? i > c : i < c) off += tcnt[r * nch + i];
  off = group_sum<G_THREADS>(off, red, tid);
  ordered_select<G_THREADS, K>(
      j1 - j0, v, need, off, tie_high != 0, tid, red,
      [&](int i) { return entry_key<FMT>(s, valid, r, N, j0 + i, vsr, vsc); },
      [&](int i, bool keep) { mrow[j0 + i] = keep ? 1 : 0; });
  if (c == 0 && tid == 0) bound[r] = key_value(v);
}

#ifdef REFATTN_NVCC_CHECK
// nvcc compile check of every instantiation gpu/select.py uses:
//   nvcc -arch=sm_90 -std=c++17 -Igpu -DREFATTN_NVCC_CHECK -c gpu/select_topk.cu -o /dev/null
#define REFATTN_SEL_FMT(F) \
  (void*)&sel_topk_group<F, 32>, (void*)&sel_topk_group<F, 512>, (void*)&sel_g_hist<F>, (void*)&sel_g_ties<F>, (void*)&sel_g_mask<F>
void* refattn_select_topk_check() {
  static void* ptrs[] = {REFATTN_SEL_FMT(0), REFATTN_SEL_FMT(1), REFATTN_SEL_FMT(2),
                         REFATTN_SEL_FMT(3), (void*)&sel_g_pick};
  return ptrs;
}
#endif
