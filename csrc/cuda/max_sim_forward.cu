// Forward kernel of max_sim: a GEMM of the flattened query rows [Nq*Lq, D] against the flattened
// gallery rows [Ng*Lg, D]^T on tensor cores, with an epilogue that gates each score with
// sigmoid(E[s,t]) and folds it into both maxima. The score tensor S is never written.
//
// Work split: one thread block owns a region of I query images x J gallery images (I*Lq rows,
// J*Lg columns, I and J chosen so the region fills whole 128x128 tiles, e.g. I = J = 2 for
// L = 192). It walks the region's tiles row-tile-major, so every (pair, location) maximum is
// complete inside the block: no atomics, no second pass, deterministic.
//
// Per tile: a 3-stage cp.async pipeline over D feeds the math (mma.sync m16n8k16 for
// fp16/bf16, m16n8k8 TF32 or exact FP32 FMA for float32); the gated fp32 tile then goes to
// shared memory, where threads 0..127 scan one row each (max over gallery locations, segmented
// by gallery image) and threads 128..255 one column each (max over query locations). Each
// segment is merged into the output (q_best/g_best + index) that this block alone owns, tiles
// visited in increasing location order, so the strict `beats` rule keeps the lowest index.
//
// Block order: grouped (common.cuh, grouped_block_region): bands of query_group query regions,
// each band walked gallery region by gallery region, so a gallery region is read from DRAM once
// per band rather than once per query region. Only the order in which blocks are scheduled
// changes with query_group: every block computes the same region with the same tile and k order
// and writes outputs no other block touches, so the results are bit-identical for every
// query_group (1 = the plain gallery sweep of earlier versions).
#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "max_sim_cuda.cuh"

namespace transmatcher_fast {
namespace cuda {
namespace {

enum Math : int { kMma16 = 0, kTf32 = 1, kSimt = 2 };

constexpr int kThreads = 256;
constexpr int kTile = 128;                       // BM = BN
constexpr int kStages = 3;
constexpr int kRowBytes = 64;                    // bytes of D per tile row and stage
constexpr int kRowStrideBytes = kRowBytes + 16;  // padding: conflict-free ldmatrix / LDS
constexpr int kOperandBytes = kTile * kRowStrideBytes;
constexpr int kStageBytes = 2 * kOperandBytes;  // query tile + gallery tile
constexpr int kCStride = kTile + 1;              // fp32 score tile row stride (conflict-free scans)
constexpr int kCBytes = kTile * kCStride * 4;
constexpr int kSmemBytes = kCBytes > kStages * kStageBytes ? kCBytes : kStages * kStageBytes;

template <typename T>
struct FwdParams {
  const T* query;
  const T* gallery;
  const float* gate;  // [lg, lq] or null
  float* q_best;
  float* g_best;
  int32_t* q_index;
  int32_t* g_index;
  int64_t nq, ng;
  int lq, lg, d;
  int group_q, group_g;  // images per block region
  // Launch order (grouped_block_region); groups_q * groups_g = the block count < 2**31.
  int64_t groups_q;     // number of query regions
  int64_t groups_g;     // number of gallery regions
  int64_t query_group;  // query regions per band, in [1, groups_q]
};

// Loads the D slice [k0, k0 + kBk) of tile rows r0.. (query) and c0.. (gallery) into one stage.
// kVec: 16-byte cp.async (rows 16-byte aligned); otherwise element-wise (ragged D, odd sizes).
// Rows past the region and features past D are zero-filled, so they add nothing.
template <typename T, bool kVec>
__device__ __forceinline__ void load_stage(unsigned char* stage, const T* __restrict__ qbase,
                                           const T* __restrict__ gbase, int r0, int c0, int rows,
                                           int cols, int d, int k0) {
  constexpr int kBk = kRowBytes / sizeof(T);
  constexpr int kStride = kRowStrideBytes / sizeof(T);
  T* sa = reinterpret_cast<T*>(stage);
  T* sb = reinterpret_cast<T*>(stage + kOperandBytes);
  const int tid = threadIdx.x;
  if constexpr (kVec) {
    constexpr int kChunk = 16 / sizeof(T);
    constexpr int kChunksPerRow = kRowBytes / 16;
#pragma unroll
    for (int it = 0; it < kTile * kChunksPerRow / kThreads; ++it) {
      const int c = tid + it * kThreads;
      const int row = c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * kChunk;
      const int k = k0 + col;
      const bool qa = r0 + row < rows && k < d;
      const bool ga = c0 + row < cols && k < d;
      // A masked copy still needs a valid address: the region's base.
      cp_async_16(sa + row * kStride + col, qa ? qbase + static_cast<int64_t>(r0 + row) * d + k : qbase,
                  qa ? 16 : 0);
      cp_async_16(sb + row * kStride + col, ga ? gbase + static_cast<int64_t>(c0 + row) * d + k : gbase,
                  ga ? 16 : 0);
    }
  } else {
    for (int e = tid; e < kTile * kBk; e += kThreads) {
      const int row = e / kBk;
      const int col = e % kBk;
      const int k = k0 + col;
      sa[row * kStride + col] = (r0 + row < rows && k < d)
                                    ? qbase[static_cast<int64_t>(r0 + row) * d + k]
                                    : zero_value<T>();
      sb[row * kStride + col] = (c0 + row < cols && k < d)
                                    ? gbase[static_cast<int64_t>(c0 + row) * d + k]
                                    : zero_value<T>();
    }
  }
}

// Tensor-core fragment shapes: each warp owns a 64x32 sub-tile (8 warps: 2 x 4) as 4 x 4
// m16n8 accumulators of 4 floats. The SIMT path: each thread owns an 8x8 strided micro-tile.
template <int kMath>
struct Acc {
  float v[4][4][4];
};
template <>
struct Acc<kSimt> {
  float v[8][8];
};

// `stage` is the shared-window address of the stage; the per-lane ldmatrix offsets are fixed,
// the rest are immediates, which keeps register use low enough for two blocks per SM.
template <typename T>
__device__ __forceinline__ void mma_stage(Acc<kMma16>& acc, uint32_t stage) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / 4, wn = warp % 4;
  const uint32_t a_lane =
      stage + (wm * 64 + lane % 16) * kRowStrideBytes + (lane / 16) * 16;
  const uint32_t b_lane = stage + kOperandBytes +
                          (wn * 32 + (lane / 16) * 8 + lane % 8) * kRowStrideBytes +
                          ((lane / 8) % 2) * 16;
#pragma unroll
  for (int ks = 0; ks < kRowBytes; ks += 32) {  // k16 steps: 32 bytes of 16-bit features
    // All B fragments of the warp, then one A fragment at a time: fewer live registers.
    uint32_t b[4][2];
#pragma unroll
    for (int np = 0; np < 2; ++np) {
      uint32_t r[4];
      ldmatrix_x4(r, b_lane + np * 16 * kRowStrideBytes + ks);
      b[2 * np][0] = r[0];
      b[2 * np][1] = r[1];
      b[2 * np + 1][0] = r[2];
      b[2 * np + 1][1] = r[3];
    }
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
      uint32_t a[4];
      ldmatrix_x4(a, a_lane + mi * 16 * kRowStrideBytes + ks);
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) mma_16816<T>(acc.v[mi][ni], a, b[ni][0], b[ni][1]);
    }
  }
}

__device__ __forceinline__ void tf32_stage(Acc<kTf32>& acc, const unsigned char* stage) {
  constexpr int kStride = kRowStrideBytes / 4;
  const float* sa = reinterpret_cast<const float*>(stage);
  const float* sb = reinterpret_cast<const float*>(stage + kOperandBytes);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / 4, wn = warp % 4, g = lane / 4, tq = lane % 4;
#pragma unroll
  for (int ks = 0; ks < kRowBytes / 4; ks += 8) {
    uint32_t b[4][2];
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
      const float* p = sb + (wn * 32 + ni * 8 + g) * kStride + ks + tq;
      b[ni][0] = to_tf32(p[0]);
      b[ni][1] = to_tf32(p[4]);
    }
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
      const float* p = sa + (wm * 64 + mi * 16 + g) * kStride + ks + tq;
      const uint32_t a[4] = {to_tf32(p[0]), to_tf32(p[8 * kStride]), to_tf32(p[4]),
                             to_tf32(p[8 * kStride + 4])};
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) mma_1688_tf32(acc.v[mi][ni], a, b[ni][0], b[ni][1]);
    }
  }
}

__device__ __forceinline__ void simt_stage(Acc<kSimt>& acc, const unsigned char* stage) {
  constexpr int kStride = kRowStrideBytes / 4;
  const float* sa = reinterpret_cast<const float*>(stage);
  const float* sb = reinterpret_cast<const float*>(stage + kOperandBytes);
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
  for (int kk = 0; kk < kRowBytes / 4; kk += 4) {
    float4 a[8], b[8];
#pragma unroll
    for (int m = 0; m < 8; ++m) a[m] = *reinterpret_cast<const float4*>(sa + (ty + 16 * m) * kStride + kk);
#pragma unroll
    for (int n = 0; n < 8; ++n) b[n] = *reinterpret_cast<const float4*>(sb + (tx + 16 * n) * kStride + kk);
#pragma unroll
    for (int m = 0; m < 8; ++m) {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        float x = acc.v[m][n];
        x = fmaf(a[m].x, b[n].x, x);
        x = fmaf(a[m].y, b[n].y, x);
        x = fmaf(a[m].z, b[n].z, x);
        x = fmaf(a[m].w, b[n].w, x);
        acc.v[m][n] = x;
      }
    }
  }
}

template <typename T, int kMath>
__device__ __forceinline__ void compute_stage(Acc<kMath>& acc, const unsigned char* stage) {
  if constexpr (kMath == kMma16) {
    mma_stage<T>(acc, smem_addr(stage));
  } else if constexpr (kMath == kTf32) {
    tf32_stage(acc, stage);
  } else {
    simt_stage(acc, stage);
  }
}

// kAblationMmaOnly: the tile's accumulators of this thread added up (the 16-bit path).
template <int kMath>
__device__ __forceinline__ float acc_sum(const Acc<kMath>& acc) {
  float sum = 0.0f;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) sum += acc.v[mi][ni][e];
  return sum;
}

template <int kMath>
__device__ __forceinline__ void zero_acc(Acc<kMath>& acc) {
  if constexpr (kMath == kSimt) {
#pragma unroll
    for (int m = 0; m < 8; ++m)
#pragma unroll
      for (int n = 0; n < 8; ++n) acc.v[m][n] = 0.0f;
  } else {
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc.v[mi][ni][e] = 0.0f;
  }
}

// Location inside its image of region row/column `x` (0 past the region: such entries are
// never scanned, the 0 only keeps the gate read in bounds).
__device__ __forceinline__ int loc_of(int x, int extent, int l) { return x < extent ? x % l : 0; }

// Writes the gated accumulators of tile (r0, c0) to the fp32 score tile `cs`. The gate index is
// precomputed per fragment row (t) and column (s * lq): 16 divisions per tile, not 64.
template <int kMath>
__device__ __forceinline__ void store_scores(const Acc<kMath>& acc, float* cs,
                                             const float* __restrict__ gate, int r0, int c0,
                                             int rows, int cols, int lq, int lg) {
  if constexpr (kMath == kSimt) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    int t[8], s_off[8];
#pragma unroll
    for (int m = 0; m < 8; ++m) t[m] = loc_of(r0 + ty + 16 * m, rows, lq);
#pragma unroll
    for (int n = 0; n < 8; ++n) s_off[n] = loc_of(c0 + tx + 16 * n, cols, lg) * lq;
#pragma unroll
    for (int m = 0; m < 8; ++m) {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        const float v = acc.v[m][n];
        cs[(ty + 16 * m) * kCStride + tx + 16 * n] = gate ? v * __ldg(gate + s_off[n] + t[m]) : v;
      }
    }
  } else {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp / 4, wn = warp % 4, g = lane / 4, tq = lane % 4;
    int t[4][2], s_off[4][2];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) t[mi][h] = loc_of(r0 + wm * 64 + mi * 16 + g + 8 * h, rows, lq);
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        s_off[ni][e] = loc_of(c0 + wn * 32 + ni * 8 + 2 * tq + e, cols, lg) * lq;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float v = acc.v[mi][ni][2 * h + e];
            const int r = wm * 64 + mi * 16 + g + 8 * h, c = wn * 32 + ni * 8 + 2 * tq + e;
            cs[r * kCStride + c] = gate ? v * __ldg(gate + s_off[ni][e] + t[mi][h]) : v;
          }
        }
      }
    }
  }
}

// Merges a segment maximum into the output this block owns. `first`: the segment starts at
// location 0, so nothing was written before (outputs may hold poison); otherwise the stored
// value came from lower locations and wins ties.
// kIndex false (kAblationMaxOnly): the value alone.
template <bool kIndex>
__device__ __forceinline__ void merge_max(float* best_out, int32_t* index_out, int64_t k,
                                          float best, int index, bool first) {
  if (first || beats(best, best_out[k])) {
    best_out[k] = best;
    if constexpr (kIndex) index_out[k] = index;
  }
}

// Threads 0..127: row r0 + tid of the tile, max over its gallery locations, one segment per
// gallery image. Threads 128..255: column c0 + tid - 128, max over query locations. kIndex
// false (kAblationMaxOnly): the maxima alone.
template <typename T, bool kIndex>
__device__ __forceinline__ void reduce_tile(const FwdParams<T>& p, const float* cs, int64_t i0,
                                            int64_t j0, int r0, int c0, int rows, int cols) {
  const int tid = threadIdx.x;
  if (tid < kTile) {
    const int r = tid;
    if (r0 + r >= rows) return;
    const int i_loc = (r0 + r) / p.lq, t = (r0 + r) % p.lq;
    const int n = min(kTile, cols - c0);
    int j_loc = c0 / p.lg, s = c0 % p.lg;
    const float* row = cs + r * kCStride;
    for (int c = 0; c < n; s = 0, ++j_loc) {
      const int len = min(p.lg - s, n - c);
      float best = row[c];
      int best_s = s;
      for (int k = 1; k < len; ++k) {
        const float v = row[c + k];
        if (beats(v, best)) {
          best = v;
          if constexpr (kIndex) best_s = s + k;
        }
      }
      const int64_t out = ((i0 + i_loc) * p.ng + j0 + j_loc) * p.lq + t;
      merge_max<kIndex>(p.q_best, p.q_index, out, best, best_s, s == 0);
      c += len;
    }
  } else {
    const int c = tid - kTile;
    if (c0 + c >= cols) return;
    const int j_loc = (c0 + c) / p.lg, s = (c0 + c) % p.lg;
    const int n = min(kTile, rows - r0);
    int i_loc = r0 / p.lq, t = r0 % p.lq;
    for (int r = 0; r < n; t = 0, ++i_loc) {
      const int len = min(p.lq - t, n - r);
      float best = cs[r * kCStride + c];
      int best_t = t;
      for (int k = 1; k < len; ++k) {
        const float v = cs[(r + k) * kCStride + c];
        if (beats(v, best)) {
          best = v;
          if constexpr (kIndex) best_t = t + k;
        }
      }
      const int64_t out = ((i0 + i_loc) * p.ng + j0 + j_loc) * p.lg + s;
      merge_max<kIndex>(p.g_best, p.g_index, out, best, best_t, t == 0);
      r += len;
    }
  }
}

// Index type of the block -> region mapping. Both are exact (every intermediate is below the block
// count, < 2**31), so this changes no result, only what ptxas makes of the kernel at the
// 128-register bound of the vectorised tensor-core kernels: measured (nvcc 13.0), 64-bit
// divisions cost 8-16 B of spills on sm_90a and 32-bit ones 48-56 B on sm_80, the other
// choice none. Re-check with benchmarks/cuda_resources.py when touching the kernel.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
using RegionIndex = uint32_t;
#else
using RegionIndex = int64_t;
#endif

// The kernel body; kAbl: kAblationFull, or a benchmark ablation (max_sim_cuda.cuh).
template <typename T, int kMath, bool kVec, int kAbl>
__device__ __forceinline__ void forward_body(const FwdParams<T>& p) {
  extern __shared__ __align__(16) unsigned char smem[];
  using I = RegionIndex;
  const BlockRegion<I> region = grouped_block_region<I>(
      blockIdx.x, static_cast<I>(p.groups_q), static_cast<I>(p.groups_g),
      static_cast<I>(p.query_group));
  const int64_t i0 = static_cast<int64_t>(region.gi) * p.group_q;
  const int64_t j0 = static_cast<int64_t>(region.gj) * p.group_g;
  const int rows = static_cast<int>(min(static_cast<int64_t>(p.group_q), p.nq - i0)) * p.lq;
  const int cols = static_cast<int>(min(static_cast<int64_t>(p.group_g), p.ng - j0)) * p.lg;
  const T* qbase = p.query + i0 * p.lq * p.d;
  const T* gbase = p.gallery + j0 * p.lg * p.d;
  constexpr int kBk = kRowBytes / sizeof(T);
  const int k_tiles = (p.d + kBk - 1) / kBk;
  float* cs = reinterpret_cast<float*>(smem);
  float kept = 0.0f;  // kAblationMmaOnly: every accumulator added up

  for (int r0 = 0; r0 < rows; r0 += kTile) {
    for (int c0 = 0; c0 < cols; c0 += kTile) {
      Acc<kMath> acc;
      zero_acc(acc);
      // Prologue: stages 0 .. kStages-2 in flight.
#pragma unroll
      for (int st = 0; st < kStages - 1; ++st) {
        if (st < k_tiles)
          load_stage<T, kVec>(smem + st * kStageBytes, qbase, gbase, r0, c0, rows, cols, p.d,
                              st * kBk);
        cp_async_commit();
      }
      for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<kStages - 2>();
        __syncthreads();  // stage kt landed for everyone; stage kt-1 is free to refill
        const int next = kt + kStages - 1;
        if (next < k_tiles)
          load_stage<T, kVec>(smem + (next % kStages) * kStageBytes, qbase, gbase, r0, c0, rows,
                              cols, p.d, next * kBk);
        cp_async_commit();
        compute_stage<T, kMath>(acc, smem + (kt % kStages) * kStageBytes);
      }
      cp_async_wait<0>();
      __syncthreads();  // the score tile reuses the operand stages
      if constexpr (kAbl == kAblationMmaOnly) {
        kept += acc_sum(acc);
        continue;  // the barrier above also protects the stages from the next tile's loads
      }
      store_scores<kMath>(acc, cs, p.gate, r0, c0, rows, cols, p.lq, p.lg);
      __syncthreads();
      reduce_tile<T, kAbl != kAblationMaxOnly>(p, cs, i0, j0, r0, c0, rows, cols);
      __syncthreads();  // before the next tile's loads overwrite the score tile
    }
  }
  if constexpr (kAbl == kAblationMmaOnly) {
    const int64_t at = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
    if (at < p.nq * p.ng * p.lq) p.q_best[at] = kept;
  }
}

// Two resident blocks per SM for the tensor-core paths (one block's epilogue overlaps the
// other's main loop); the SIMT path and the element-wise loader need the registers of one.
template <typename T, int kMath, bool kVec>
__global__ void __launch_bounds__(kThreads, kMath == kSimt || !kVec ? 1 : 2)
    max_sim_forward_kernel(const FwdParams<T> p) {
  forward_body<T, kMath, kVec, kAblationFull>(p);
}

// The benchmark ablations (max_sim_cuda.cuh): the 16-bit tensor-core path, aligned rows.
template <typename T, int kAbl>
__global__ void __launch_bounds__(kThreads, 2) max_sim_forward_ablation_kernel(const FwdParams<T> p) {
  forward_body<T, kMma16, true, kAbl>(p);
}

// Images per block region: the smallest count (<= 8) whose rows fill 128-row tiles to within
// 1/16, else the count with the least padding. Rows of one region are contiguous in memory.
int choose_group(int64_t n, int64_t l) {
  int best = 1;
  double best_pad = 1e30;
  for (int k = 1; k <= 8 && k <= n; ++k) {
    const int64_t len = k * l;
    const double pad = static_cast<double>((len + kTile - 1) / kTile * kTile) / len;
    if (pad < best_pad - 1e-12) {
      best = k;
      best_pad = pad;
    }
    if (best_pad <= 1.0625) break;
  }
  return best;
}

template <typename T, int kMath>
cudaError_t launch_typed(const ForwardArgs& a, cudaStream_t stream) {
  const Shape& sh = a.shape;
  FwdParams<T> p;
  p.query = static_cast<const T*>(a.query);
  p.gallery = static_cast<const T*>(a.gallery);
  p.gate = a.gate;
  p.q_best = a.q_best;
  p.g_best = a.g_best;
  p.q_index = a.q_index;
  p.g_index = a.g_index;
  p.nq = sh.nq;
  p.ng = sh.ng;
  p.lq = static_cast<int>(sh.lq);
  p.lg = static_cast<int>(sh.lg);
  p.d = static_cast<int>(sh.d);
  p.group_q = choose_group(sh.nq, sh.lq);
  p.group_g = choose_group(sh.ng, sh.lg);
  const int64_t groups_q = (sh.nq + p.group_q - 1) / p.group_q;
  const int64_t groups_g = (sh.ng + p.group_g - 1) / p.group_g;
  const int64_t blocks = groups_q * groups_g;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  p.groups_q = groups_q;
  p.groups_g = groups_g;
  p.query_group = effective_query_group(a.query_group, groups_q);
  // 16-byte copies need every row start 16-byte aligned.
  const bool vec = (sh.d * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(a.query) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(a.gallery) % 16 == 0;
  auto kernel = vec ? max_sim_forward_kernel<T, kMath, true> : max_sim_forward_kernel<T, kMath, false>;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // benchmark ablations (vec: checked)
    if (a.ablation == kAblationMaxOnly) kernel = max_sim_forward_ablation_kernel<T, kAblationMaxOnly>;
    if (a.ablation == kAblationMmaOnly) kernel = max_sim_forward_ablation_kernel<T, kAblationMmaOnly>;
  }
  TMF_CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  kernel<<<static_cast<unsigned>(blocks), kThreads, kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

bool forward_ablation_supported(const ForwardArgs& a) {
  if (a.ablation == kAblationFull) return true;
  const Shape& sh = a.shape;
  const bool known = a.ablation == kAblationMaxOnly || a.ablation == kAblationMmaOnly;
  const bool aligned = (sh.d * 2) % 16 == 0 && reinterpret_cast<uintptr_t>(a.query) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(a.gallery) % 16 == 0;
  const bool wgmma_shape =
      a.query_group != kForwardWgmma || (sh.lg > 128 && sh.lg <= 192 && sh.d % 128 == 0);
  return known && a.dtype == DType::kBFloat16 && a.gate != nullptr && aligned && wgmma_shape;
}

cudaError_t launch_forward(const ForwardArgs& in, cudaStream_t stream) {
  const Shape& sh = in.shape;
  if (sh.nq == 0 || sh.ng == 0) return cudaSuccess;
  if (!forward_ablation_supported(in)) return cudaErrorInvalidValue;
  ForwardArgs args = in;
  if (args.query_group == kForwardWgmma) {
    bool launched = false;
    TMF_CUDA_RETURN_IF_ERROR(launch_forward_wgmma(args, stream, &launched));
    if (launched) return cudaSuccess;
    args.query_group = 0;  // not runnable here: the mma.sync kernel, default order
  }
  switch (args.dtype) {
    case DType::kFloat16:
      return launch_typed<__half, kMma16>(args, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16, kMma16>(args, stream);
    case DType::kFloat32:
      return args.allow_tf32 ? launch_typed<float, kTf32>(args, stream)
                             : launch_typed<float, kSimt>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace transmatcher_fast
