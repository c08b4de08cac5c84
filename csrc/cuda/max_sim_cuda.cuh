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
  float* gate_t;        // workspace of wgmma_gate_floats(shape) floats (the wgmma kernel's
                        // sigmoid(score_embed)^T, [lq, N] with padding columns), or null
  int64_t query_group;  // >= 0: the mma.sync kernel, query regions per gallery strip (0 =
                        // default); kForwardWgmma: the sm_90a wgmma kernel
  int ablation;         // kAblationFull, except in the GPU suite's ncu ablations (below)
};

// Benchmark-only ablations inside the forward kernels' own structure (the GPU suite's ncu
// section calls them through the op max_sim_forward_ablation; the user-facing op never does).
// kAblationMaxOnly: both maxima without the argmax (the index outputs are not written).
// kAblationMmaOnly: the loads and MMAs with each score tile reduced to one add a score into a
// per-thread sum (written once per thread into q_best, so the MMAs stay live), no epilogue.
// Built for bfloat16 with a gate only (the suite's ncu shape): forward_ablation_supported.
constexpr int kAblationFull = 0;
constexpr int kAblationMaxOnly = 1;
constexpr int kAblationMmaOnly = 2;

// ForwardArgs::query_group value that selects the wgmma kernel (max_sim_forward_wgmma.cu). Where it
// cannot run (no sm_90a code for the device, float32, Lg > 192, D % 8 != 0, unaligned rows) the
// call runs the mma.sync kernel with its default launch order, so the result is the same.
constexpr int64_t kForwardWgmma = -1;

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

// out [cols, stride] = in [rows, cols]^T, float32, with out[c, r] = in[0, c] for rows <= r < stride
// (the wgmma kernel's gate: its padding gallery columns repeat gallery location 0).
cudaError_t launch_gate_transpose(const float* in, float* out, int64_t rows, int64_t cols,
                                  int64_t stride, cudaStream_t stream);

// Floats of ForwardArgs::gate_t the wgmma kernel needs with a gate: lq rows of its tile width N
// (Lg rounded up to 64, 128 or 192).
int64_t wgmma_gate_floats(const Shape& shape);

// gate[k] = sigmoid(logits[k]) for k < n, in float32, once per call (not per pair).
cudaError_t launch_sigmoid(const float* logits, float* gate, int64_t n, cudaStream_t stream);

cudaError_t launch_forward(const ForwardArgs& args, cudaStream_t stream);

// Whether launch_forward can run args.ablation != kAblationFull (bfloat16, a gate; the wgmma
// kernel also Lg in (128, 192]): the glue checks it first for a clear error.
bool forward_ablation_supported(const ForwardArgs& args);

// The wgmma kernel alone: *launched = false where it cannot run (then nothing was launched).
bool wgmma_forward_supports(const ForwardArgs& args);
cudaError_t launch_forward_wgmma(const ForwardArgs& args, cudaStream_t stream, bool* launched);

// Number of [lg, lq] fp32 partial buffers the d score_embed reduction uses. It depends on the
// shape only, so the summation order (and the result) is the same on every run and device.
int64_t score_embed_partials(const Shape& shape);

// Dynamic shared memory the query (own = lq, other = lg) / gallery (own = lg, other = lq)
// gradient kernel needs; the glue compares it with the device limit to give a clear error for
// huge L.
int64_t backward_smem_bytes(int64_t l_own, int64_t l_oth, DType dtype);

cudaError_t launch_backward(const BackwardArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace transmatcher_fast
