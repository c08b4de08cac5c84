// Forward kernel of max_sim on Hopper's warpgroup MMA (wgmma, HGMMA in the SASS): a variant
// beside the mma.sync kernel of max_sim_forward.cu, selected with ForwardArgs::query_group ==
// kForwardWgmma (max_sim_cuda.cuh) and measured against it by the GPU suite's sweep.
//
// Why wgmma (issue 24). The mma.sync kernel cannot reach the goal of 70 % of the cuBLAS GEMM
// rate on an H100/H200 whatever its epilogue does: mma.sync (HMMA) is a per-warp instruction
// with register operands that is commonly measured at about 60-65 % of the wgmma peak on sm_90,
// while cuBLAS runs HGMMA. So the main loop has to move to wgmma; the epilogue fixes alone would
// leave the ceiling where it is. CUTLASS/CuTe would bring a TMA + warp-specialised main loop, but
// our epilogue (two max + argmax reductions with exact tie/NaN rules, S never stored) is none of
// its epilogues, the headers would be one more build dependency to carry to an offline GPU
// machine, and nothing can run here to check a port. So this kernel is hand-written, small and
// checkable by reading: operands are staged with cp.async (as in the mma.sync kernel) into the
// no-swizzle core-matrix layout that wgmma reads through shared-memory descriptors (common.cuh:
// interleave_offset, smem_descriptor, checked on the host by tests/test_cuda_build.py). TMA,
// 128-byte swizzle and a producer warp with setmaxnreg are the next step, once a GPU has said
// this one is correct.
//
// Work split: a tile is one query image i (a pass of up to 192 of its locations: one 64-row
// slice per warpgroup, 3 warpgroups) against one whole gallery image j (N = Lg rounded up to 64,
// 128 or 192; Lg <= 192). A tile holds complete rows and columns of one image pair, so both
// maxima come out of it (for Lq > 192, out of that pair's passes, all in one block): no segments,
// no atomics, deterministic. The grid is persistent: block b takes pairs b, b + grid, ... in the
// grouped order of the mma.sync kernel (grouped_block_region over images), so the blocks in
// flight share a band of query images and read each gallery image from L2.
//
// Pipeline: kStagesW stages of 32 features (two wgmma k16 steps) stream over every (pair, pass,
// k) step of the block without a break at tile ends: while a tile's epilogue runs, the next
// tile's first stages are already loading. Each thread copies one stage row whole (one pointer a
// tile, four cp.async with immediate offsets a step) and the K loop is unrolled by the stage
// count with every stage offset an immediate, so D must be a multiple of 128.
//
// Epilogue, two passes per direction and no serial scans: scores gated in place with one FMA
// (+0.0 and the GPU's canonical NaN make equal scores bit-equal); the maximum with the
// NaN-propagating max.NaN, then the index as the lowest location whose score has the maximum's
// bits (one integer compare and one select a score). Rows: each thread's columns, then the quad.
// Columns: through shared memory, two threads a column fold the per-(warp, lane row) maxima, the
// maximum goes back to every thread, which marks its lower row holding it, and the two threads
// take the lowest mark. The rules are those of every backend: among equal maxima the lowest
// index; a NaN wins and the lowest-index NaN stays; -0.0 and +0.0 are equal.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "max_sim_cuda.cuh"

namespace transmatcher_fast {
namespace cuda {
namespace {

constexpr int kWgThreads = 128;
constexpr int kWarpgroups = 3;
constexpr int kThreadsW = kWarpgroups * kWgThreads;  // 384
constexpr int kRowsPerPass = 64 * kWarpgroups;       // 192 query locations per pass
constexpr int kMaxN = 192;
constexpr int kStagesW = 4;
constexpr int kAhead = kStagesW - 2;  // loads run this many steps ahead of the math
constexpr int kBkW = 32;              // features per stage: two wgmma k16 steps
constexpr int kRowBytesW = kBkW * 2;  // bytes per stage row (16-bit features)

template <int N>
struct WgmmaShape {
  static constexpr int kStageBytes = (kRowsPerPass + N) * kRowBytesW;
  static constexpr int kEntries = kRowsPerPass / 2;  // (warp, g) entries of a column: 96
  static constexpr int kScratchStride = N + 8;      // conflict-free 8-byte writes of lanes g, tq
  // After the stages: each entry's column maxima (fp32), the column maxima, each entry's marks
  // (the lowest of its two rows holding the column max: 0, 8 or kNoRow; one byte).
  static constexpr int kScratchOffset = kStagesW * kStageBytes;
  static constexpr int kColumnMaxOffset = kScratchOffset + kEntries * kScratchStride * 4;
  static constexpr int kScratchRowOffset = kColumnMaxOffset + N * 4;
  // Then each thread's load sources: [0] the tile being loaded, [1] the one after.
  static constexpr int kSourceOffset = (kScratchRowOffset + kEntries * kScratchStride + 15) / 16 * 16;
  static constexpr int kDescOffset = kSourceOffset + kThreadsW * 2 * 24;  // A's, per warpgroup
  static constexpr int kSmemBytes = kDescOffset + kWarpgroups * 8;
};

template <typename T>
struct WgParams {
  const T* query;
  const T* gallery;
  const float* gate_t;  // sigmoid(E)^T [lq, lg] + kMaxN floats of padding, or null
  float* q_best;
  float* g_best;
  int32_t* q_index;
  int32_t* g_index;
  int64_t nq, ng;
  int lq, lg, d;
  int64_t query_group;  // images per band of the launch order
  int k_steps;          // d / kBkW: a multiple of kStagesW (wgmma_forward_supports)
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TMF_WGMMA_ENABLED 1
#endif

// 1 in device code built for sm_90a (the kernel), 0 elsewhere (sm_80, or plain sm_90: its
// binaryVersion is 90 as well, but its kernel body is a trap). Read once per device.
#ifdef TMF_WGMMA_ENABLED
__device__ int wgmma_kernel_built = 1;
#else
__device__ int wgmma_kernel_built = 0;
#endif

#ifdef TMF_WGMMA_ENABLED
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// cp.async writes through the generic proxy, wgmma reads through the async proxy.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// D (64 x N fp32, the standard fragment layout) += A (64x16, descriptor) * B (Nx16, descriptor)^T,
// both K-major; scale_d = 0 starts from zero (the first k step of a tile).
template <typename T, int N>
struct Wgmma;

// BEGIN GENERATED WGMMA WRAPPERS (one asm per type and N: the operand lists are long)
// clang-format off
template <>
struct Wgmma<__nv_bfloat16, 64> {
  static __device__ __forceinline__ void run(float (&d)[32], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(scale_d));
  }
};
template <>
struct Wgmma<__nv_bfloat16, 128> {
  static __device__ __forceinline__ void run(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
  }
};
template <>
struct Wgmma<__nv_bfloat16, 192> {
  static __device__ __forceinline__ void run(float (&d)[96], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n192k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, %96, %97, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
        : "l"(da), "l"(db), "r"(scale_d));
  }
};
template <>
struct Wgmma<__half, 64> {
  static __device__ __forceinline__ void run(float (&d)[32], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(scale_d));
  }
};
template <>
struct Wgmma<__half, 128> {
  static __device__ __forceinline__ void run(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
  }
};
template <>
struct Wgmma<__half, 192> {
  static __device__ __forceinline__ void run(float (&d)[96], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n192k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, %96, %97, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
        : "l"(da), "l"(db), "r"(scale_d));
  }
};
// clang-format on
// END GENERATED WGMMA WRAPPERS
#endif  // TMF_WGMMA_ENABLED

// The stage row this thread copies, whole (its four 16-byte chunks: 32 features): query row
// tid of the pass (tid < 192) or gallery row tid - 192 (< N; threads past N copy nothing). Kept
// in shared memory (registers are short across the epilogue); a K step reads it and issues four
// cp.async at immediate offsets. Rows past Lq / Lg copy the image's row 0 (why: the epilogue).
template <typename T, int N>
struct RowSource {
  const T* row;    // features 0.. of the row
  int64_t pair;    // i * ng + j: where the tile's outputs go
  uint32_t dst;    // byte offset of the row's first chunk in a stage (interleave layout)
  uint32_t unused;

  __device__ __forceinline__ void set(const WgParams<T>& p, int64_t i, int64_t j, int t0) {
    const int r = threadIdx.x;
    const bool query = r < kRowsPerPass;
    const int at = query ? t0 + r : r - kRowsPerPass;
    const bool real = at < (query ? p.lq : p.lg);
    const int64_t image_row = query ? i * p.lq : j * p.lg;
    pair = i * p.ng + j;
    row = (query ? p.query : p.gallery) + (image_row + (real ? at : 0)) * p.d;
    dst = (query ? 0 : kRowsPerPass * kRowBytesW) +
          interleave_offset(query ? r : r - kRowsPerPass, 0, kRowBytesW);
  }
  // Features k*32 .. k*32+31 into the stage at shared address `stage`.
  __device__ __forceinline__ void issue(uint32_t stage, int k) const {
    if (kRowsPerPass + N < kThreadsW && threadIdx.x >= kRowsPerPass + N) return;
    const T* src = row + k * kBkW;
#pragma unroll
    for (int c = 0; c < kRowBytesW / 16; ++c) {
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(stage + dst + c * 128),
                   "l"(src + c * 8));
    }
  }
};

// Tile `n` of this block (its pair b + n * grid in the grouped order) and pass t0.
struct TileId {
  int64_t n;
  int t0;
};

#ifdef TMF_WGMMA_ENABLED  // device helpers of the kernel body (unused, and flagged, elsewhere)
constexpr uint32_t kNoRow = 0xff;  // a mark: no row of the entry holds the column maximum

// The NaN-propagating maximum (PTX max.NaN: a NaN operand gives the canonical NaN).
__device__ __forceinline__ float max_nan(float a, float b) {
  float out;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(out) : "f"(a), "f"(b));
  return out;
}

__device__ __forceinline__ bool same_bits(float a, float b) {
  return __float_as_uint(a) == __float_as_uint(b);
}

// kIndex false (kAblationMaxOnly): the value alone.
template <bool kIndex>
__device__ __forceinline__ void store_now(float* value_out, int32_t* index_out, float v, int x) {
  asm volatile("st.global.f32 [%0], %1;\n" ::"l"(value_out), "f"(v) : "memory");
  if constexpr (kIndex) asm volatile("st.global.s32 [%0], %1;\n" ::"l"(index_out), "r"(x) : "memory");
}
#endif

// The kernel body; kAbl: kAblationFull, or a benchmark ablation (max_sim_cuda.cuh).
template <typename T, int N, bool kGate, int kAbl>
__device__ __forceinline__ void wgmma_forward_body(const WgParams<T>& p) {
#ifdef TMF_WGMMA_ENABLED
  constexpr bool kIndex = kAbl != kAblationMaxOnly;
  using S = WgmmaShape<N>;
  static_assert(S::kSmemBytes <= 227 * 1024, "more than an sm_90 block's shared memory");
  extern __shared__ __align__(128) unsigned char smem[];
  // Shared-memory areas as functions of the `smem` symbol: pointers held in registers across the
  // tile loop would cost registers the accumulators need.
  auto scratch_v = [&]() { return reinterpret_cast<float*>(smem + S::kScratchOffset); };
  auto column_max = [&]() { return reinterpret_cast<float*>(smem + S::kColumnMaxOffset); };
  auto scratch_r = [&]() { return smem + S::kScratchRowOffset; };
  auto desc_a_of = [&]() { return reinterpret_cast<uint64_t*>(smem + S::kDescOffset); };
  auto srcs = [&](int which) -> RowSource<T, N>& {
    static_assert(sizeof(RowSource<T, N>) == 24, "load sources area");
    return reinterpret_cast<RowSource<T, N>*>(smem + S::kSourceOffset)[2 * threadIdx.x + which];
  };

  const int64_t pairs = p.nq * p.ng;
  const int64_t my_pairs =
      pairs > blockIdx.x ? (pairs - 1 - blockIdx.x) / gridDim.x + 1 : 0;
  // Pair n of this block in the grouped order (blockIdx / gridDim re-read: registers are short).
  // 32-bit: exact since pairs < 2**31 (wgmma_forward_supports), and no 64-bit division call.
  auto region = [&](int64_t n) {
    const BlockRegion<uint32_t> r = grouped_block_region<uint32_t>(
        static_cast<uint32_t>(blockIdx.x + n * gridDim.x), static_cast<uint32_t>(p.nq),
        static_cast<uint32_t>(p.ng), static_cast<uint32_t>(p.query_group));
    return BlockRegion<int64_t>{r.gi, r.gj};
  };
  auto next_tile = [&](TileId t) {
    t.t0 += kRowsPerPass;
    if (t.t0 >= p.lq) {
      t.t0 = 0;
      ++t.n;
    }
    return t;
  };
  auto set_source = [&](RowSource<T, N>& src, TileId t) {
    if (t.n >= my_pairs) return;
    const BlockRegion<int64_t> r = region(t.n);
    src.set(p, r.gi, r.gj, t.t0);
  };
  // Steps run over (tile, k), the loads kAhead steps ahead of the math across tile ends
  // (k_steps >= kAhead, wgmma_forward_supports checks): a step's load is of this tile or of the
  // next one, whose source is set before the K loop.
  TileId tile{0, 0};
  const uint32_t smem_base = smem_addr(smem);
  set_source(srcs(0), tile);
  if (my_pairs > 0) {
#pragma unroll
    for (int st = 0; st < kAhead; ++st) {
      srcs(0).issue(smem_base + st * S::kStageBytes, st);
      cp_async_commit();
    }
  }

  float acc[N / 2];
#pragma unroll
  for (int e = 0; e < N / 2; ++e) acc[e] = 0.0f;  // warpgroups past Lq read, but never use, them
  float kept = 0.0f;  // kAblationMmaOnly: every accumulator added up
  // Stage 0's descriptors: B (the gallery rows) is the same for all; A (the query rows) is each
  // warpgroup's 64-row slice, read back from shared memory at every step (held in registers,
  // the compiler rebuilds it from threadIdx.x each time: the accumulators need the registers).
  const uint64_t desc_b = smem_descriptor(smem_base + kRowsPerPass * kRowBytesW, 128, 8 * kRowBytesW);
  if (threadIdx.x < kWarpgroups)
    desc_a_of()[threadIdx.x] = smem_descriptor(smem_base + threadIdx.x * 64 * kRowBytesW, 128, 8 * kRowBytesW);
  __syncthreads();
  for (; tile.n < my_pairs; tile = next_tile(tile)) {
    const TileId after = next_tile(tile);
    const bool has_next = after.n < my_pairs;
    set_source(srcs(1), after);
    const int t0 = tile.t0;
    const int wg = threadIdx.x / kWgThreads;
    const bool active = t0 + 64 * wg < p.lq;  // warpgroups past Lq skip the math
    // Step k of the tile uses stage k % kStagesW (k_steps is a multiple of kStagesW: each tile
    // starts at stage 0), so the loop is unrolled by kStagesW and every stage offset is an
    // immediate. Step k loads step k + kAhead: of this tile, or of the next one.
    auto k_step = [&](int k, auto stage_constant) {
      constexpr int stage = decltype(stage_constant)::value;
      constexpr uint32_t load_bytes = ((stage + kAhead) % kStagesW) * S::kStageBytes;
      constexpr uint32_t desc_step = stage * (S::kStageBytes >> 4);  // the address field, >> 4
      cp_async_wait<kAhead - 1>();
      fence_proxy_async();
      __syncthreads();  // step k landed for all; the wgmma two steps back is done everywhere
      const int ahead = k + kAhead;
      const bool same = ahead < p.k_steps;
      if (same || has_next) {
        const RowSource<T, N> src = srcs(same ? 0 : 1);  // in registers for the four copies
        src.issue(smem_base + load_bytes, same ? ahead : ahead - p.k_steps);
      }
      cp_async_commit();
      if (active) {
        // LBO 128: the next 16-byte chunk along K; SBO: the next 8 rows. Stages differ in the
        // address field only (no carry: shared addresses < 256 KB).
        const uint64_t desc_a = desc_a_of()[threadIdx.x / kWgThreads];
        wgmma_fence();
        Wgmma<T, N>::run(acc, desc_a + desc_step, desc_b + desc_step, stage == 0 && k == 0 ? 0 : 1);
        Wgmma<T, N>::run(acc, desc_a + desc_step + (256 >> 4), desc_b + desc_step + (256 >> 4), 1);
        wgmma_commit();  // chunks 2, 3 (+256 bytes) above
      }
      wgmma_wait<1>();
    };
    static_assert(kStagesW == 4, "the unrolled steps below");
#pragma unroll 1
    for (int k = 0; k < p.k_steps; k += kStagesW) {
      k_step(k, std::integral_constant<int, 0>{});
      k_step(k + 1, std::integral_constant<int, 1>{});
      k_step(k + 2, std::integral_constant<int, 2>{});
      k_step(k + 3, std::integral_constant<int, 3>{});
    }
    wgmma_wait<0>();
    // The accumulators are final only now: keep every use of them below this point.
#pragma unroll
    for (int e = 0; e < N / 2; ++e) asm volatile("" : "+f"(acc[e])::"memory");
    if constexpr (kAbl == kAblationMmaOnly) {  // no epilogue: one add a score
#pragma unroll
      for (int e = 0; e < N / 2; ++e) kept += acc[e];
      srcs(0) = srcs(1);
      continue;
    }

    // ---- epilogue of tile (pair, t0): max first, then the lowest index with the max's bits ----
    // Thread coordinates from an opaque copy of threadIdx.x: computed here, not hoisted out of
    // the tile loop into registers the accumulators need.
    int tid = threadIdx.x;
    asm volatile("" : "+r"(tid));
    const int wi = (tid % kWgThreads) / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
    const int row0 = 64 * wg + 16 * wi + g;  // this thread's rows of the pass: row0, row0 + 8
    const bool ok0 = active && t0 + row0 < p.lq, ok1 = active && t0 + row0 + 8 < p.lq;
    const int64_t pair = srcs(0).pair;  // (a 64-bit division here would spill around its call)
    // Scores: acc[4 nb + e] is (row0, column 8 nb + 2 tq + e), acc[4 nb + 2 + e] the same column
    // of row0 + 8. Gated with one FMA (+0.0 turns -0.0 into +0.0, and NVIDIA GPUs write every NaN
    // result as the canonical 0x7FFFFFFF), so equal scores have equal bits and an index is found
    // by one integer compare. (A nonzero product below 2**-149 in magnitude still rounds to a
    // signed zero: such a -0.0 can lose a tie with +0.0 to a higher index; one more add a score
    // would close that, for scores of ~1e-45.) Padding needs no mask: padding rows (past Lq) and columns (past Lg)
    // copied the image's location 0 and read its gate (gate_t repeats column 0), so they hold
    // exactly location 0's scores: equal to a real score at a lower index, they can neither raise
    // a maximum nor win its index. (In a pass t0 > 0 location 0 is in an earlier pass, whose
    // stored column result they can only tie, and ties keep the stored one.) Warpgroups wholly
    // past Lq skip the MMA; their column entries are -inf instead.
    {
      const float* gate0 = p.gate_t + (ok0 ? t0 + row0 : 0) * N + 2 * tq;
      const float* gate1 = p.gate_t + (ok1 ? t0 + row0 + 8 : 0) * N + 2 * tq;
#pragma unroll
      for (int nb = 0; nb < N / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& v0 = acc[4 * nb + e];
          float& v1 = acc[4 * nb + 2 + e];
          v0 = kGate ? fmaf(v0, __ldg(gate0 + 8 * nb + e), 0.0f) : v0 + 0.0f;
          v1 = kGate ? fmaf(v1, __ldg(gate1 + 8 * nb + e), 0.0f) : v1 + 0.0f;
        }
        // The gate in groups of 32 loads: all 96 hoisted at once need registers the scores hold.
        if (kGate && nb % 8 == 7) asm volatile("" ::: "memory");
      }
    }
    // Rows (best gallery location of each query location): the max over the thread's columns,
    // then over the quad (tq = 0..3 hold the row's columns); the index: the lowest column with
    // the max's bits, scanned from the highest (positions 8 nb + e are immediates; 2 tq is added
    // after), then the lowest over the quad.
    {
      float best0 = acc[0], best1 = acc[2];
#pragma unroll
      for (int nb = 0; nb < N / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (nb == 0 && e == 0) continue;
          best0 = max_nan(best0, acc[4 * nb + e]);
          best1 = max_nan(best1, acc[4 * nb + 2 + e]);
        }
      }
#pragma unroll
      for (int m = 1; m <= 2; m <<= 1) {
        best0 = max_nan(best0, __shfl_xor_sync(0xffffffffu, best0, m));
        best1 = max_nan(best1, __shfl_xor_sync(0xffffffffu, best1, m));
      }
      int at0 = 0, at1 = 0;
      if constexpr (kIndex) {
        at0 = at1 = 0x7fff;
#pragma unroll
        for (int nb = N / 8 - 1; nb >= 0; --nb) {
#pragma unroll
          for (int e = 1; e >= 0; --e) {
            at0 = same_bits(acc[4 * nb + e], best0) ? 8 * nb + e : at0;
            at1 = same_bits(acc[4 * nb + 2 + e], best1) ? 8 * nb + e : at1;
          }
        }
        at0 += 2 * tq;
        at1 += 2 * tq;
#pragma unroll
        for (int m = 1; m <= 2; m <<= 1) {
          at0 = min(at0, __shfl_xor_sync(0xffffffffu, at0, m));
          at1 = min(at1, __shfl_xor_sync(0xffffffffu, at1, m));
        }
        at0 = min(at0, p.lg - 1);  // in range even if a NaN came with another payload
        at1 = min(at1, p.lg - 1);
      }
      if (tq == 0 && ok0)
        store_now<kIndex>(p.q_best + pair * p.lq + t0 + row0, p.q_index + pair * p.lq + t0 + row0, best0, at0);
      if (tq == 0 && ok1)
        store_now<kIndex>(p.q_best + pair * p.lq + t0 + row0 + 8, p.q_index + pair * p.lq + t0 + row0 + 8, best1, at1);
    }

    // Columns (best query location of each gallery location), through shared memory: entry
    // (warp, g) of a column holds the max of its rows row0 and row0 + 8; two threads a column
    // fold the 96 entries, and the max goes back to every thread, which marks its lowest row
    // holding it; the same two threads then take the lowest marked row.
    const int entry = (wg * 4 + wi) * 8 + g;
    {
      float* sv = scratch_v() + entry * S::kScratchStride + 2 * tq;
      if (active) {
#pragma unroll
        for (int nb = 0; nb < N / 8; ++nb) {
          *reinterpret_cast<float2*>(sv + 8 * nb) = make_float2(
              max_nan(acc[4 * nb], acc[4 * nb + 2]), max_nan(acc[4 * nb + 1], acc[4 * nb + 3]));
        }
      } else {
#pragma unroll
        for (int nb = 0; nb < N / 8; ++nb)
          *reinterpret_cast<float2*>(sv + 8 * nb) = make_float2(-INFINITY, -INFINITY);
      }
    }
    __syncthreads();  // entries complete
    const int col = tid / 2, half = tid % 2;  // entries half, half + 2, ...: no bank conflict
    float cmax = -INFINITY;
    if (col < N) {
#pragma unroll
      for (int e = half; e < S::kEntries; e += 2) cmax = max_nan(cmax, scratch_v()[e * S::kScratchStride + col]);
    }
    cmax = max_nan(cmax, __shfl_xor_sync(0xffffffffu, cmax, 1));
    if constexpr (!kIndex) {
      if (half == 0 && col < p.lg) {
        const int64_t out = pair * p.lg + col;
        p.g_best[out] = t0 == 0 ? cmax : max_nan(cmax, p.g_best[out]);
      }
      srcs(0) = srcs(1);
      continue;  // the next epilogue rewrites the scratch only after the next K loop's barriers
    }
    if (half == 0 && col < N) column_max()[col] = cmax;
    __syncthreads();  // column maxima complete
    {
      uint8_t* sr = scratch_r() + entry * S::kScratchStride + 2 * tq;
      const uint32_t row_lo = static_cast<uint32_t>(row0), row_hi = row_lo + 8;  // < kNoRow
#pragma unroll
      for (int nb = 0; nb < N / 8; ++nb) {
        const float2 m = *reinterpret_cast<const float2*>(column_max() + 8 * nb + 2 * tq);
        uint32_t r0 = same_bits(acc[4 * nb + 2], m.x) ? row_hi : kNoRow;
        uint32_t r1 = same_bits(acc[4 * nb + 3], m.y) ? row_hi : kNoRow;
        r0 = same_bits(acc[4 * nb], m.x) ? row_lo : r0;
        r1 = same_bits(acc[4 * nb + 1], m.y) ? row_lo : r1;
        sr[8 * nb] = static_cast<uint8_t>(r0);
        sr[8 * nb + 1] = static_cast<uint8_t>(r1);
      }
    }
    __syncthreads();  // marks complete
    {
      uint32_t best_row = kNoRow;
      if (col < N) {
#pragma unroll
        for (int e = half; e < S::kEntries; e += 2)
          best_row = min(best_row, static_cast<uint32_t>(scratch_r()[e * S::kScratchStride + col]));
      }
      best_row = min(best_row, __shfl_xor_sync(0xffffffffu, best_row, 1));
      if (half == 0 && col < p.lg) {
        const int64_t out = pair * p.lg + col;
        const int ci = t0 + static_cast<int>(min(best_row, static_cast<uint32_t>(p.lq - 1 - t0)));
        // A later pass holds higher query locations: the stored maximum wins ties and keeps
        // a NaN; it is replaced only where the NaN-propagating max changes its bits.
        const float merged = t0 == 0 ? cmax : max_nan(cmax, p.g_best[out]);
        if (t0 == 0 || !same_bits(merged, p.g_best[out])) {
          p.g_best[out] = cmax;
          p.g_index[out] = ci;
        }
      }
    }
    // The next tile's source (its first loads were issued from [1]). The next epilogue rewrites
    // the scratch only after the next K loop's barriers.
    srcs(0) = srcs(1);
  }
  if constexpr (kAbl == kAblationMmaOnly) {
    const int64_t at = static_cast<int64_t>(blockIdx.x) * kThreadsW + threadIdx.x;
    if (at < p.nq * p.ng * p.lq) p.q_best[at] = kept;
  }
  cp_async_wait<0>();
#else
  (void)p;
  __trap();  // built without sm_90a: launch_forward_wgmma never launches this (wgmma_kernel_built)
#endif
}

template <typename T, int N, bool kGate>
__global__ void __launch_bounds__(kThreadsW, 1) max_sim_forward_wgmma_kernel(const WgParams<T> p) {
  wgmma_forward_body<T, N, kGate, kAblationFull>(p);
}

// The benchmark ablations (max_sim_cuda.cuh): N = 192 with a gate (the suite's ncu shape).
template <typename T, int kAbl>
__global__ void __launch_bounds__(kThreadsW, 1) max_sim_forward_wgmma_ablation_kernel(const WgParams<T> p) {
  wgmma_forward_body<T, 192, true, kAbl>(p);
}

// Whether the device's loaded code is the sm_90a build (wgmma_kernel_built), cached per device.
cudaError_t wgmma_built_for_device(bool* built) {
  constexpr int kDevices = 64;
  static std::atomic<int8_t> known[kDevices] = {};  // 0 unknown, 1 no, 2 yes
  int device = 0;
  TMF_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  if (device < kDevices && known[device].load() != 0) {
    *built = known[device].load() == 2;
    return cudaSuccess;
  }
  int flag = 0;
  TMF_CUDA_RETURN_IF_ERROR(cudaMemcpyFromSymbol(&flag, wgmma_kernel_built, sizeof(flag)));
  *built = flag == 1;
  if (device < kDevices) known[device].store(*built ? 2 : 1);
  return cudaSuccess;
}

template <typename T, int N, bool kGate, int kAbl = kAblationFull>
cudaError_t launch_wgmma_typed(const ForwardArgs& a, cudaStream_t stream, bool* launched) {
  auto kernel = max_sim_forward_wgmma_kernel<T, N, kGate>;
  if constexpr (kAbl != kAblationFull) kernel = max_sim_forward_wgmma_ablation_kernel<T, kAbl>;
  bool built = false;
  TMF_CUDA_RETURN_IF_ERROR(wgmma_built_for_device(&built));
  if (!built) return cudaSuccess;  // no sm_90a code for this device: the mma.sync kernel runs
  const Shape& sh = a.shape;
  WgParams<T> p;
  p.query = static_cast<const T*>(a.query);
  p.gallery = static_cast<const T*>(a.gallery);
  p.gate_t = a.gate_t;
  p.q_best = a.q_best;
  p.g_best = a.g_best;
  p.q_index = a.q_index;
  p.g_index = a.g_index;
  p.nq = sh.nq;
  p.ng = sh.ng;
  p.lq = static_cast<int>(sh.lq);
  p.lg = static_cast<int>(sh.lg);
  p.d = static_cast<int>(sh.d);
  p.query_group = effective_query_group(0, sh.nq);
  p.k_steps = static_cast<int>((sh.d + kBkW - 1) / kBkW);
  int device = 0, sms = 0;
  TMF_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  TMF_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t blocks = std::min<int64_t>(sh.nq * sh.ng, sms);
  if (kGate)
    TMF_CUDA_RETURN_IF_ERROR(launch_gate_transpose(a.gate, a.gate_t, sh.lg, sh.lq, N, stream));
  TMF_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, WgmmaShape<N>::kSmemBytes));
  kernel<<<static_cast<unsigned>(blocks), kThreadsW, WgmmaShape<N>::kSmemBytes, stream>>>(p);
  *launched = true;
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_wgmma_dtype(const ForwardArgs& a, cudaStream_t stream, bool* launched) {
  const int64_t lg = a.shape.lg;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // (forward_ablation_supported: checked)
    if (a.ablation == kAblationMaxOnly)
      return launch_wgmma_typed<T, 192, true, kAblationMaxOnly>(a, stream, launched);
    if (a.ablation == kAblationMmaOnly)
      return launch_wgmma_typed<T, 192, true, kAblationMmaOnly>(a, stream, launched);
  }
  if (a.gate != nullptr) {
    if (lg <= 64) return launch_wgmma_typed<T, 64, true>(a, stream, launched);
    if (lg <= 128) return launch_wgmma_typed<T, 128, true>(a, stream, launched);
    return launch_wgmma_typed<T, 192, true>(a, stream, launched);
  }
  if (lg <= 64) return launch_wgmma_typed<T, 64, false>(a, stream, launched);
  if (lg <= 128) return launch_wgmma_typed<T, 128, false>(a, stream, launched);
  return launch_wgmma_typed<T, 192, false>(a, stream, launched);
}

}  // namespace

int64_t wgmma_gate_floats(const Shape& shape) {
  const int64_t n = shape.lg <= 64 ? 64 : shape.lg <= 128 ? 128 : std::max<int64_t>(shape.lg, 192);
  return shape.lq * n;
}

bool wgmma_forward_supports(const ForwardArgs& a) {
  const Shape& sh = a.shape;
  if (a.gate != nullptr && a.gate_t == nullptr) return false;
  // Whole groups of kStagesW stages (D % 128 == 0: the K loop copies whole rows with no feature
  // bound, and each tile starts at stage 0; other D run the mma.sync kernel), so at least kAhead
  // k steps; fewer than 2**31 pairs (32-bit launch order) and gate floats (32-bit offsets).
  return a.dtype != DType::kFloat32 && sh.lg <= kMaxN && sh.d % (kBkW * kStagesW) == 0 &&
         sh.d >= kAhead * kBkW && sh.nq * sh.ng < (int64_t{1} << 31) &&
         sh.lq * kMaxN < (int64_t{1} << 31) &&  // 32-bit gate offsets
         reinterpret_cast<uintptr_t>(a.query) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(a.gallery) % 16 == 0;
}

cudaError_t launch_forward_wgmma(const ForwardArgs& args, cudaStream_t stream, bool* launched) {
  *launched = false;
  if (args.shape.nq == 0 || args.shape.ng == 0) {
    *launched = true;
    return cudaSuccess;
  }
  if (!wgmma_forward_supports(args)) return cudaSuccess;
  if (args.dtype == DType::kBFloat16)
    return launch_wgmma_dtype<__nv_bfloat16>(args, stream, launched);
  return launch_wgmma_dtype<__half>(args, stream, launched);
}

}  // namespace cuda
}  // namespace transmatcher_fast
