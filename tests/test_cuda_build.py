"""The CUDA sources compile for sm_80 and sm_90a with warnings as errors, and the machine code is
what we meant: tensor-core (HMMA) instructions in the forward kernels' own SASS, no local-memory
spills in any forward kernel. Runs on a CPU-only machine (nvcc compiles, nothing runs); skipped
without nvcc. `pytest -s` prints the ptxas resource table (also: benchmarks/cuda_resources.py).
The forward's block launch order (grouped_block_region in common.cuh) is a host+device function,
so a small host program built with nvcc checks it here, on the CPU.
"""

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch
from torch.utils import cpp_extension

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import cuda_resources  # noqa: E402

NVCC = cuda_resources.find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")

# max_sim_forward_kernel<T, math, vectorised loads>: math 0 = mma.sync f16/bf16, 1 = TF32 mma,
# 2 = exact FP32 FMA (torch's default float32 matmul precision).
TENSOR_CORE_FORWARDS = [f"max_sim_forward_kernel<{t}, {m}, {v}>"
                        for t, m in (("__half", 0), ("__nv_bfloat16", 0), ("float", 1))
                        for v in ("true", "false")]
FP32_FORWARDS = [f"max_sim_forward_kernel<float, 2, {v}>" for v in ("true", "false")]
# max_sim_forward_wgmma_kernel<T, N, gate>: the sm_90a wgmma forward (a stub elsewhere).
WGMMA_FORWARDS = [f"max_sim_forward_wgmma_kernel<{t}, {n}, {g}>" for t in ("__half", "__nv_bfloat16")
                  for n in (64, 128, 192) for g in ("true", "false")]
# The GPU suite's ncu ablations (max_sim_cuda.cuh): 1 = max without argmax, 2 = MMA only; bf16.
MMA_ABLATIONS = [f"max_sim_forward_ablation_kernel<__nv_bfloat16, {a}>" for a in (1, 2)]
WGMMA_ABLATIONS = [f"max_sim_forward_wgmma_ablation_kernel<__nv_bfloat16, {a}>" for a in (1, 2)]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    results = cuda_resources.compile_all(outdir=str(tmp_path_factory.mktemp("cuda_build")))
    print("\n" + cuda_resources.table(results))
    return results


def _kernels(compiled, arch):
    return {k.name: k for c in compiled if c.arch == arch for k in c.kernels}


def test_every_source_is_checked():
    names = {os.path.basename(s) for s in cuda_resources.sources()}
    assert {"max_sim_forward.cu", "max_sim_backward.cu"} <= names


@pytest.mark.parametrize("arch", cuda_resources.ARCHS)
def test_sources_compile_without_warnings(compiled, arch):
    for c in compiled:
        if c.arch == arch:
            assert c.returncode == 0, f"{c.source} sm_{arch}:\n{c.log[-4000:]}"
            assert "warning" not in c.log.lower(), f"{c.source} sm_{arch}:\n{c.log[-4000:]}"


@pytest.mark.parametrize("arch", cuda_resources.ARCHS)
def test_forward_uses_tensor_cores(compiled, arch):
    if cuda_resources.find_cuobjdump(NVCC) is None:
        pytest.skip("cuobjdump not found (neither in the CUDA toolkit nor in the triton wheel)")
    kernels = _kernels(compiled, arch)
    for name in TENSOR_CORE_FORWARDS:
        assert name in kernels, f"{name} missing from sm_{arch}: {sorted(kernels)}"
        counts = kernels[name].sass_counts
        assert counts["HMMA"] + counts["HGMMA"] > 0, f"{name} sm_{arch}: no tensor-core op {counts}"
    for name in MMA_ABLATIONS:  # the ablations keep the kernel's MMA main loop
        assert name in kernels, f"{name} missing from sm_{arch}: {sorted(kernels)}"
        assert kernels[name].sass_counts["HMMA"] > 0, (name, kernels[name].sass_counts)
    # The exact-FP32 path must not be silently TF32 (and the check can tell them apart).
    for name in FP32_FORWARDS:
        counts = kernels[name].sass_counts
        assert counts["HMMA"] == 0 and counts["FFMA"] > 0, f"{name} sm_{arch}: {counts}"


def test_wgmma_forward_uses_hgmma(compiled):
    """sm_90a: every wgmma forward instantiation runs HGMMA (no HMMA), in the tensor-core family
    'wgmma', with its static measures recorded (issue 24)."""
    if cuda_resources.find_cuobjdump(NVCC) is None:
        pytest.skip("cuobjdump not found")
    kernels = _kernels(compiled, "90a")
    for name in WGMMA_ABLATIONS:  # the ablations keep the kernel's HGMMA main loop
        assert name in kernels, f"{name} missing from sm_90a: {sorted(kernels)}"
        counts = kernels[name].sass_counts
        assert counts["HGMMA"] > 0 and counts["HMMA"] == 0, (name, counts)
    for name in WGMMA_FORWARDS:
        assert name in kernels, f"{name} missing from sm_90a: {sorted(kernels)}"
        k = kernels[name]
        assert k.sass_counts["HGMMA"] > 0 and k.sass_counts["HMMA"] == 0, (name, k.sass_counts)
        assert k.tensor_core_family == "wgmma" and k.target == "sm_90a", (name, k.tensor_core_family)
        assert k.epilogue_instructions_per_score is not None, (name, k.measure_notes)
        assert 0 < k.mma_instructions_per_score < k.epilogue_instructions_per_score
        assert k.tile_loop_instructions_per_score == pytest.approx(
            k.epilogue_instructions_per_score + k.k_loop_instructions_per_score, abs=0.02)
    # Issue 24's goal for the best candidate, read at the suite's shape (L 192: N = 192) by the
    # definition triton_resources.py uses (the tile loop less its K loop), below the mma.sync
    # kernel's: a change that gives back the two-pass epilogue shows here.
    best = kernels["max_sim_forward_wgmma_kernel<__nv_bfloat16, 192, true>"]
    mma_sync = kernels["max_sim_forward_kernel<__nv_bfloat16, 0, true>"]
    assert best.epilogue_instructions_per_score <= 12 < mma_sync.epilogue_instructions_per_score, (
        best.epilogue_instructions_per_score, mma_sync.epilogue_instructions_per_score)


def test_static_measures_recorded(compiled):
    """Every forward candidate with the vectorised loader has the issue's static measures in its
    entry: epilogue and MMA instructions per score, L2 bytes per FLOP, family and target."""
    if cuda_resources.find_cuobjdump(NVCC) is None:
        pytest.skip("cuobjdump not found")
    for arch in cuda_resources.ARCHS:
        kernels = _kernels(compiled, arch)
        measured = [n for n in TENSOR_CORE_FORWARDS + FP32_FORWARDS if n.endswith("true>")]
        for name in measured:
            k = kernels[name]
            assert k.target == f"sm_{arch}" and k.tensor_core_family in ("mma", "none"), name
            assert k.epilogue_instructions_per_score > 0, (arch, name, k.measure_notes)
            assert k.mma_instructions_per_score > 0, (arch, name)
            assert 0 < k.l2_bytes_per_flop["operands"] <= k.l2_bytes_per_flop["with_gate"]
        # The measure is the one the issue defines: mma.sync f16 at 128x128 tiles, 256 threads,
        # D = 512: 16 stages x 32 HMMA per thread = 8 HMMA per score element.
        assert kernels["max_sim_forward_kernel<__half, 0, true>"].mma_instructions_per_score == 8.0


@pytest.mark.parametrize("arch", cuda_resources.ARCHS)
def test_forward_has_no_spills(compiled, arch):
    forwards = [k for name, k in _kernels(compiled, arch).items() if "max_sim_forward" in name]
    assert len(forwards) == (len(TENSOR_CORE_FORWARDS) + len(FP32_FORWARDS) + len(WGMMA_FORWARDS)
                             + len(MMA_ABLATIONS) + len(WGMMA_ABLATIONS))
    for k in forwards:
        assert k.spill_stores == 0 and k.spill_loads == 0 and k.stack == 0, (
            f"{k.name} sm_{arch}: {k.registers} registers, {k.stack} B stack, "
            f"{k.spill_stores}/{k.spill_loads} B spill stores/loads")


def _glue_sources():
    return sorted(p for p in os.listdir(cuda_resources.CUDA_DIR) if p.endswith(".cpp"))


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
@pytest.mark.parametrize("source", _glue_sources())
def test_glue_compiles_without_warnings(source):
    """The torch glue, syntax only, against the installed torch's headers (a CPU wheel ships
    c10/cuda too), with the defines and C++ flags the real build uses (setup.py's extension plus
    what torch.utils.cpp_extension.BuildExtension adds), so its first full compile on a GPU
    machine is not where a glue error first shows."""
    torch_includes = cpp_extension.include_paths()
    if not any(os.path.isfile(os.path.join(p, "c10", "cuda", "CUDAStream.h")) for p in torch_includes):
        pytest.skip("this torch build ships no c10/cuda headers")
    cuda_include = os.path.join(os.path.dirname(os.path.dirname(NVCC)), "include")
    includes = [f"-isystem{p}" for p in [*torch_includes, cuda_include,
                                          sysconfig.get_paths()["include"]]]
    # CPU wheels lack the generated c10/cuda/impl/cuda_cmake_macros.h; the macro skips it.
    defines = ["-DTRANSMATCHER_FAST_WITH_CUDA", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
               # BuildExtension: the module name (last part of transmatcher_fast._C) and the
               # extension-API switch; older torch also passes its C++ ABI.
               "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    cmd = ["g++", "-std=c++20", "-O3", "-fopenmp", "-fPIC", "-Wall", "-Wextra", "-Werror",
           "-fsyntax-only", *defines, *includes, os.path.join(cuda_resources.CUDA_DIR, source)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


# Host program: the forward's block -> (query region, gallery region) order. Exits non-zero with
# a message on the first failure.
BLOCK_ORDER_TEST = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "common.cuh"

using transmatcher_fast::cuda::BlockRegion;
using transmatcher_fast::cuda::effective_query_group;
using transmatcher_fast::cuda::grouped_block_region;
using transmatcher_fast::cuda::kDefaultQueryGroup;

static int failures = 0;
#define CHECK(cond, ...)                                       \
  do {                                                         \
    if (!(cond) && failures++ < 20) {                          \
      std::printf("FAIL %s:%d %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                \
      std::printf("\n");                                       \
    }                                                          \
  } while (0)

// The block a region should get: bands of g query regions, inside a band gi fastest.
static int64_t expected_pid(int64_t gi, int64_t gj, int64_t nq, int64_t ng, int64_t g) {
  if (g > nq) g = nq;
  const int64_t band = gi / g, first = band * g;
  const int64_t rows = nq - first < g ? nq - first : g;
  return band * g * ng + gj * rows + (gi - first);
}

static void check_exhaustive(int64_t nq, int64_t ng, int64_t g) {
  std::vector<int> seen(static_cast<size_t>(nq * ng), 0);
  const int64_t gg = g > nq ? nq : g;
  for (int64_t pid = 0; pid < nq * ng; ++pid) {
    const BlockRegion<int64_t> r = grouped_block_region<int64_t>(pid, nq, ng, g);
    const BlockRegion<uint32_t> r32 = grouped_block_region<uint32_t>(
        static_cast<uint32_t>(pid), static_cast<uint32_t>(nq), static_cast<uint32_t>(ng),
        static_cast<uint32_t>(g));
    CHECK(r.gi >= 0 && r.gi < nq && r.gj >= 0 && r.gj < ng, "nq=%lld ng=%lld g=%lld pid=%lld",
          (long long)nq, (long long)ng, (long long)g, (long long)pid);
    if (!(r.gi >= 0 && r.gi < nq && r.gj >= 0 && r.gj < ng)) continue;
    CHECK(r32.gi == r.gi && r32.gj == r.gj, "32/64-bit differ: nq=%lld ng=%lld g=%lld pid=%lld",
          (long long)nq, (long long)ng, (long long)g, (long long)pid);
    ++seen[static_cast<size_t>(r.gi * ng + r.gj)];
    CHECK(expected_pid(r.gi, r.gj, nq, ng, g) == pid, "nq=%lld ng=%lld g=%lld pid=%lld",
          (long long)nq, (long long)ng, (long long)g, (long long)pid);
    // The band of pid holds query regions [band * g, band * g + g) only.
    CHECK(r.gi / gg == pid / (gg * ng), "band: nq=%lld ng=%lld g=%lld pid=%lld", (long long)nq,
          (long long)ng, (long long)g, (long long)pid);
    if (g == 1)  // the plain gallery sweep of earlier versions
      CHECK(r.gi == pid / ng && r.gj == pid % ng, "g=1 order: nq=%lld ng=%lld pid=%lld",
            (long long)nq, (long long)ng, (long long)pid);
    if (g >= nq)  // one band: column-major over the whole grid
      CHECK(r.gi == pid % nq && r.gj == pid / nq, "one band: nq=%lld ng=%lld g=%lld pid=%lld",
            (long long)nq, (long long)ng, (long long)g, (long long)pid);
  }
  for (size_t k = 0; k < seen.size(); ++k)
    CHECK(seen[k] == 1, "nq=%lld ng=%lld g=%lld: region %zu visited %d times", (long long)nq,
          (long long)ng, (long long)g, k, seen[k]);
}

// Near the 2**31 - 1 block limit: sampled blocks, 64- and 32-bit, against the formula.
static void check_large(int64_t nq, int64_t ng, int64_t g) {
  const int64_t blocks = nq * ng;
  for (int64_t pid = 0; pid < blocks; pid += (pid < 4096 || pid > blocks - 4096) ? 1 : 999983) {
    const BlockRegion<int64_t> r = grouped_block_region<int64_t>(pid, nq, ng, g);
    const BlockRegion<uint32_t> r32 = grouped_block_region<uint32_t>(
        static_cast<uint32_t>(pid), static_cast<uint32_t>(nq), static_cast<uint32_t>(ng),
        static_cast<uint32_t>(g));
    CHECK(r.gi >= 0 && r.gi < nq && r.gj >= 0 && r.gj < ng && expected_pid(r.gi, r.gj, nq, ng, g) == pid,
          "large nq=%lld ng=%lld g=%lld pid=%lld", (long long)nq, (long long)ng, (long long)g,
          (long long)pid);
    CHECK(static_cast<int64_t>(r32.gi) == r.gi && static_cast<int64_t>(r32.gj) == r.gj,
          "large 32/64-bit differ: nq=%lld ng=%lld g=%lld pid=%lld", (long long)nq,
          (long long)ng, (long long)g, (long long)pid);
  }
  const BlockRegion<int64_t> last = grouped_block_region<int64_t>(blocks - 1, nq, ng, g);
  CHECK(last.gi == nq - 1 && last.gj == ng - 1, "last block: nq=%lld ng=%lld g=%lld",
        (long long)nq, (long long)ng, (long long)g);
}

int main() {
  const int64_t sizes[][2] = {{1, 1}, {1, 7}, {7, 1}, {2, 3}, {5, 4}, {7, 3}, {8, 8},
                              {9, 5}, {13, 17}, {16, 16}, {17, 2}, {33, 31}, {128, 64}};
  const int64_t groups[] = {1, 2, 3, 4, 7, 8, 9, 16, 100, 1 << 30};
  for (const auto& s : sizes)
    for (const int64_t g : groups) check_exhaustive(s[0], s[1], g);
  // The evaluation-size grid (256 x 4096 images, 2 per region) with the default band.
  check_exhaustive(128, 2048, kDefaultQueryGroup);
  // 65536 * 32767 = 2**31 - 32768 blocks; 3 leaves a ragged band (65536 % 3 = 1).
  for (const int64_t g : {int64_t(1), int64_t(3), int64_t(8), int64_t(16), int64_t(65535)})
    check_large(65536, 32767, g);
  check_large(46341, 46340, 8);  // both sides past 2**15, product just below 2**31
  CHECK(kDefaultQueryGroup >= 1, "default %lld", (long long)kDefaultQueryGroup);
  CHECK(effective_query_group(0, 128) == (kDefaultQueryGroup < 128 ? kDefaultQueryGroup : 128),
        "default band");
  CHECK(effective_query_group(0, 3) == (kDefaultQueryGroup < 3 ? kDefaultQueryGroup : 3),
        "default band, few regions");
  CHECK(effective_query_group(1, 128) == 1, "g=1");
  CHECK(effective_query_group(100, 7) == 7, "clamped to the regions");
  CHECK(effective_query_group(5, 5) == 5, "exact");
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("block order ok\n");
  return 0;
}
"""


def build_and_run_host(tmp_path, name: str, source: str) -> str:
    """Compiles a host test program (with the kernels' headers) warning-free, runs it and
    returns what it printed; a failed build or run fails the test with its output."""
    src, exe = tmp_path / f"{name}.cu", tmp_path / name
    src.write_text(source)
    cmd = [NVCC, *cuda_resources.TORCH_LIKE_FLAGS, *cuda_resources.WARNINGS_AS_ERRORS,
           "-gencode=arch=compute_80,code=sm_80", f"-I{cuda_resources.CUDA_DIR}", str(src),
           "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    assert "warning" not in (build.stdout + build.stderr).lower(), build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return run.stdout


def test_block_order_host(tmp_path):
    """Every (query region, gallery region) is launched exactly once for every band height,
    ragged last bands included; band height 1 is the plain gallery sweep; the 32- and 64-bit
    index types give the same order up to the 2**31 - 1 block limit."""
    assert "block order ok" in build_and_run_host(tmp_path, "block_order_test", BLOCK_ORDER_TEST)


# Host program: the wgmma forward's helpers (common.cuh). better_candidate combined in any tree
# gives what a scan in location order with `beats` gives (ties -> lowest location, NaN wins and
# the lowest NaN stays, -0.0 == +0.0 keeps the lower location's sign), on random rows full of
# ties, NaNs, infinities and signed zeros; interleave_offset places every 16-byte chunk of a
# 192 x 64-byte stage once, in 128-byte core matrices; smem_descriptor packs its fields.
HELPERS_TEST = r"""
#include <cmath>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <random>
#include <vector>

#include "common.cuh"

using namespace transmatcher_fast::cuda;

static int failures = 0;
#define CHECK(cond, ...)                                         \
  do {                                                           \
    if (!(cond) && failures++ < 20) {                            \
      std::printf("FAIL %s:%d %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                  \
      std::printf("\n");                                         \
    }                                                            \
  } while (0)

static bool beats_host(float v, float best) { return v > best || (v != v && best == best); }

static bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

int main() {
  std::mt19937 rng(12345);
  const float pool[] = {0.0f, -0.0f, 1.0f, -1.0f, 2.5f, NAN, INFINITY, -INFINITY, 1e-30f, 3.0f};
  for (int trial = 0; trial < 20000; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 40);
    std::vector<float> v(n);
    const int distinct = 1 + static_cast<int>(rng() % 10);
    for (auto& x : v) x = pool[rng() % distinct];
    // Reference: scan in location order.
    float best = v[0];
    int at = 0;
    for (int k = 1; k < n; ++k)
      if (beats_host(v[k], best)) best = v[k], at = k;
    // Random split into parts, each scanned in order, then combined in a random order, with
    // empty candidates (-1) mixed in.
    std::vector<float> cv;
    std::vector<int> ci;
    for (int k = 0; k < n;) {
      const int len = 1 + static_cast<int>(rng() % 5);
      float b = v[k];
      int a = k;
      for (int m = k + 1; m < k + len && m < n; ++m)
        if (beats_host(v[m], b)) b = v[m], a = m;
      cv.push_back(b);
      ci.push_back(a);
      if (rng() % 4 == 0) cv.push_back(-INFINITY), ci.push_back(-1);
      k += len;
    }
    std::vector<int> order(cv.size());
    for (size_t k = 0; k < order.size(); ++k) order[k] = static_cast<int>(k);
    std::shuffle(order.begin(), order.end(), rng);
    float tb = 0.0f;
    int ta = -1;
    for (int k : order)
      if (better_candidate(cv[k], ci[k], tb, ta)) tb = cv[k], ta = ci[k];
    CHECK(ta == at && same_bits(tb, best), "trial %d: tree (%g, %d) vs scan (%g, %d)", trial,
          tb, ta, best, at);
  }
  CHECK(!better_candidate(5.0f, -1, 1.0f, 3), "empty candidate must lose");
  CHECK(better_candidate(-INFINITY, 7, 0.0f, -1), "anything beats an empty best");
  CHECK(better_candidate(NAN, 9, INFINITY, 1), "NaN beats a number");
  CHECK(!better_candidate(NAN, 9, NAN, 1) && better_candidate(NAN, 1, NAN, 9), "lowest NaN");

  // interleave_offset: a stage of 192 rows x 64 bytes (4 chunks) is covered exactly once.
  const int rows = 192, row_bytes = 64;
  std::vector<int> hit(rows * row_bytes / 16, 0);
  for (int r = 0; r < rows; ++r)
    for (int kc = 0; kc < row_bytes / 16; ++kc) {
      const uint32_t off = interleave_offset(r, kc, row_bytes);
      CHECK(off % 16 == 0 && off < static_cast<uint32_t>(rows * row_bytes), "offset %u", off);
      if (off % 16 == 0 && off < static_cast<uint32_t>(rows * row_bytes)) ++hit[off / 16];
      // Core matrix (8 rows x 16 bytes) contiguous; along K at 128 bytes (LBO); the next 8
      // rows at 8 * row_bytes (SBO).
      CHECK(off == interleave_offset(r - r % 8, kc, row_bytes) + 16 * (r % 8), "core matrix");
      CHECK(off == interleave_offset(r % 8, 0, row_bytes) + 128 * kc + (r / 8) * 8 * row_bytes,
            "strides");
    }
  for (size_t k = 0; k < hit.size(); ++k) CHECK(hit[k] == 1, "chunk %zu placed %d times", k, hit[k]);

  const uint64_t d = smem_descriptor(0x1a2b0, 128, 512);
  CHECK((d & 0x3fff) == (0x1a2b0 >> 4), "address field");
  CHECK(((d >> 16) & 0x3fff) == 128 >> 4, "leading byte offset");
  CHECK(((d >> 32) & 0x3fff) == 512 >> 4, "stride byte offset");
  CHECK((d >> 62) == 0 && ((d >> 49) & 7) == 0, "no swizzle, base offset 0");
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("helpers ok\n");
  return 0;
}
"""


def test_wgmma_helpers_host(tmp_path):
    """The wgmma forward's tie/NaN combine, shared-memory layout and descriptor, on the host."""
    assert "helpers ok" in build_and_run_host(tmp_path, "helpers_test", HELPERS_TEST)


def test_forward_kernel_uses_block_order():
    """The kernel maps blockIdx.x through grouped_block_region (what the host test checks) and
    passes the requested band height on, rather than an order of its own."""
    with open(os.path.join(cuda_resources.CUDA_DIR, "max_sim_forward.cu")) as f:
        text = f.read()
    assert "grouped_block_region<I>(\n      blockIdx.x" in text or \
        "grouped_block_region<I>(blockIdx.x" in text, "forward kernel no longer uses grouped_block_region"
    assert "blockIdx.x /" not in text and "blockIdx.x %" not in text
    assert "effective_query_group(a.query_group" in text
