// Defines the raw kernel ops in the namespace `transmatcher_fast_C`; each device file
// (cpu/max_sim_cpu.cpp, cuda/...) registers its implementation under its dispatch key.
// The user-facing op (`transmatcher_fast::max_sim`: validation, autograd, fake, autocast) is
// defined in Python (transmatcher_fast/ops/max_sim.py) and calls these.
#include <Python.h>
#include <torch/library.h>

namespace transmatcher_fast {

// max_sim_forward: for every (query i, gallery j) pair, with S[s,t] = <gallery[j,s], query[i,t]> *
// sigmoid(score_embed[s,t]) (never materialised), writes q_best[i,j,t] = max_s S, g_best[i,j,s] =
// max_t S and their int32 argmax (lowest index among equal maxima; NaN wins). Inputs: contiguous,
// one dtype: float32/float64 on CPU (outputs in that dtype); float32/float16/bfloat16 on CUDA
// (cuda/max_sim_cuda.cpp: outputs, gate and gradients in float32).
// allow_tf32: float32 inputs may use TF32 tensor cores (the caller reads torch's precision
// setting, legacy or new API, once in Python); query_group: CUDA launch order, query block
// regions per gallery strip (0 = the kernel's default). The CPU kernel ignores both.
// max_sim_backward: gradients from the saved argmax only; the gradients given are overwritten.
TORCH_LIBRARY(transmatcher_fast_C, m) {
  m.def(
      "max_sim_forward(Tensor query, Tensor gallery, Tensor? score_embed, Tensor(a!) q_best, "
      "Tensor(b!) g_best, Tensor(c!) q_index, Tensor(d!) g_index, bool allow_tf32=False, "
      "int query_group=0) -> ()");
  // Benchmarks only (the GPU suite's ncu ablations; CUDA only, cuda/max_sim_cuda.cpp): the
  // forward with ablation "full", "gate_off", "max_only" (no argmax) or "mma_only" (no epilogue).
  m.def(
      "max_sim_forward_ablation(Tensor query, Tensor gallery, Tensor? score_embed, "
      "Tensor(a!) q_best, Tensor(b!) g_best, Tensor(c!) q_index, Tensor(d!) g_index, "
      "bool allow_tf32, int query_group, str ablation) -> ()");
  m.def(
      "max_sim_backward(Tensor? grad_q_best, Tensor? grad_g_best, Tensor query, Tensor gallery, "
      "Tensor? score_embed, Tensor q_best, Tensor g_best, Tensor q_index, Tensor g_index, "
      "Tensor(a!)? grad_query, Tensor(b!)? grad_gallery, Tensor(c!)? grad_score_embed) -> ()");
}

}  // namespace transmatcher_fast

// A bare Python module: importing `transmatcher_fast._C` runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                                          nullptr, nullptr, nullptr, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) {
#ifdef TRANSMATCHER_FAST_WITH_CUDA
    PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
    PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  }
  return module;
}
