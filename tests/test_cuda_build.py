"""The CUDA sources compile for sm_80 and sm_90a with warnings as errors, and the machine code is
what we meant: tensor-core (HMMA) instructions in the forward kernels' own SASS, no local-memory
spills in any forward kernel. Runs on a CPU-only machine (nvcc compiles, nothing runs); skipped
without nvcc. `pytest -s` prints the ptxas resource table (also: benchmarks/cuda_resources.py).
"""

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
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
    # The exact-FP32 path must not be silently TF32 (and the check can tell them apart).
    for name in FP32_FORWARDS:
        counts = kernels[name].sass_counts
        assert counts["HMMA"] == 0 and counts["FFMA"] > 0, f"{name} sm_{arch}: {counts}"


@pytest.mark.parametrize("arch", cuda_resources.ARCHS)
def test_forward_has_no_spills(compiled, arch):
    forwards = [k for name, k in _kernels(compiled, arch).items() if "max_sim_forward" in name]
    assert len(forwards) == len(TENSOR_CORE_FORWARDS) + len(FP32_FORWARDS)
    for k in forwards:
        assert k.spill_stores == 0 and k.spill_loads == 0 and k.stack == 0, (
            f"{k.name} sm_{arch}: {k.registers} registers, {k.stack} B stack, "
            f"{k.spill_stores}/{k.spill_loads} B spill stores/loads")


def _glue_sources():
    return sorted(p for p in os.listdir(cuda_resources.CUDA_DIR) if p.endswith(".cpp"))


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
@pytest.mark.parametrize("source", _glue_sources())
def test_glue_compiles_without_warnings(source):
    """The torch glue against the installed torch's headers (a CPU wheel ships c10/cuda too)."""
    torch_includes = cpp_extension.include_paths()
    if not any(os.path.isfile(os.path.join(p, "c10", "cuda", "CUDAStream.h")) for p in torch_includes):
        pytest.skip("this torch build ships no c10/cuda headers")
    cuda_include = os.path.join(os.path.dirname(os.path.dirname(NVCC)), "include")
    includes = [f"-isystem{p}" for p in [*torch_includes, cuda_include,
                                          sysconfig.get_paths()["include"]]]
    # CPU wheels lack the generated c10/cuda/impl/cuda_cmake_macros.h; the macro skips it.
    defines = ["-DTRANSMATCHER_FAST_WITH_CUDA", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
    cmd = ["g++", "-std=c++20", "-O2", "-Wall", "-Wextra", "-Werror", "-fsyntax-only",
           *defines, *includes, os.path.join(cuda_resources.CUDA_DIR, source)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
