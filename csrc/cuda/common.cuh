// Device helpers shared by the max_sim CUDA kernels: the forward's block launch order (host and
// device, so tests/test_cuda_build.py checks it on a CPU), the max rule, element conversion and
// thin wrappers of the sm_80+ PTX the forward kernel uses (cp.async, ldmatrix, mma.sync).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace transmatcher_fast {
namespace cuda {

#define TMF_CUDA_RETURN_IF_ERROR(expr)       \
  do {                                       \
    const cudaError_t tmf_err_ = (expr);     \
    if (tmf_err_ != cudaSuccess) return tmf_err_; \
  } while (0)

// Launch order of the forward kernel's block regions (a grid of num_q query regions x num_g
// gallery regions, one block each). Grouped like Triton's GROUP_M matmul swizzle: blocks come in
// bands of `group` query regions; inside a band consecutive blocks walk the band's query regions
// (gi fastest) for one gallery region gj, then the next gj, so the gallery region is fetched from
// DRAM once per band and served from L2 to the other group - 1 blocks, while the band's query
// regions stay resident in L2 for the band's whole gallery sweep. The last band is ragged when
// group does not divide num_q. group == 1 is the plain gallery sweep (gi = pid / num_g,
// gj = pid % num_g). Every (gi, gj) is visited exactly once for any group >= 1 (group > num_q
// acts as num_q).
//
// I: the index type. Every intermediate is <= max(pid, num_q * num_g), so any type that holds
// the block count is exact: int64_t, or uint32_t since the 1-D grid has at most 2**31 - 1
// blocks (launch_typed checks). The kernel picks per architecture (RegionIndex in
// max_sim_forward.cu); the host test checks that both give the same order.
template <typename I>
struct BlockRegion {
  I gi, gj;
};

template <typename I>
__host__ __device__ __forceinline__ BlockRegion<I> grouped_block_region(I pid, I num_q, I num_g,
                                                                        I group) {
  group = group < 1 ? I(1) : (group > num_q ? num_q : group);
  const I band_blocks = group * num_g;  // <= num_q * num_g: no overflow
  const I band = pid / band_blocks;
  const I first_q = band * group;
  const I rows = num_q - first_q < group ? I(num_q - first_q) : group;  // ragged last band
  const I within = pid - band * band_blocks;
  const I gj = within / rows;
  return {I(first_q + (within - gj * rows)), gj};
}

// Query regions per band when the caller passes query_group = 0. At evaluation sizes (256 x 4096
// images, L = 192, D = 512, bf16: regions of 2 images, 393 KB each; 128 x 2048 regions; 264
// resident blocks on an H100/H200) the plain sweep keeps one query region and ~264 gallery
// regions (~100 MB) in flight against a 50-60 MB L2, so each gallery region comes from DRAM on
// each of its 128 row passes (~100 GB). With 8 a wave covers 8 query x ~33 gallery regions
// (~16 MB with the query band), each gallery region is fetched 16 times (8x less DRAM traffic,
// ~13 GB: ~3 ms at H200 bandwidth next to an estimated ~60 ms of mma.sync math: not near a
// limit). 16 would halve that again but doubles the band that must stay in L2, which for large
// regions (L = 768, D = 2048: 3 MB per region) would reach the L2 size; 8 is also Triton's
// GROUP_M default. Not measured on a GPU yet: the launch table (ops/tuning.py) can override it.
constexpr int64_t kDefaultQueryGroup = 8;

// The band height a launch uses: 0 = the default, clamped to [1, num_q].
__host__ __device__ __forceinline__ int64_t effective_query_group(int64_t requested,
                                                                  int64_t num_q) {
  const int64_t g = requested <= 0 ? kDefaultQueryGroup : requested;
  return g > num_q ? (num_q < 1 ? 1 : num_q) : g;
}

// The max update rule of every backend: strictly greater wins, so among equal maxima the lowest
// index (visited first) is kept; a NaN wins once and then stays (torch.max keeps the first NaN).
__device__ __forceinline__ bool beats(float value, float best) {
  return value > best || (value != value && best == best);
}

// Combines two candidates of one maximum taken from disjoint location sets, in any order (the
// tree reductions of the wgmma forward): true when (v, i) should replace (best, best_i). It gives
// what a scan in increasing location order with `beats` gives: the lowest-location NaN if there is
// one, else the largest value at its lowest location (-0.0 and +0.0 are equal, so the lower
// location's sign is kept). A negative location is an empty candidate and loses to everything.
__host__ __device__ __forceinline__ bool better_candidate(float v, int i, float best, int best_i) {
  if (i < 0) return false;
  if (best_i < 0) return true;
  const bool v_nan = v != v, best_nan = best != best;
  if (v_nan || best_nan) return v_nan && (!best_nan || i < best_i);
  return v > best || (v == best && i < best_i);
}

// Byte offset of 16-byte chunk `kc` of tile row `row` in wgmma's no-swizzle ("interleave")
// K-major layout: 8x16-byte core matrices of 128 contiguous bytes (8 rows, 8 16-bit features),
// those of one 8-row group side by side along K (leading byte offset 128), then the next 8 rows
// (stride byte offset 8 * row_bytes). row_bytes: bytes of features per row in the stage.
__host__ __device__ __forceinline__ uint32_t interleave_offset(int row, int kc, int row_bytes) {
  return static_cast<uint32_t>((row % 8) * 16 + kc * 128 + (row / 8) * 8 * row_bytes);
}

// wgmma shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address,
// leading and stride byte offsets, each >> 4 in 14 bits; base offset 0; layout type 0 = no swizzle.
__host__ __device__ __forceinline__ uint64_t smem_descriptor(uint32_t addr, uint32_t lbo,
                                                             uint32_t sbo) {
  return (static_cast<uint64_t>((addr >> 4) & 0x3FFF)) |
         (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32);
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T zero_value();
template <>
__device__ __forceinline__ float zero_value<float>() { return 0.0f; }
template <>
__device__ __forceinline__ __half zero_value<__half>() { return __ushort_as_half(0); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_value<__nv_bfloat16>() {
  return __ushort_as_bfloat16(0);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses registers; src_bytes = 0 writes zeros (masking).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 16-bit matrices from shared memory (a shared-window address), fragment layout of
// mma.m16n8k16.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D = A * B + D on tensor cores, fp32 accumulators: 16-bit operands (m16n8k16).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// TF32 operands (m16n8k8): fp32 rounded to nearest TF32, as cuBLAS's TF32 mode does.
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                              uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace cuda
}  // namespace transmatcher_fast
