// sigmoid(score_embed), computed once per call in float32 and read by every tile of every pair.
#include <algorithm>

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

// out[c, r] = in[r, c] for the rows < `rows` (out rows `stride` floats apart); 32x32 tiles
// through shared memory (both sides coalesced).
__global__ void transpose_kernel(const float* __restrict__ in, float* __restrict__ out, int rows,
                                 int cols, int stride) {
  __shared__ float tile[32][33];
  const int r0 = blockIdx.y * 32, c0 = blockIdx.x * 32;
  for (int y = threadIdx.y; y < 32; y += blockDim.y)
    if (r0 + y < rows && c0 + threadIdx.x < cols)
      tile[y][threadIdx.x] = in[static_cast<int64_t>(r0 + y) * cols + c0 + threadIdx.x];
  __syncthreads();
  for (int y = threadIdx.y; y < 32; y += blockDim.y)
    if (c0 + y < cols && r0 + threadIdx.x < rows)
      out[static_cast<int64_t>(c0 + y) * stride + r0 + threadIdx.x] = tile[threadIdx.x][y];
}

// out[c, r] = in[0, c] for rows <= r < stride: the padding columns repeat column 0.
__global__ void pad_columns_kernel(const float* __restrict__ in, float* __restrict__ out, int rows,
                                   int cols, int stride) {
  const int pad = stride - rows;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       k < static_cast<int64_t>(cols) * pad; k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(k / pad), r = rows + static_cast<int>(k % pad);
    out[static_cast<int64_t>(c) * stride + r] = in[c];
  }
}

}  // namespace

cudaError_t launch_gate_transpose(const float* in, float* out, int64_t rows, int64_t cols,
                                  int64_t stride, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  if (stride < rows || stride > 0x7fffffff || cols > 0x7fffffff || (rows + 31) / 32 > 65535)
    return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>((cols + 31) / 32), static_cast<unsigned>((rows + 31) / 32));
  transpose_kernel<<<grid, dim3(32, 8), 0, stream>>>(in, out, static_cast<int>(rows),
                                                     static_cast<int>(cols), static_cast<int>(stride));
  TMF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (stride == rows) return cudaSuccess;
  const int64_t pads = cols * (stride - rows);
  pad_columns_kernel<<<static_cast<unsigned>(std::min<int64_t>((pads + 255) / 256, 1024)), 256, 0,
                       stream>>>(in, out, static_cast<int>(rows), static_cast<int>(cols),
                                 static_cast<int>(stride));
  return cudaGetLastError();
}

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
