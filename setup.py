"""Builds transmatcher_fast with its compiled extension `transmatcher_fast._C`.

The C++ CPU kernels are always built; the CUDA kernels (csrc/cuda) only when torch is a CUDA
build and a CUDA toolkit is found, or when TRANSMATCHER_FAST_FORCE_CUDA=1.

Environment:
    TRANSMATCHER_FAST_SKIP_EXT=1     build no extension (pure Python; the `reference` backend)
    TRANSMATCHER_FAST_FORCE_CUDA=1   build the CUDA sources even where no GPU build is detected
    TRANSMATCHER_FAST_CUDA_ARCH      gencode list, default "80;90a" (sm_80 and sm_90a)

Build against the installed torch: `pip install --no-build-isolation .`
"""

import glob
import os

from setuptools import find_packages, setup


def _flag(name, default="0"):
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes", "on")


def _cuda_gencode_flags():
    archs = os.environ.get("TRANSMATCHER_FAST_CUDA_ARCH", "80;90a")
    flags = []
    for arch in filter(None, (a.strip() for a in archs.replace(",", ";").split(";"))):
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def _extensions():
    if _flag("TRANSMATCHER_FAST_SKIP_EXT"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))) + sorted(
        glob.glob(os.path.join("csrc", "cuda", "*.cpp"))
    )
    with_cuda = _flag("TRANSMATCHER_FAST_FORCE_CUDA") or (
        torch.version.cuda is not None and CUDA_HOME is not None
    )
    with_cuda = with_cuda and bool(cuda_sources)
    sources = ["csrc/max_sim.cpp"] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # No -std flag: torch.utils.cpp_extension adds the C++ standard the installed torch needs.
    cxx = ["-O3", "-fopenmp"]  # -fopenmp: at::parallel_for is inline OpenMP
    define_macros = []
    if with_cuda:
        define_macros.append(("TRANSMATCHER_FAST_WITH_CUDA", None))
        ext = CUDAExtension(
            "transmatcher_fast._C",
            sources + cuda_sources,
            define_macros=define_macros,
            # -lineinfo: source lines for profilers (no effect on the code generated).
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"] + _cuda_gencode_flags()},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "transmatcher_fast._C",
            sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()


setup(
    packages=find_packages(include=["transmatcher_fast", "transmatcher_fast.*"])
    + ["transmatcher_fast.kernels"],
    package_dir={"transmatcher_fast.kernels": "kernels"},
    package_data={"transmatcher_fast.ops": ["tuning.json"]},  # the committed launch table
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
