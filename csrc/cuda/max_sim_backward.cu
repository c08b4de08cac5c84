// Backward kernels of max_sim, from the saved argmax only (S is never recomputed).
//
// Every output element of pair (i, j) routes its gradient w to one location pair (s, t):
//   q direction: t -> s* = q_index[i,j,t], w = grad_q_best[i,j,t], best = q_best[i,j,t]
//   g direction: s -> t* = g_index[i,j,s], w = grad_g_best[i,j,s], best = g_best[i,j,s]
//   d query[i,t]   += w * sig[s,t] * gallery[j,s]
//   d gallery[j,s] += w * sig[s,t] * query[i,t]
//   d E[s,t]       += w * best * (1 - sig[s,t])
//
// d query / d gallery: gathers, not a dense one-hot GEMM. The routed matrix of a pair has only
// Lq + Lg non-zeros out of Lq*Lg, so a dense P @ G on tensor cores would cost as much as the
// forward (2*Nq*Ng*Lq*Lg*D) and round w*sig to 16 bits; the gathers cost 2*Nq*Ng*(Lq+Lg)*D
// FLOPs in fp32 with coalesced reads of whole feature rows. One kernel serves both sides: a
// block owns one "own" image (query image i for d query) and a 32*V-wide slice of D, keeps the
// image's gradient slice in shared memory (fp32) and walks the "other" images in order,
// staging 128 of their feature rows at a time (16-byte loads where rows are 16-byte aligned).
// The pair's routes (argmax location and weight w * sig, both directions) are read from global
// memory once per pair by the whole block into shared tables that every warp and chunk then
// shares (not reloaded per warp and per chunk). Warp w owns the gradient rows o with
// o % 8 == w; each warp applies the routes landing on its rows in a fixed order (other image,
// staged chunk, direct route, then scattered routes by increasing location). No atomics: the
// result is bit-identical from run to run.
//
// d score_embed: (1 - sig[s,t]) * sum of w * best over the routes through (s,t). Block p sums
// a fixed range of pairs into its own fp32 partial [Lg, Lq] buffer (q routes: thread per column
// t; then g routes: thread per row s; so no two threads touch one cell at a time), and a second
// kernel adds the partials in index order. The partial count depends on the shape only.
#include <algorithm>

#include "common.cuh"
#include "max_sim_cuda.cuh"

namespace transmatcher_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStageRows = 128;  // feature rows of the other image staged at a time
constexpr unsigned kFullMask = 0xffffffffu;

struct RouteParams {
  const void* other;          // [n_oth, l_oth, d] features of the other side
  float* out;                 // [n_own, l_own, d] gradient of the own side
  const float* g_own;         // [pairs, l_own] gradients of the own side's maxima, or null
  const int32_t* idx_own;     //   their argmax: a location of the other image
  const float* g_oth;         // [pairs, l_oth] gradients of the other side's maxima, or null
  const int32_t* idx_oth;     //   their argmax: a location of the own image
  const float* gate;          // sig, read at o * gate_so + x * gate_sx; null = 1
  int64_t gate_so, gate_sx;
  int64_t n_own, n_oth;
  int l_own, l_oth, d;
  int64_t pair_so, pair_sx;   // pair index = own * pair_so + other * pair_sx
  int chunks;                 // D slices per own image
};

// Applies the routes held by the lanes (owner row o, staged row x, weight w) that belong to this
// warp (`mine`), in lane order. All lanes take part; lane k handles columns k*V .. k*V+V-1.
template <typename T, int V>
__device__ __forceinline__ void apply_routes(float* acc, const T* stage, bool mine, int o, int x,
                                             float w) {
  constexpr int kCols = 32 * V;
  const int lane = threadIdx.x % 32;
  unsigned mask = __ballot_sync(kFullMask, mine);
  while (mask) {
    const int src = __ffs(mask) - 1;
    mask &= mask - 1;
    const int ob = __shfl_sync(kFullMask, o, src);
    const int xb = __shfl_sync(kFullMask, x, src);
    const float wb = __shfl_sync(kFullMask, w, src);
    float* a = acc + ob * kCols + lane * V;
    const T* g = stage + xb * kCols + lane * V;
#pragma unroll
    for (int v = 0; v < V; ++v) a[v] = fmaf(wb, to_float(g[v]), a[v]);
  }
}

// Stages rows x0 .. x0+rows-1 of the other image, columns d0 .. d0+32V-1, into `stage`; zeros
// past D. kVec: 16-byte loads (D a multiple of the 16-byte element count, rows 16-byte aligned).
template <typename T, int V, bool kVec>
__device__ __forceinline__ void stage_rows(T* stage, const T* __restrict__ other_img, int x0,
                                           int rows, int d, int d0) {
  constexpr int kCols = 32 * V;
  if constexpr (kVec) {
    constexpr int kPer = 16 / sizeof(T);  // elements per 16-byte chunk
    constexpr int kChunks = kCols / kPer;  // per staged row
    for (int c = threadIdx.x; c < rows * kChunks; c += kThreads) {
      const int r = c / kChunks, k = d0 + (c % kChunks) * kPer;
      uint4 v = make_uint4(0, 0, 0, 0);  // a chunk is all inside D or all past it
      if (k < d) v = *reinterpret_cast<const uint4*>(other_img + static_cast<int64_t>(x0 + r) * d + k);
      *reinterpret_cast<uint4*>(stage + r * kCols + (c % kChunks) * kPer) = v;
    }
  } else {
    for (int e = threadIdx.x; e < rows * kCols; e += kThreads) {
      const int r = e / kCols, k = d0 + e % kCols;
      stage[e] = k < d ? other_img[static_cast<int64_t>(x0 + r) * d + k] : zero_value<T>();
    }
  }
}

template <typename T, int V, bool kVec>
__global__ void __launch_bounds__(kThreads) route_gradient_kernel(const RouteParams p) {
  constexpr int kCols = 32 * V;
  extern __shared__ __align__(16) unsigned char smem[];
  float* acc = reinterpret_cast<float*>(smem);                                 // [l_own][kCols]
  T* stage = reinterpret_cast<T*>(smem + sizeof(float) * p.l_own * kCols);     // [128][kCols]
  // The pair's route tables: direct (own location -> other location, weight) and scattered
  // (other location -> own location, weight); -1 = no route.
  int* own_to = reinterpret_cast<int*>(stage + kStageRows * kCols);
  float* own_w = reinterpret_cast<float*>(own_to + p.l_own);
  int* oth_to = reinterpret_cast<int*>(own_w + p.l_own);
  float* oth_w = reinterpret_cast<float*>(oth_to + p.l_oth);
  const T* other = static_cast<const T*>(p.other);
  const int64_t own = blockIdx.x / p.chunks;
  const int d0 = static_cast<int>(blockIdx.x % p.chunks) * kCols;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  for (int e = tid; e < p.l_own * kCols; e += kThreads) acc[e] = 0.0f;

  for (int64_t b = 0; b < p.n_oth; ++b) {
    const int64_t pair = own * p.pair_so + b * p.pair_sx;
    const T* other_img = other + b * p.l_oth * p.d;
    __syncthreads();  // the previous pair's tables and last chunk are consumed
    if (p.g_own != nullptr) {
      for (int o = tid; o < p.l_own; o += kThreads) {
        const int64_t k = pair * p.l_own + o;
        const int x = p.idx_own[k];
        const bool ok = static_cast<unsigned>(x) < static_cast<unsigned>(p.l_oth);
        float w = 0.0f;
        if (ok) {
          w = p.g_own[k];
          if (p.gate != nullptr) w *= p.gate[o * p.gate_so + x * p.gate_sx];
        }
        own_to[o] = ok ? x : -1;
        own_w[o] = w;
      }
    }
    if (p.g_oth != nullptr) {
      for (int x = tid; x < p.l_oth; x += kThreads) {
        const int64_t k = pair * p.l_oth + x;
        const int o = p.idx_oth[k];
        const bool ok = static_cast<unsigned>(o) < static_cast<unsigned>(p.l_own);
        float w = 0.0f;
        if (ok) {
          w = p.g_oth[k];
          if (p.gate != nullptr) w *= p.gate[o * p.gate_so + x * p.gate_sx];
        }
        oth_to[x] = ok ? o : -1;
        oth_w[x] = w;
      }
    }
    for (int x0 = 0; x0 < p.l_oth; x0 += kStageRows) {
      const int rows = min(kStageRows, p.l_oth - x0);
      if (x0 > 0) __syncthreads();  // the previous chunk is consumed
      stage_rows<T, V, kVec>(stage, other_img, x0, rows, p.d, d0);
      __syncthreads();  // staged rows and route tables visible
      // Direct routes: own location o -> other location own_to[o] (in this chunk).
      if (p.g_own != nullptr) {
        for (int o0 = 0; o0 < p.l_own; o0 += 32) {
          const int o = o0 + lane;
          const int x = o < p.l_own ? own_to[o] - x0 : -1;
          const bool in_chunk = o < p.l_own && own_to[o] >= 0 &&
                                static_cast<unsigned>(x) < static_cast<unsigned>(rows);
          apply_routes<T, V>(acc, stage, in_chunk && o % kWarps == warp, o, x,
                             in_chunk ? own_w[o] : 0.0f);
        }
      }
      // Scattered routes: other location x (in this chunk) -> own location oth_to[x].
      if (p.g_oth != nullptr) {
        for (int xb = 0; xb < rows; xb += 32) {
          const int x = xb + lane;
          const int o = x < rows ? oth_to[x0 + x] : -1;
          apply_routes<T, V>(acc, stage, o >= 0 && o % kWarps == warp, o, x,
                             o >= 0 ? oth_w[x0 + x] : 0.0f);
        }
      }
    }
  }
  __syncthreads();
  float* out = p.out + own * p.l_own * p.d;
  for (int e = tid; e < p.l_own * kCols; e += kThreads) {
    const int o = e / kCols, k = d0 + e % kCols;
    if (k < p.d) out[static_cast<int64_t>(o) * p.d + k] = acc[e];
  }
}

struct PartialParams {
  const float* grad_q_best;
  const float* grad_g_best;
  const float* q_best;
  const float* g_best;
  const int32_t* q_index;
  const int32_t* g_index;
  float* partials;  // [parts, lg, lq], zeroed
  int64_t pairs, parts;
  int lq, lg;
};

__global__ void __launch_bounds__(kThreads) score_embed_partial_kernel(const PartialParams p) {
  const int64_t part = blockIdx.x;
  const int64_t pair0 = part * p.pairs / p.parts, pair1 = (part + 1) * p.pairs / p.parts;
  float* buf = p.partials + part * p.lg * p.lq;
  // q routes: thread owns columns t; cell (q_index, t).
  if (p.grad_q_best != nullptr) {
    for (int64_t pair = pair0; pair < pair1; ++pair) {
      for (int t = threadIdx.x; t < p.lq; t += kThreads) {
        const int64_t k = pair * p.lq + t;
        const int s = p.q_index[k];
        if (static_cast<unsigned>(s) < static_cast<unsigned>(p.lg))
          buf[static_cast<int64_t>(s) * p.lq + t] += p.grad_q_best[k] * p.q_best[k];
      }
    }
  }
  __syncthreads();  // the q routes' writes are visible before other threads add g routes
  // g routes: thread owns rows s; cell (s, g_index).
  if (p.grad_g_best != nullptr) {
    for (int64_t pair = pair0; pair < pair1; ++pair) {
      for (int s = threadIdx.x; s < p.lg; s += kThreads) {
        const int64_t k = pair * p.lg + s;
        const int t = p.g_index[k];
        if (static_cast<unsigned>(t) < static_cast<unsigned>(p.lq))
          buf[static_cast<int64_t>(s) * p.lq + t] += p.grad_g_best[k] * p.g_best[k];
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    score_embed_reduce_kernel(const float* __restrict__ partials, const float* __restrict__ gate,
                              float* __restrict__ grad, int64_t n, int64_t parts) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; k < n; k += stride) {
    float sum = 0.0f;
    for (int64_t q = 0; q < parts; ++q) sum += partials[q * n + k];
    grad[k] = sum * (1.0f - gate[k]);
  }
}

int route_vector_width(int64_t l_own) { return l_own <= 256 ? 2 : 1; }

int64_t route_smem_bytes(int64_t l_own, int64_t l_oth, int64_t elem, int v) {
  return 4 * l_own * 32 * v + elem * kStageRows * 32 * v + 8 * (l_own + l_oth);
}

template <typename T, int V>
cudaError_t launch_route(const RouteParams& p, cudaStream_t stream) {
  const int64_t smem = route_smem_bytes(p.l_own, p.l_oth, sizeof(T), V);
  const int64_t blocks = p.n_own * p.chunks;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  // 16-byte staging: every row start and slice start 16-byte aligned.
  const bool vec = (p.d * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p.other) % 16 == 0;
  auto kernel = vec ? route_gradient_kernel<T, V, true> : route_gradient_kernel<T, V, false>;
  TMF_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_route_typed(RouteParams p, cudaStream_t stream) {
  if (route_vector_width(p.l_own) == 2) {
    p.chunks = (p.d + 63) / 64;
    return launch_route<T, 2>(p, stream);
  }
  p.chunks = (p.d + 31) / 32;
  return launch_route<T, 1>(p, stream);
}

cudaError_t launch_route_dtype(const RouteParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_route_typed<float>(p, stream);
    case DType::kFloat16:
      return launch_route_typed<__half>(p, stream);
    case DType::kBFloat16:
      return launch_route_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

}  // namespace

int64_t score_embed_partials(const Shape& shape) {
  const int64_t pairs = shape.nq * shape.ng;
  const int64_t cell_bytes = std::max<int64_t>(1, shape.lg * shape.lq * 4);
  const int64_t by_memory = std::max<int64_t>(1, (int64_t{32} << 20) / cell_bytes);
  return std::min({pairs, int64_t{128}, by_memory});
}

int64_t backward_smem_bytes(int64_t l_own, int64_t l_oth, DType dtype) {
  return route_smem_bytes(l_own, l_oth, dtype_size(dtype), route_vector_width(l_own));
}

cudaError_t launch_backward(const BackwardArgs& a, cudaStream_t stream) {
  const Shape& sh = a.shape;
  if (a.grad_query != nullptr) {
    // Own = query image i, other = gallery image j; pair = i * ng + j; gate[s, t] = [x, o].
    RouteParams p{a.gallery, a.grad_query, a.grad_q_best, a.q_index, a.grad_g_best, a.g_index,
                  a.gate, 1, sh.lq, sh.nq, sh.ng, static_cast<int>(sh.lq),
                  static_cast<int>(sh.lg), static_cast<int>(sh.d), sh.ng, 1, 0};
    TMF_CUDA_RETURN_IF_ERROR(launch_route_dtype(p, a.dtype, stream));
  }
  if (a.grad_gallery != nullptr) {
    // Own = gallery image j, other = query image i; pair = i * ng + j; gate[s, t] = [o, x].
    RouteParams p{a.query, a.grad_gallery, a.grad_g_best, a.g_index, a.grad_q_best, a.q_index,
                  a.gate, sh.lq, 1, sh.ng, sh.nq, static_cast<int>(sh.lg),
                  static_cast<int>(sh.lq), static_cast<int>(sh.d), 1, sh.ng, 0};
    TMF_CUDA_RETURN_IF_ERROR(launch_route_dtype(p, a.dtype, stream));
  }
  if (a.grad_score_embed != nullptr) {
    if (a.gate == nullptr) return cudaErrorInvalidValue;
    const int64_t n = sh.lg * sh.lq;
    const int64_t parts = score_embed_partials(sh);
    if (parts > 0) {
      if (a.partials == nullptr) return cudaErrorInvalidValue;
      TMF_CUDA_RETURN_IF_ERROR(
          cudaMemsetAsync(a.partials, 0, sizeof(float) * parts * n, stream));
      PartialParams pp{a.grad_q_best, a.grad_g_best, a.q_best, a.g_best, a.q_index, a.g_index,
                       a.partials, sh.nq * sh.ng, parts, static_cast<int>(sh.lq),
                       static_cast<int>(sh.lg)};
      score_embed_partial_kernel<<<static_cast<unsigned>(parts), kThreads, 0, stream>>>(pp);
      TMF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    }
    const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 1024);
    score_embed_reduce_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        a.partials, a.gate, a.grad_score_embed, n, parts);
    TMF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace transmatcher_fast
