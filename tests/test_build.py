"""The C++ sources compile cleanly: -Wall -Wextra as errors (torch's own headers as system headers)."""

import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
from torch.utils import cpp_extension

ROOT = os.path.join(os.path.dirname(__file__), "..")
CPP_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
                     + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
@pytest.mark.parametrize("source", CPP_SOURCES, ids=lambda p: os.path.relpath(p, ROOT))
def test_cpp_source_compiles_without_warnings(source):
    includes = [f"-isystem{p}" for p in cpp_extension.include_paths()]
    includes.append(f"-isystem{sysconfig.get_paths()['include']}")
    cmd = ["g++", "-std=c++20", "-O2", "-fopenmp", "-Wall", "-Wextra", "-Werror",
           "-fsyntax-only", *includes, source]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def test_sources_exist():
    assert any(p.endswith(os.path.join("cpu", "max_sim_cpu.cpp")) for p in CPP_SOURCES)
