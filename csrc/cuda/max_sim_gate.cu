// sigmoid(score_embed), computed once per call in float32 and read by every tile of every pair.
#include "common.cuh"
#include "max_sim_cuda.cuh"

namespace transmatcher_fast {
namespace cuda {
namespace {

__global__ void sigmoid_kernel(const float* __restrict__ logits, float* __restrict__ gate,
                               int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += stride) {
    gate[k] = 1.0f / (1.0f + expf(-logits[k]));  // expf, not __expf: full precision
  }
}

}  // namespace

cudaError_t launch_sigmoid(const float* logits, float* gate, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  sigmoid_kernel<<<static_cast<unsigned>(blocks < 4096 ? blocks : 4096), threads, 0, stream>>>(
      logits, gate, n);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace transmatcher_fast
