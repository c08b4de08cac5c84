"""Compiles the CUDA kernels in csrc/cuda with nvcc (no GPU needed) and reports, per kernel and
architecture, what ptxas says (registers, static shared memory, stack, spills) and whether the
SASS uses tensor cores (HMMA / HGMMA instruction counts).

    python benchmarks/cuda_resources.py                 # table for sm_80 and sm_90a
    python benchmarks/cuda_resources.py --arch 80 --json out.json

tests/test_cuda_build.py uses the same functions (and asserts on them).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
ARCHS = ("80", "90a")

# What torch.utils.cpp_extension passes to nvcc, so the check compiles what the build compiles.
TORCH_LIKE_FLAGS = [
    "-std=c++17", "-O3", "-lineinfo", "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
]
WARNINGS_AS_ERRORS = ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def find_cuobjdump(nvcc: str | None = None) -> str | None:
    """Next to nvcc, else on PATH, else the copy shipped in the triton wheel."""
    if nvcc and os.path.isfile(os.path.join(os.path.dirname(nvcc), "cuobjdump")):
        return os.path.join(os.path.dirname(nvcc), "cuobjdump")
    if shutil.which("cuobjdump"):
        return shutil.which("cuobjdump")
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.isfile(path) else None


def sources() -> list[str]:
    return sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> short readable name, e.g. max_sim_forward_kernel<__half, 0, true>."""
    out = {n: n for n in names}
    if not names or shutil.which("c++filt") is None:
        return out
    res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    for mangled, full in zip(names, res.stdout.splitlines()):
        short = full.replace("(anonymous namespace)::", "").replace("transmatcher_fast::cuda::", "")
        short = re.sub(r"^void ", "", short)
        out[mangled] = short.split("(")[0] if "(" in short else short
    return out


@dataclass
class Kernel:
    arch: str
    source: str
    mangled: str
    name: str = ""
    registers: int = 0
    smem: int = 0  # static; the forward/backward kernels use dynamic shared memory on top
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    sass_counts: dict = field(default_factory=dict)


@dataclass
class Compiled:
    source: str
    arch: str
    returncode: int
    log: str
    kernels: list[Kernel]


def parse_ptxas(log: str, arch: str, source: str) -> list[Kernel]:
    kernels: dict[str, Kernel] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = kernels.setdefault(m.group(1), Kernel(arch, source, m.group(1)))
            continue
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = kernels.setdefault(m.group(1), Kernel(arch, source, m.group(1)))
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current.registers = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current.smem = int(s.group(1)) if s else 0
    # Only kernels (entry functions) have "Used N registers" lines we care about.
    found = [k for k in kernels.values() if k.registers > 0]
    names = demangle([k.mangled for k in found])
    for k in found:
        k.name = names[k.mangled]
    return found


def sass_by_function(obj: str, cuobjdump: str) -> dict[str, str]:
    res = subprocess.run([cuobjdump, "--dump-sass", obj], capture_output=True, text=True, check=True)
    parts = re.split(r"\n\s*Function : (\S+)\n", "\n" + res.stdout)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


TC_OPCODES = ("HMMA", "HGMMA", "FFMA")


def compile_one(source: str, arch: str, outdir: str, nvcc: str, cuobjdump: str | None) -> Compiled:
    obj = os.path.join(outdir, f"{os.path.basename(source)}.sm_{arch}.o")
    cmd = [nvcc, *TORCH_LIKE_FLAGS, *WARNINGS_AS_ERRORS, f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "-Xptxas", "-v", "-c", source, "-o", obj]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = res.stdout + res.stderr
    kernels = parse_ptxas(log, arch, os.path.basename(source)) if res.returncode == 0 else []
    if res.returncode == 0 and cuobjdump:
        sass = sass_by_function(obj, cuobjdump)
        for k in kernels:
            text = sass.get(k.mangled, "")
            k.sass_counts = {op: len(re.findall(rf"\b{op}\b", text)) for op in TC_OPCODES}
    return Compiled(os.path.basename(source), arch, res.returncode, log, kernels)


def compile_all(archs=ARCHS, outdir: str | None = None, jobs: int = 2) -> list[Compiled]:
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME)")
    cuobjdump = find_cuobjdump(nvcc)
    outdir = outdir or tempfile.mkdtemp(prefix="tmf_cuda_")
    work = [(s, a) for a in archs for s in sources()]
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda sa: compile_one(sa[0], sa[1], outdir, nvcc, cuobjdump), work))


def table(results: list[Compiled]) -> str:
    rows = [f"{'arch':6} {'kernel':58} {'regs':>4} {'smem':>5} {'stack':>5} {'spill st/ld':>11} "
            f"{'HMMA':>5} {'HGMMA':>5} {'FFMA':>5}"]
    for c in results:
        if c.returncode != 0:
            rows.append(f"sm_{c.arch:4} {c.source}: COMPILE FAILED")
            continue
        for k in sorted(c.kernels, key=lambda k: k.name):
            sc = k.sass_counts
            rows.append(f"sm_{k.arch:4} {k.name[:58]:58} {k.registers:4d} {k.smem:5d} {k.stack:5d} "
                        f"{k.spill_stores:5d}/{k.spill_loads:<5d} {sc.get('HMMA', '-'):>5} "
                        f"{sc.get('HGMMA', '-'):>5} {sc.get('FFMA', '-'):>5}")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", help="e.g. 80, 90a (default both)")
    parser.add_argument("--json", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    results = compile_all(tuple(args.arch or ARCHS))
    print(table(results))
    print("smem = static shared memory; dynamic: forward 66048 B per block, backward "
          "4*L*32*V + sizeof(T)*128*32*V B (V = 2 for L <= 256, else 1)")
    for c in results:
        if c.returncode != 0:
            print(c.log, file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(k)} for c in results for k in c.kernels], f, indent=1)
    return 0 if all(c.returncode == 0 for c in results) else 1


if __name__ == "__main__":
    sys.exit(main())
