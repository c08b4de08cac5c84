// Host-side interface of the max_sim CUDA kernels: raw pointers and a cudaStream_t only, so the
// .cu files never include torch headers (the torch glue lives in max_sim_cuda.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace transmatcher_fast {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// Sizes shared by every kernel. Features are [nq, lq, d] and [ng, lg, d], contiguous.
struct Shape {
  int64_t nq, lq, ng, lg, d;
};

struct ForwardArgs {
  Shape shape;
  DType dtype;
  const void* query;    // [nq, lq, d] of dtype
  const void* gallery;  // [ng, lg, d] of dtype
  const float* gate;    // sigmoid(score_embed), [lg, lq]; null = no gate
  float* q_best;        // [nq, ng, lq]
  float* g_best;        // [nq, ng, lg]
  int32_t* q_index;     // [nq, ng, lq]
  int32_t* g_index;     // [nq, ng, lg]
  bool allow_tf32;      // float32 inputs: TF32 tensor cores, else exact FP32 FMA
  int64_t query_group;  // launch order: query regions per gallery strip; 0 = default
};

struct BackwardArgs {
  Shape shape;
  DType dtype;
  const void* query;
  const void* gallery;
  const float* gate;           // sigmoid(score_embed) [lg, lq] or null
  const float* grad_q_best;    // [nq, ng, lq] or null
  const float* grad_g_best;    // [nq, ng, lg] or null
  const float* q_best;         // saved maxima (for d score_embed)
  const float* g_best;
  const int32_t* q_index;      // saved argmax
  const int32_t* g_index;
  float* grad_query;           // [nq, lq, d] or null
  float* grad_gallery;         // [ng, lg, d] or null
  float* grad_score_embed;     // [lg, lq] or null (needs gate)
  float* partials;             // score_embed_partials(shape) * lg * lq floats, zeroed, or null
};

// gate[k] = sigmoid(logits[k]) for k < n, in float32, once per call (not per pair).
cudaError_t launch_sigmoid(const float* logits, float* gate, int64_t n, cudaStream_t stream);

cudaError_t launch_forward(const ForwardArgs& args, cudaStream_t stream);

// Number of [lg, lq] fp32 partial buffers the d score_embed reduction uses. It depends on the
// shape only, so the summation order (and the result) is the same on every run and device.
int64_t score_embed_partials(const Shape& shape);

// Dynamic shared memory the query (own = lq) / gallery (own = lg) gradient kernel needs; the
// glue compares it with the device limit to give a clear error for huge L.
int64_t backward_smem_bytes(int64_t l_own, DType dtype);

cudaError_t launch_backward(const BackwardArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace transmatcher_fast
