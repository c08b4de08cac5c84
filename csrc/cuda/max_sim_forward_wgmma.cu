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
// 128-byte swizzle and a producer warp with setmaxnreg (which would take the per-thread load
// work out of the K loop, the largest part of this kernel's static measure) are the next step,
// once a GPU has said this one is correct.
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
// tile's first stages are already loading.
//
// Epilogue, in registers (no serial shared-memory scans): scores gated in place; per row, each
// thread scans its own columns in increasing order (`beats` rule) and the 4 lanes of a quad
// combine with better_candidate (common.cuh: lowest index among equal maxima, a NaN wins and the
// lowest-index NaN stays); per column, each thread folds its two rows, writes (value, row) to a
// shared scratch, and two threads per column fold 48 entries each, then combine by one shuffle.
#include <algorithm>
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
  static constexpr int kScratchEntries = kRowsPerPass / 2;  // 96 row pairs per column
  static constexpr int kScratchStride = N + 8;  // conflict-free 8-byte writes of lanes g, tq
  static constexpr int kScratchBytes = kScratchEntries * kScratchStride * 5;  // fp32 + uint8 row
  // Each thread's load sources of the current and the next tile (registers are short).
  static constexpr int kSrcBytes = kThreadsW * 2 * 48;
  static constexpr int kSmemBytes = kStagesW * kStageBytes + kScratchBytes + kSrcBytes;
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
  int k_steps;          // ceil(d / kBkW) >= kAhead
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TMF_WGMMA_ENABLED 1
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

// Source rows of one tile for this thread, kept in shared memory (registers are short). Chunk c
// (16 bytes) of a stage: row c / 4, chunk c % 4 of the row's 32 features; the thread copies chunks
// tid and tid + 384 of the query slice (rows tid / 4 and 96 + tid / 4 of the pass) and of the
// gallery image (where the row is < N). Rows past Lq / Lg point at the image's row 0 (a valid
// address) and copy zeros; features past D too.
template <typename T, int N>
struct TileSrc {
  const T* src[4];  // query rows tid / 4, +96; gallery rows tid / 4, +96
  int64_t pair;     // i * ng + j: where the tile's outputs go
  uint32_t ok;      // bit r: src[r] is a real row

  __device__ __forceinline__ void set(const WgParams<T>& p, int64_t i, int64_t j, int t0) {
    int row = threadIdx.x / 4;
    const int part = threadIdx.x % 4;
    // Opaque to the compiler: otherwise it hoists the tile-invariant parts out of the tile loop
    // and keeps them in registers the accumulators need (measured: spills at N = 192).
    asm volatile("" : "+r"(row));
    pair = i * p.ng + j;
    const T* a = p.query + i * p.lq * p.d + part * 8;
    const T* b = p.gallery + j * p.lg * p.d + part * 8;
    const bool oks[4] = {t0 + row < p.lq, t0 + row + 96 < p.lq, row < p.lg, row + 96 < N && row + 96 < p.lg};
    const int rows[4] = {t0 + row, t0 + row + 96, row, row + 96};
    ok = 0;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      src[r] = (r < 2 ? a : b) + (oks[r] ? static_cast<int64_t>(rows[r]) * p.d : 0);
      ok |= oks[r] ? 1u << r : 0u;
    }
  }
  // Features k*32 .. k*32+31 into `stage`, in the interleave layout.
  __device__ __forceinline__ void issue(const WgParams<T>& p, unsigned char* stage, int k) const {
    const int row = threadIdx.x / 4, part = threadIdx.x % 4;
    const uint32_t f_ok = k * kBkW + part * 8 < p.d ? 0xfu : 0u;
    const uint32_t live = ok & f_ok;
    constexpr uint32_t kFar = 96 / 8 * 8 * kRowBytesW;  // interleave offset of 96 more rows
    unsigned char* sa = stage + interleave_offset(row, part, kRowBytesW);
    unsigned char* sb = sa + kRowsPerPass * kRowBytesW;
    cp_async_16(sa, src[0] + k * kBkW, live & 1u ? 16 : 0);
    cp_async_16(sa + kFar, src[1] + k * kBkW, live & 2u ? 16 : 0);
    if (row < N) cp_async_16(sb, src[2] + k * kBkW, live & 4u ? 16 : 0);
    if (row + 96 < N) cp_async_16(sb + kFar, src[3] + k * kBkW, live & 8u ? 16 : 0);
  }
};

// Tile `n` of this block (its pair b + n * grid in the grouped order) and pass t0.
struct TileId {
  int64_t n;
  int t0;
};

#ifdef TMF_WGMMA_ENABLED  // device helpers of the kernel body (unused, and flagged, elsewhere)
constexpr uint8_t kNoRow = 0xff;  // scratch: no valid row (passes have < 255 rows)

// Keeps the better of two candidates (better_candidate, common.cuh), branch-free.
__device__ __forceinline__ void combine(float v, int x, float& best, int& best_x) {
  const bool take = better_candidate(v, x, best, best_x);
  best = take ? v : best;
  best_x = take ? x : best_x;
}

// kIndex false (kAblationMaxOnly): the value alone.
template <bool kIndex>
__device__ __forceinline__ void store_now(float* value_out, int32_t* index_out, float v, int x) {
  asm volatile("st.global.f32 [%0], %1;\n" ::"l"(value_out), "f"(v) : "memory");
  if constexpr (kIndex) asm volatile("st.global.s32 [%0], %1;\n" ::"l"(index_out), "r"(x) : "memory");
}

// better_candidate for the column fold with rows 0..254 and kNoRow (255) as the empty row:
// (v, row) replaces (best, best_row) if it is valid and larger, or a NaN over a number, or equal
// (both NaN included) at a lower row. An empty best (-inf, kNoRow) loses to any valid entry.
__device__ __forceinline__ bool column_take(float v, uint32_t row, float best, uint32_t best_row) {
  const bool greater = !(v <= best) && best == best;  // v > best, or v NaN over a number
  const bool tie = (v == best || (v != v && best != best)) && row < best_row;
  return row != kNoRow && (greater || tie);
}

// `beats` (common.cuh) in two compares: v > best or v is NaN, and best is not NaN.
__device__ __forceinline__ bool beats_fast(float v, float best) {
  return !(v <= best) && best == best;
}
#endif

// The kernel body; kAbl: kAblationFull, or a benchmark ablation (max_sim_cuda.cuh).
template <typename T, int N, bool kGate, int kAbl>
__device__ __forceinline__ void wgmma_forward_body(const WgParams<T>& p) {
#ifdef TMF_WGMMA_ENABLED
  constexpr bool kIndex = kAbl != kAblationMaxOnly;
  using S = WgmmaShape<N>;
  static_assert(sizeof(TileSrc<T, N>) * 2 * kThreadsW == S::kSrcBytes, "load sources area");
  static_assert(S::kScratchBytes % 8 == 0, "load sources follow the scratch, 8-byte aligned");
  static_assert(S::kSmemBytes <= 227 * 1024, "more than an sm_90 block's shared memory");
  extern __shared__ __align__(128) unsigned char smem[];
  // Shared-memory areas as functions of the `smem` symbol: pointers held in registers across the
  // tile loop would cost registers the accumulators need.
  auto scratch_v = [&]() { return reinterpret_cast<float*>(smem + kStagesW * S::kStageBytes); };
  auto scratch_r = [&]() {
    return reinterpret_cast<uint8_t*>(smem + kStagesW * S::kStageBytes +
                                      S::kScratchEntries * S::kScratchStride * 4);
  };
  // This thread's load sources: [0] the tile being loaded, [1] the one after (8-byte aligned).
  auto srcs = [&](int which) -> TileSrc<T, N>& {
    return reinterpret_cast<TileSrc<T, N>*>(
        smem + kStagesW * S::kStageBytes + ((S::kScratchBytes + 7) / 8) * 8)[2 * threadIdx.x + which];
  };

  const int64_t pairs = p.nq * p.ng;
  const int64_t my_pairs =
      pairs > blockIdx.x ? (pairs - 1 - blockIdx.x) / gridDim.x + 1 : 0;
  // Pair n of this block in the grouped order (blockIdx / gridDim re-read: registers are short).
  auto region = [&](int64_t n) {
    return grouped_block_region<int64_t>(blockIdx.x + n * gridDim.x, p.nq, p.ng, p.query_group);
  };
  auto next_tile = [&](TileId t) {
    t.t0 += kRowsPerPass;
    if (t.t0 >= p.lq) {
      t.t0 = 0;
      ++t.n;
    }
    return t;
  };
  auto set_src = [&](TileSrc<T, N>& src, TileId t) {
    if (t.n >= my_pairs) return;
    const BlockRegion<int64_t> r = region(t.n);
    src.set(p, r.gi, r.gj, t.t0);
  };
  // Steps run over (tile, k), the loads kAhead steps ahead of the math across tile ends
  // (k_steps >= kAhead, wgmma_forward_supports checks): a step's load is of this tile or of the
  // next one, whose sources are set before the K loop.
  TileId tile{0, 0};
  set_src(srcs(0), tile);
  if (my_pairs > 0) {
#pragma unroll
    for (int st = 0; st < kAhead; ++st) {
      srcs(0).issue(p, smem + st * S::kStageBytes, st);
      cp_async_commit();
    }
  }

  float acc[N / 2];
#pragma unroll
  for (int e = 0; e < N / 2; ++e) acc[e] = 0.0f;  // warpgroups past Lq read, but never use, them
  float kept = 0.0f;  // kAblationMmaOnly: every accumulator added up
  const uint32_t smem_base = smem_addr(smem);
  int stage_idx = 0;  // the math's stage
  for (; tile.n < my_pairs; tile = next_tile(tile)) {
    const TileId after = next_tile(tile);
    const bool has_next = after.n < my_pairs;
    set_src(srcs(1), after);
    const int t0 = tile.t0;
    const int wg = threadIdx.x / kWgThreads;
    const bool active = t0 + 64 * wg < p.lq;  // warpgroups past Lq skip the math
#pragma unroll 1
    for (int k = 0; k < p.k_steps; ++k) {
      cp_async_wait<kAhead - 1>();
      fence_proxy_async();
      __syncthreads();  // step k landed for all; the wgmma two steps back is done everywhere
      int load_stage = stage_idx + kAhead;
      load_stage -= load_stage >= kStagesW ? kStagesW : 0;
      const bool same = k + kAhead < p.k_steps;
      if (same || has_next)
        srcs(same ? 0 : 1).issue(p, smem + load_stage * S::kStageBytes,
                                 same ? k + kAhead : k + kAhead - p.k_steps);
      cp_async_commit();
      if (active) {
        // LBO 128: the next 16-byte chunk along K; SBO: the next 8 rows. Stages differ in the
        // address field only (no carry: shared addresses < 256 KB): one add per stage.
        const uint64_t step = static_cast<uint64_t>(stage_idx * (S::kStageBytes >> 4));
        const uint64_t da = smem_descriptor(smem_base + wg * 64 * kRowBytesW, 128, 8 * kRowBytesW) + step;
        const uint64_t db = smem_descriptor(smem_base + kRowsPerPass * kRowBytesW, 128, 8 * kRowBytesW) + step;
        wgmma_fence();
        Wgmma<T, N>::run(acc, da, db, k == 0 ? 0 : 1);
        Wgmma<T, N>::run(acc, da + (256 >> 4), db + (256 >> 4), 1);  // chunks 2, 3: +256 bytes
        wgmma_commit();
      }
      wgmma_wait<1>();
      stage_idx = stage_idx + 1 == kStagesW ? 0 : stage_idx + 1;
    }
    wgmma_wait<0>();
    if constexpr (kAbl == kAblationMmaOnly) {  // no epilogue: one add a score
#pragma unroll
      for (int e = 0; e < N / 2; ++e) kept += acc[e];
      srcs(0) = srcs(1);
      continue;
    }

    // ---- epilogue of tile (pair, t0) ----
    // Thread coordinates from an opaque copy of threadIdx.x: computed here, not hoisted out of
    // the tile loop into registers the accumulators need (measured: spills at N = 192).
    int tid = threadIdx.x;
    asm volatile("" : "+r"(tid));
    const int wi = (tid % kWgThreads) / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
    const int row0 = 64 * wg + 16 * wi + g;  // this thread's rows of the pass: row0, row0 + 8
    const bool ok0 = active && t0 + row0 < p.lq, ok1 = active && t0 + row0 + 8 < p.lq;
    // Gate row of each row from the thread's first column, then immediate offsets. Masked rows
    // read row 0; masked columns (col >= lg) read into the next row or the padding.
    const float* gate0 = p.gate_t + (ok0 ? t0 + row0 : 0) * p.lg + 2 * tq;
    const float* gate1 = p.gate_t + (ok1 ? t0 + row0 + 8 : 0) * p.lg + 2 * tq;
    // Row scans: each thread scans its columns 8 nb + 2 tq + e in increasing order; positions are
    // kept as 8 nb + e (immediates) and 2 tq is added at the end. The first column is taken as
    // it is (2 tq < lg unless lg <= 6; then none of the thread's columns is valid: -1).
    float best0 = 0.0f, best1 = 0.0f;
    int at0 = -1, at1 = -1;
#pragma unroll
    for (int nb = 0; nb < N / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        // Columns below N - 64 are always < Lg (N is the smallest of 64, 128, 192 >= Lg).
        const bool col_ok = 8 * nb + 8 <= N - 64 || 8 * nb + 2 * tq + e < p.lg;
        float& v0 = acc[4 * nb + e];
        float& v1 = acc[4 * nb + 2 + e];
        if constexpr (kGate) {
          v0 *= __ldg(gate0 + 8 * nb + e);
          v1 *= __ldg(gate1 + 8 * nb + e);
        }
        if (nb == 0 && e == 0) {
          best0 = v0;
          best1 = v1;
          at0 = at1 = col_ok ? 0 : -1;
        } else {
          const bool take0 = col_ok && beats_fast(v0, best0);
          const bool take1 = col_ok && beats_fast(v1, best1);
          best0 = take0 ? v0 : best0;
          best1 = take1 ? v1 : best1;
          if constexpr (kIndex) {
            at0 = take0 ? 8 * nb + e : at0;
            at1 = take1 ? 8 * nb + e : at1;
          }
        }
      }
    }
    at0 = at0 < 0 ? -1 : at0 + 2 * tq;
    at1 = at1 < 0 ? -1 : at1 + 2 * tq;
    // The pair's outputs (read here: not live across the K loop and the gate reads).
    const int64_t pair = srcs(0).pair;
    // Rows: the quad (tq = 0..3) holds the row's columns; lane tq = 0 writes.
#pragma unroll
    for (int m = 1; m <= 2; m <<= 1) {
      if constexpr (kIndex) {
        combine(__shfl_xor_sync(0xffffffffu, best0, m), __shfl_xor_sync(0xffffffffu, at0, m), best0, at0);
        combine(__shfl_xor_sync(0xffffffffu, best1, m), __shfl_xor_sync(0xffffffffu, at1, m), best1, at1);
      } else {  // Lg > 128 here (forward_ablation_supported): every thread has valid columns
        const float o0 = __shfl_xor_sync(0xffffffffu, best0, m);
        const float o1 = __shfl_xor_sync(0xffffffffu, best1, m);
        best0 = beats_fast(o0, best0) ? o0 : best0;
        best1 = beats_fast(o1, best1) ? o1 : best1;
      }
    }
    // Stored now (volatile asm keeps them before the column stores; sunk, they spill).
    if (tq == 0 && ok0)
      store_now<kIndex>(p.q_best + pair * p.lq + t0 + row0, p.q_index + pair * p.lq + t0 + row0, best0, at0);
    if (tq == 0 && ok1)
      store_now<kIndex>(p.q_best + pair * p.lq + t0 + row0 + 8, p.q_index + pair * p.lq + t0 + row0 + 8, best1, at1);
    // Column candidates (after the row results, so the row state is dead: registers are short):
    // for columns 8 nb + 2 tq + {0, 1}, the better of rows row0 and row0 + 8 (row0 first: the
    // lower location; row0 + 8 is valid only if row0 is; no valid row: kNoRow).
    {
      float* sv = scratch_v() + ((wg * 4 + wi) * 8 + g) * S::kScratchStride + 2 * tq;
      uint8_t* sr = scratch_r() + ((wg * 4 + wi) * 8 + g) * S::kScratchStride + 2 * tq;
      const uint32_t row_lo = ok0 ? row0 : kNoRow, row_hi = row0 + 8;
#pragma unroll
      for (int nb = 0; nb < N / 8; ++nb) {
        float cand[2];
        uint32_t crow[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float v0 = acc[4 * nb + e], v1 = acc[4 * nb + 2 + e];
          const bool lower = ok1 && beats_fast(v1, v0);
          cand[e] = lower ? v1 : v0;
          crow[e] = lower ? row_hi : row_lo;
          if constexpr (!kIndex) cand[e] = ok0 ? cand[e] : -INFINITY;  // no valid row: no value
        }
        // volatile asm: stored here, in order (plain stores are sunk to the end and spill).
        asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(smem_addr(sv + 8 * nb)),
                     "f"(cand[0]), "f"(cand[1]) : "memory");
        if constexpr (!kIndex) continue;
        asm volatile("st.shared.u8 [%0], %1;\n" ::"r"(smem_addr(sr + 8 * nb)), "r"(crow[0]) : "memory");
        asm volatile("st.shared.u8 [%0], %1;\n" ::"r"(smem_addr(sr + 8 * nb + 1)), "r"(crow[1]) : "memory");
      }
    }
    __syncthreads();  // scratch complete
    // Columns: thread (col, half) folds its half's 48 entries, then the two halves combine.
    // Entries are not in row order, so ties compare rows: column_take (kNoRow = empty).
    {
      const int col = tid / 2, half = tid % 2;
      float cv = -INFINITY;
      uint32_t cr = kNoRow;
      if (col < N) {
        const int e0 = half * S::kScratchEntries / 2;
#pragma unroll 8
        for (int e = e0; e < e0 + S::kScratchEntries / 2; ++e) {
          const float v = scratch_v()[e * S::kScratchStride + col];
          if constexpr (!kIndex) {
            cv = beats_fast(v, cv) ? v : cv;
            continue;
          }
          const uint32_t row = scratch_r()[e * S::kScratchStride + col];
          const bool take = column_take(v, row, cv, cr);
          cv = take ? v : cv;
          cr = take ? row : cr;
        }
      }
      const float ov = __shfl_xor_sync(0xffffffffu, cv, 1);
      if constexpr (!kIndex) {
        cv = beats_fast(ov, cv) ? ov : cv;
        if (half == 0 && col < p.lg) {
          const int64_t out = pair * p.lg + col;
          if (t0 == 0 || beats(cv, p.g_best[out])) p.g_best[out] = cv;
        }
        srcs(0) = srcs(1);
        continue;
      }
      const uint32_t orow = __shfl_xor_sync(0xffffffffu, cr, 1);
      if (column_take(ov, orow, cv, cr)) {
        cv = ov;
        cr = orow;
      }
      if (half == 0 && col < p.lg && cr != kNoRow) {
        const int64_t out = pair * p.lg + col;
        const int ci = t0 + static_cast<int>(cr);
        // A later pass holds higher query locations: the stored value wins ties.
        if (t0 == 0 || better_candidate(cv, ci, p.g_best[out], p.g_index[out])) {
          p.g_best[out] = cv;
          p.g_index[out] = ci;
        }
      }
    }
    // The next epilogue rewrites the scratch only after the next K loop's barriers.
    srcs(0) = srcs(1);  // the next tile's sources (its first loads were issued from [1])
  }
  if constexpr (kAbl == kAblationMmaOnly) {
    const int64_t at = static_cast<int64_t>(blockIdx.x) * kThreadsW + threadIdx.x;
    if (at < p.nq * p.ng * p.lq) p.q_best[at] = kept;
  }
  cp_async_wait<0>();
#else
  (void)p;
  __trap();  // built without sm_90a: launch_forward_wgmma never launches this
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

template <typename T, int N, bool kGate, int kAbl = kAblationFull>
cudaError_t launch_wgmma_typed(const ForwardArgs& a, cudaStream_t stream, bool* launched) {
  auto kernel = max_sim_forward_wgmma_kernel<T, N, kGate>;
  if constexpr (kAbl != kAblationFull) kernel = max_sim_forward_wgmma_ablation_kernel<T, kAbl>;
  cudaFuncAttributes attr{};
  TMF_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, kernel));
  if (attr.binaryVersion != 90) return cudaSuccess;  // no sm_90a code for this device
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
    TMF_CUDA_RETURN_IF_ERROR(launch_transpose(a.gate, a.gate_t, sh.lg, sh.lq, stream));
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

int64_t wgmma_gate_floats(const Shape& shape) { return shape.lq * shape.lg + kMaxN; }

bool wgmma_forward_supports(const ForwardArgs& a) {
  const Shape& sh = a.shape;
  if (a.gate != nullptr && a.gate_t == nullptr) return false;
  // At least kAhead k steps per tile (the loads run that far ahead); whole 16-byte chunks.
  return a.dtype != DType::kFloat32 && sh.lg <= kMaxN && sh.d % 8 == 0 &&
         sh.d > (kAhead - 1) * kBkW &&
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
