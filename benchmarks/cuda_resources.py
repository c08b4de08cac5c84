"""Compiles the CUDA kernels in csrc/cuda with nvcc (no GPU needed) and reports, per kernel and
architecture, what ptxas says (registers, static shared memory, stack, spills), whether the
SASS uses tensor cores (HMMA / HGMMA instruction counts), and for every forward candidate the
static measures of issue 24, read off the SASS with benchmarks/sass_measure.py:

  epilogue_instructions_per_score  thread-instructions of the tile loop less its K loop that
      are neither tensor-core nor load/store, inner loops (the scans) weighted by their trip
      counts, x threads per block, / score elements per tile: the figure triton_resources.py
      reports under the same name (budget at MMA parity on an H100, D = 512: about 32)
  k_loop_instructions_per_score    the same for the K loop, times its trips (loads, barriers,
      descriptors: apart, as in triton_resources.py)
  tile_loop_instructions_per_score the two together: every non-MMA, non-memory instruction of
      the tile loop
  mma_instructions_per_score       the same for the math instructions (HMMA/HGMMA; FFMA for the
      exact-fp32 kernel)
  l2_bytes_per_flop                analytic operand bytes the tiling moves from L2 per FLOP
      (and with the fp32 gate reads), at the reference shape

at the reference shape L = 192, D = 512 (REFERENCE), with the tensor-core family and target in
the same entry. Trip counts: the K loop runs (math instructions per tile) / (math instructions in
its body); the mma.sync kernel's serial scans run (values per thread) / (shared loads in the
body), on half of the threads each (rows / columns), over 1 + 127/L segments per tile row on
average; each of the wgmma kernel's two column folds runs 48 / (shared loads in its body) times.

    python benchmarks/cuda_resources.py                 # table for sm_80 and sm_90a
    python benchmarks/cuda_resources.py --arch 90a --json out.json --txt out.txt

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sass_measure as sm  # noqa: E402

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


def nvcc_version() -> str:
    nvcc = find_nvcc()
    if nvcc is None:
        return "not found"
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), (V[\d.]+)", out)
    return f"{m.group(1)} ({m.group(2)})" if m else out.strip().splitlines()[-1]


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
    target: str = ""
    tensor_core_family: str = ""  # forward kernels: "wgmma", "mma" (mma.sync) or "none"
    epilogue_instructions_per_score: float | None = None
    k_loop_instructions_per_score: float | None = None
    tile_loop_instructions_per_score: float | None = None
    mma_instructions_per_score: float | None = None
    l2_bytes_per_flop: dict | None = None
    measure_notes: str = ""


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

# The shape the static measures are taken at (TransMatcher: 24 x 8 feature maps, d_model 512).
REFERENCE = {"l": 192, "d": 512}


@dataclass
class TileSpec:
    """What the SASS alone does not say about one forward kernel's tile (see the docstring)."""
    family: str
    threads: int
    scores: int            # score elements per tile
    math_per_tile: float   # math instructions per thread per tile
    math_opcode: str       # HMMA / HGMMA / FFMA
    scan_loads: float      # shared loads per scanning thread per tile in the epilogue loops
    scan_fraction: float   # share of the block's threads that run each epilogue loop nest
    segments: float        # mean segments per scanned row (mma.sync kernel), else 1
    l2_operand_bytes: float  # per tile
    l2_gate_bytes: float     # per tile
    flops: float             # per tile


def tile_spec(name: str) -> TileSpec | None:
    """The tile of a forward kernel from its demangled name, at REFERENCE; None for others."""
    l, d = REFERENCE["l"], REFERENCE["d"]
    # The wgmma kernel's benchmark ablations (max_sim_cuda.cuh) have its N = 192 tile with a
    # gate. (The mma.sync ones get none: their scans' trip counts, inferred from the shared loads
    # per loop body, would not be comparable.)
    name = re.sub(r"^max_sim_forward_wgmma_ablation_kernel<(\w+), \d>",
                  r"max_sim_forward_wgmma_kernel<\1, 192, true>", name)
    m = re.match(r"max_sim_forward_wgmma_kernel<(\w+), (\d+), (\w+)>", name)
    if m:
        n = int(m.group(2))
        if n < l:  # this instantiation serves Lg <= n only: measure it at Lg = n
            l_g = n
        else:
            l_g = l
        rows, k_steps = 192, -(-d // 16)
        # Each of its two column folds reads 48 entries a thread (96 a column, 2 threads).
        return TileSpec("wgmma", 384, rows * n, k_steps, "HGMMA", 48, 1.0, 1.0,
                        (rows + n) * d * 2, rows * l_g * 4 if m.group(3) == "true" else 0,
                        2.0 * rows * n * d)
    m = re.match(r"max_sim_forward_kernel<(\w+), (\d), (\w+)>", name)
    if m:
        size = 4 if m.group(1) == "float" else 2
        math = int(m.group(2))
        k_tiles = -(-d // (64 // size))
        if math == 0:    # mma.sync m16n8k16: 2 k16 steps x 4 x 4 fragments per stage and warp
            per_tile, opcode, family = k_tiles * 32, "HMMA", "mma"
        elif math == 1:  # TF32 m16n8k8: 2 k8 steps x 16
            per_tile, opcode, family = k_tiles * 32, "HMMA", "mma"
        else:            # exact fp32: an 8 x 8 micro-tile, 16 features per stage
            per_tile, opcode, family = k_tiles * 64 * 16, "FFMA", "none"
        return TileSpec(family, 256, 128 * 128, per_tile, opcode, 128, 0.5, 1 + 127 / l,
                        2 * 128 * d * size, 128 * 128 * 4, 2.0 * 128 * 128 * d)
    return None


def forward_measure(sass: str, spec: TileSpec) -> dict:
    """The static measures of one forward kernel (module docstring), from its SASS text."""
    ins = sm.parse_sass(sass)
    loops = sm.find_loops(ins)

    def math(lp):
        return sum(1 for i in lp.instructions if i.base == spec.math_opcode)

    with_math = [lp for lp in loops if math(lp) > 0]
    if not with_math:
        return {"notes": "no loop with math instructions"}
    k_loop = max(with_math, key=lambda lp: (lp.depth, math(lp)))
    parents = [lp for lp in loops if k_loop in lp.inner]
    if not parents:
        return {"notes": "the K loop has no enclosing tile loop"}
    tile = parents[0]
    # Math instructions of the tile outside the K loop (a peeled last group of steps) run once.
    peeled = math(tile) - math(k_loop)
    trips = {k_loop.start: (spec.math_per_tile - peeled) / math(k_loop)}
    fraction = {}
    notes = []
    for nest in tile.inner:
        if nest is k_loop:
            continue
        loads = sum(1 for i in nest.instructions if i.base == "LDS")
        if nest.inner:  # segment loop around an element loop (mma.sync kernel's scans)
            trips[nest.start] = spec.segments
            for inner in nest.inner:
                inner_loads = sum(1 for i in inner.instructions if i.base == "LDS")
                trips[inner.start] = (spec.scan_loads - spec.segments) / spec.segments / max(inner_loads, 1)
        else:
            trips[nest.start] = spec.scan_loads / max(loads, 1)
        for lp in [nest, *nest.inner]:
            fraction[lp.start] = spec.scan_fraction
        if not loads:
            notes.append(f"loop at {nest.start:#x} has no shared loads: trip count 1 per load assumed")
    if any(lp.inner for lp in k_loop.inner):
        notes.append("loops inside the K loop counted once per K iteration")

    # Weighted count per class: each instruction x the trips of the loops inside `tile` holding it
    # x the share of threads that run it.
    nested = [lp for lp in loops if tile.contains(lp)]
    counts = dict.fromkeys(sm.KINDS, 0.0)
    in_k_loop = 0.0  # of counts[OTHER]
    math_count = 0.0
    for i in tile.instructions:
        w = 1.0
        for lp in nested:
            if lp.start <= i.address <= lp.end:
                w *= trips.get(lp.start, 1.0)
        share = min([fraction[lp.start] for lp in nested
                     if lp.start in fraction and lp.start <= i.address <= lp.end] or [1.0])
        counts[i.kind] += w * share
        if i.kind == sm.OTHER and k_loop.start <= i.address <= k_loop.end:
            in_k_loop += w * share
        if i.base == spec.math_opcode:
            math_count += w * share
    per = dict(threads=spec.threads, scores=spec.scores)
    return {
        "epilogue_instructions_per_score": round(sm.per_score(counts[sm.OTHER] - in_k_loop, **per), 2),
        "k_loop_instructions_per_score": round(sm.per_score(in_k_loop, **per), 2),
        "tile_loop_instructions_per_score": round(sm.per_score(counts[sm.OTHER], **per), 2),
        "mma_instructions_per_score": round(sm.per_score(math_count, **per), 3),
        "tile_loop": f"{tile.start:#x}-{tile.end:#x}",
        "k_loop_trips_per_tile": round(trips[k_loop.start], 2),
        "l2_bytes_per_flop": {"operands": round(spec.l2_operand_bytes / spec.flops, 4),
                              "with_gate": round((spec.l2_operand_bytes + spec.l2_gate_bytes)
                                                 / spec.flops, 4)},
        "notes": "; ".join(notes),
    }


def compile_one(source: str, arch: str, outdir: str, nvcc: str, cuobjdump: str | None) -> Compiled:
    obj = os.path.join(outdir, f"{os.path.basename(source)}.sm_{arch}.o")
    cmd = [nvcc, *TORCH_LIKE_FLAGS, *WARNINGS_AS_ERRORS, f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "-Xptxas", "-v", "-c", source, "-o", obj]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = res.stdout + res.stderr
    kernels = parse_ptxas(log, arch, os.path.basename(source)) if res.returncode == 0 else []
    for k in kernels:
        k.target = f"sm_{arch}"
    if res.returncode == 0 and cuobjdump:
        sass = sass_by_function(obj, cuobjdump)
        for k in kernels:
            text = sass.get(k.mangled, "")
            k.sass_counts = {op: len(re.findall(rf"\b{op}\b", text)) for op in TC_OPCODES}
            spec = tile_spec(k.name)
            if spec is None:
                continue
            k.tensor_core_family = ("wgmma" if k.sass_counts["HGMMA"] else
                                    "mma" if k.sass_counts["HMMA"] else "none")
            if re.match(r"max_sim_forward_kernel<\w+, \d, false>", k.name):
                k.measure_notes = "element-wise loader (unaligned rows or ragged D): not measured"
                continue
            if not text:
                k.measure_notes = "no SASS (not built for this architecture)"
                continue
            m = forward_measure(text, spec)
            k.epilogue_instructions_per_score = m.get("epilogue_instructions_per_score")
            k.k_loop_instructions_per_score = m.get("k_loop_instructions_per_score")
            k.tile_loop_instructions_per_score = m.get("tile_loop_instructions_per_score")
            k.mma_instructions_per_score = m.get("mma_instructions_per_score")
            k.l2_bytes_per_flop = m.get("l2_bytes_per_flop")
            k.measure_notes = "; ".join(x for x in (f"tile loop {m.get('tile_loop')}, K loop "
                                                    f"{m.get('k_loop_trips_per_tile')} trips/tile"
                                                    if "tile_loop" in m else "", m["notes"]) if x)
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
            f"{'HMMA':>5} {'HGMMA':>5} {'FFMA':>5} {'family':>6} {'epi/sc':>6} {'kloop':>6} {'mma/sc':>6} "
            f"{'L2B/FLOP':>8}"]
    for c in results:
        if c.returncode != 0:
            rows.append(f"sm_{c.arch:4} {c.source}: COMPILE FAILED")
            continue
        for k in sorted(c.kernels, key=lambda k: k.name):
            sc = k.sass_counts
            epi = "-" if k.epilogue_instructions_per_score is None else f"{k.epilogue_instructions_per_score:.1f}"
            kloop = "-" if k.k_loop_instructions_per_score is None else f"{k.k_loop_instructions_per_score:.1f}"
            mma = "-" if k.mma_instructions_per_score is None else f"{k.mma_instructions_per_score:.2f}"
            l2 = "-" if not k.l2_bytes_per_flop else f"{k.l2_bytes_per_flop['with_gate']:.4f}"
            rows.append(f"sm_{k.arch:4} {k.name[:58]:58} {k.registers:4d} {k.smem:5d} {k.stack:5d} "
                        f"{k.spill_stores:5d}/{k.spill_loads:<5d} {sc.get('HMMA', '-'):>5} "
                        f"{sc.get('HGMMA', '-'):>5} {sc.get('FFMA', '-'):>5} "
                        f"{k.tensor_core_family or '-':>6} {epi:>6} {kloop:>6} {mma:>6} {l2:>8}")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", help="e.g. 80, 90a (default both)")
    parser.add_argument("--json", help="also write the rows as JSON")
    parser.add_argument("--txt", help="also write the table as text")
    args = parser.parse_args(argv)
    results = compile_all(tuple(args.arch or ARCHS))
    text = "\n".join([
        table(results),
        "smem = static shared memory; dynamic: mma.sync forward 66048 B per block, wgmma forward "
        "4*(192+N)*64 + 96*(N+8)*5 + 4*N + 384*2*24 + 24 B (N = 192: 213528), backward "
        "4*L*32*V + sizeof(T)*128*32*V B (V = 2 for L <= 256, else 1)",
        f"epi/sc, kloop, mma/sc: thread-instructions per score element of the tile loop less its "
        f"K loop (other), of the K loop (other), of the tile loop (math); "
        f"L2B/FLOP: operand + gate bytes from L2 per FLOP; at L = {REFERENCE['l']}, "
        f"D = {REFERENCE['d']} (benchmarks/cuda_resources.py docstring)",
        f"nvcc: {nvcc_version()}"])
    print(text)
    if args.txt:
        with open(args.txt, "w") as f:
            f.write(text + "\n")
    for c in results:
        if c.returncode != 0:
            print(c.log, file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(k)} for c in results for k in c.kernels], f, indent=1)
    return 0 if all(c.returncode == 0 for c in results) else 1


if __name__ == "__main__":
    sys.exit(main())
