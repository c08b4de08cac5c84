// Torch glue of the CUDA kernels: argument checks, device guard, current stream, workspaces
// (gate, d score_embed partials) and the registration under the CUDA dispatch key. The kernels
// themselves (max_sim_*.cu) see raw pointers only.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "../max_sim.h"
#include "max_sim_cuda.cuh"

namespace transmatcher_fast {
namespace {

cuda::DType kernel_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "max_sim cuda kernel: float32, float16 or bfloat16 inputs expected, got ",
                  dtype);
  }
}

void check_on_device(const at::Tensor& t, const at::Tensor& query, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == query.device(), "max_sim cuda kernel: ", name,
              " must be on ", query.device(), ", got ", t.device());
}

void check_optional_float(const std::optional<at::Tensor>& t, at::IntArrayRef shape,
                          const at::Tensor& query, const char* name) {
  if (!t.has_value()) return;
  check_output(*t, shape, at::kFloat, name);
  check_on_device(*t, query, name);
}

const float* float_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<float>() : nullptr;
}
float* mutable_float_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->mutable_data_ptr<float>() : nullptr;
}

// Shared checks of both ops; returns the kernels' shape.
cuda::Shape check_common(const at::Tensor& query, const at::Tensor& gallery,
                         const std::optional<at::Tensor>& score_embed, const at::Tensor& q_best,
                         const at::Tensor& g_best, const at::Tensor& q_index,
                         const at::Tensor& g_index) {
  check_kernel_inputs(query, gallery, score_embed);
  TORCH_CHECK(query.is_cuda(), "max_sim cuda kernel: query must be a CUDA tensor");
  check_on_device(gallery, query, "gallery");
  kernel_dtype(query.scalar_type());
  const cuda::Shape sh{query.size(0), query.size(1), gallery.size(0), gallery.size(1),
                       query.size(2)};
  TORCH_CHECK(sh.lq > 0 && sh.lg > 0, "max_sim cuda kernel: images need at least one location");
  // Offsets inside one image pair and block region are 32-bit; only counts of images are 64-bit.
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(sh.lq * sh.lg <= kIntMax && 8 * sh.lq <= kIntMax && 8 * sh.lg <= kIntMax &&
                  sh.d <= kIntMax,
              "max_sim cuda kernel: locations or feature size too large (query ", query.sizes(),
              ", gallery ", gallery.sizes(), ")");
  if (score_embed.has_value()) {
    check_output(*score_embed, {sh.lg, sh.lq}, at::kFloat, "score_embed");
    check_on_device(*score_embed, query, "score_embed");
  }
  check_output(q_best, {sh.nq, sh.ng, sh.lq}, at::kFloat, "q_best");
  check_output(g_best, {sh.nq, sh.ng, sh.lg}, at::kFloat, "g_best");
  check_output(q_index, {sh.nq, sh.ng, sh.lq}, at::kInt, "q_index");
  check_output(g_index, {sh.nq, sh.ng, sh.lg}, at::kInt, "g_index");
  for (const at::Tensor* t : {&q_best, &g_best, &q_index, &g_index}) {
    check_on_device(*t, query, "outputs and saved tensors");
  }
  int device = query.get_device();
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  TORCH_CHECK(major >= 8, "max_sim cuda kernel: needs compute capability 8.0 or newer (mma.sync, "
              "cp.async); use the 'triton' or 'reference' backend on this GPU");
  return sh;
}

// sigmoid(score_embed) in float32, once per call, on the current stream.
std::optional<at::Tensor> gate_of(const std::optional<at::Tensor>& score_embed,
                                  cudaStream_t stream) {
  if (!score_embed.has_value()) return std::nullopt;
  at::Tensor gate = at::empty_like(*score_embed);
  C10_CUDA_CHECK(cuda::launch_sigmoid(score_embed->const_data_ptr<float>(),
                                      gate.mutable_data_ptr<float>(), gate.numel(), stream));
  return gate;
}

void forward_cuda(const at::Tensor& query, const at::Tensor& gallery,
                  const std::optional<at::Tensor>& score_embed, at::Tensor q_best,
                  at::Tensor g_best, at::Tensor q_index, at::Tensor g_index, bool allow_tf32,
                  int64_t query_group, int ablation) {
  TORCH_CHECK(query_group >= 0 || query_group == cuda::kForwardWgmma,
              "max_sim cuda kernel: query_group must be >= 0 (mma.sync kernel, launch order) or ",
              cuda::kForwardWgmma, " (wgmma kernel), got ", query_group);
  const cuda::Shape sh =
      check_common(query, gallery, score_embed, q_best, g_best, q_index, g_index);
  if (sh.nq == 0 || sh.ng == 0) return;
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(query.get_device()).stream();
  const auto gate = gate_of(score_embed, stream);
  at::Tensor gate_t;  // the wgmma kernel reads the gate transposed
  if (gate.has_value() && query_group == cuda::kForwardWgmma) {
    gate_t = at::empty({cuda::wgmma_gate_floats(sh)}, gate->options());
  }
  cuda::ForwardArgs args{};
  args.shape = sh;
  args.dtype = kernel_dtype(query.scalar_type());
  args.query = query.const_data_ptr();
  args.gallery = gallery.const_data_ptr();
  args.gate = float_ptr(gate);
  args.q_best = q_best.mutable_data_ptr<float>();
  args.g_best = g_best.mutable_data_ptr<float>();
  args.q_index = q_index.mutable_data_ptr<int32_t>();
  args.g_index = g_index.mutable_data_ptr<int32_t>();
  // Read in Python (ops/precision.py): torch's legacy TF32 getters raise once the new
  // fp32_precision API has been used.
  args.allow_tf32 = allow_tf32;
  args.gate_t = gate_t.defined() ? gate_t.mutable_data_ptr<float>() : nullptr;
  args.query_group = query_group;
  args.ablation = ablation;
  TORCH_CHECK(cuda::forward_ablation_supported(args),
              "max_sim_forward_ablation: max_only / mma_only are built for bfloat16 features with "
              "a score_embed, 16-byte aligned rows, and for the wgmma kernel (query_group ",
              cuda::kForwardWgmma, ") 128 < Lg <= 192 and D % 128 == 0");
  C10_CUDA_CHECK(cuda::launch_forward(args, stream));
}

void max_sim_forward_cuda(const at::Tensor& query, const at::Tensor& gallery,
                          const std::optional<at::Tensor>& score_embed, at::Tensor q_best,
                          at::Tensor g_best, at::Tensor q_index, at::Tensor g_index,
                          bool allow_tf32, int64_t query_group) {
  forward_cuda(query, gallery, score_embed, q_best, g_best, q_index, g_index, allow_tf32,
               query_group, cuda::kAblationFull);
}

// The GPU suite's ncu ablations (benchmarks/gpu_suite_ncu.py; the user-facing op never calls
// this): "full", "gate_off" (no score_embed), "max_only", "mma_only" (max_sim_cuda.cuh).
void max_sim_forward_ablation_cuda(const at::Tensor& query, const at::Tensor& gallery,
                                   const std::optional<at::Tensor>& score_embed,
                                   at::Tensor q_best, at::Tensor g_best, at::Tensor q_index,
                                   at::Tensor g_index, bool allow_tf32, int64_t query_group,
                                   c10::string_view ablation) {
  int code = cuda::kAblationFull;
  if (ablation == "max_only") {
    code = cuda::kAblationMaxOnly;
  } else if (ablation == "mma_only") {
    code = cuda::kAblationMmaOnly;
  } else {
    TORCH_CHECK(ablation == "full" || ablation == "gate_off",
                "max_sim_forward_ablation: ablation must be full, gate_off, max_only or mma_only, "
                "got ", ablation);
  }
  const std::optional<at::Tensor> gate = ablation == "gate_off" ? std::nullopt : score_embed;
  forward_cuda(query, gallery, gate, q_best, g_best, q_index, g_index, allow_tf32, query_group,
               code);
}

void max_sim_backward_cuda(const std::optional<at::Tensor>& grad_q_best,
                           const std::optional<at::Tensor>& grad_g_best, const at::Tensor& query,
                           const at::Tensor& gallery, const std::optional<at::Tensor>& score_embed,
                           const at::Tensor& q_best, const at::Tensor& g_best,
                           const at::Tensor& q_index, const at::Tensor& g_index,
                           const std::optional<at::Tensor>& grad_query,
                           const std::optional<at::Tensor>& grad_gallery,
                           const std::optional<at::Tensor>& grad_score_embed) {
  const cuda::Shape sh =
      check_common(query, gallery, score_embed, q_best, g_best, q_index, g_index);
  check_optional_float(grad_q_best, q_best.sizes(), query, "grad_q_best");
  check_optional_float(grad_g_best, g_best.sizes(), query, "grad_g_best");
  check_optional_float(grad_query, query.sizes(), query, "grad_query");
  check_optional_float(grad_gallery, gallery.sizes(), query, "grad_gallery");
  if (grad_score_embed.has_value()) {
    TORCH_CHECK(score_embed.has_value(),
                "max_sim cuda kernel: grad_score_embed given without score_embed");
    check_optional_float(grad_score_embed, {sh.lg, sh.lq}, query, "grad_score_embed");
  }
  const c10::cuda::CUDAGuard guard(query.device());
  const cuda::DType dtype = kernel_dtype(query.scalar_type());
  int smem_limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        query.get_device()));
  for (const auto& [needed, l_own, l_oth, side] :
       {std::tuple{grad_query.has_value(), sh.lq, sh.lg, "query (Lq)"},
        std::tuple{grad_gallery.has_value(), sh.lg, sh.lq, "gallery (Lg)"}}) {
    TORCH_CHECK(!needed || cuda::backward_smem_bytes(l_own, l_oth, dtype) <= smem_limit,
                "max_sim cuda backward: too many ", side, " locations (", l_own,
                ") for the gradient kernel's shared memory (", smem_limit,
                " bytes); use the 'triton' or 'reference' backend");
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(query.get_device()).stream();
  const auto gate = gate_of(score_embed, stream);
  at::Tensor partials;
  if (grad_score_embed.has_value()) {
    partials = at::empty({cuda::score_embed_partials(sh), sh.lg, sh.lq},
                         query.options().dtype(at::kFloat));
  }
  cuda::BackwardArgs args{};
  args.shape = sh;
  args.dtype = dtype;
  args.query = query.const_data_ptr();
  args.gallery = gallery.const_data_ptr();
  args.gate = float_ptr(gate);
  args.grad_q_best = float_ptr(grad_q_best);
  args.grad_g_best = float_ptr(grad_g_best);
  args.q_best = q_best.const_data_ptr<float>();
  args.g_best = g_best.const_data_ptr<float>();
  args.q_index = q_index.const_data_ptr<int32_t>();
  args.g_index = g_index.const_data_ptr<int32_t>();
  args.grad_query = mutable_float_ptr(grad_query);
  args.grad_gallery = mutable_float_ptr(grad_gallery);
  args.grad_score_embed = mutable_float_ptr(grad_score_embed);
  args.partials = partials.defined() && partials.numel() > 0 ? partials.mutable_data_ptr<float>()
                                                              : nullptr;
  C10_CUDA_CHECK(cuda::launch_backward(args, stream));
}

}  // namespace

TORCH_LIBRARY_IMPL(transmatcher_fast_C, CUDA, m) {
  m.impl("max_sim_forward", &max_sim_forward_cuda);
  m.impl("max_sim_forward_ablation", &max_sim_forward_ablation_cuda);
  m.impl("max_sim_backward", &max_sim_backward_cuda);
}

}  // namespace transmatcher_fast
