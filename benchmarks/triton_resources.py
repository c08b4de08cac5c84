"""Compile every Triton kernel of ``max_sim`` ahead of time, as a real launch would, and report
what the GPU will run.

No GPU is needed: each kernel is compiled for a GPUTarget (sm_90 and sm_80 by default) in every
dtype and launch configuration the launch wrappers use (for the forward: every candidate of
``forward_candidates``, the GPU suite's sweep), with the specialisation a launch gets: pointers
from torch's allocator are 16-byte aligned and integer arguments divisible by 16 are marked so
(``tt.divisibility``), which is what lets Triton vectorise loads and use ``cp.async``. Two
geometries: the suite's (L = 192, D = 512: everything aligned) and ``D % 16 != 0`` (D = 500:
rows not 16-byte aligned). Per kernel: registers, shared memory, spills (ptxas, via
``cuobjdump --dump-resource-usage``) and the tensor-core family in the PTX (``wgmma`` on Hopper,
``mma`` on Ampere).

Per forward candidate also a static measure read off the SASS (``cuobjdump -sass``, parsed
with benchmarks/sass_measure.py; see ``tile_loop_measure`` for how the loops are found): ``epilogue_instructions_per_score``, the SASS
instructions of the tile loop that are neither tensor-core (HGMMA/HMMA/WARPGROUP.*) nor
load/store (LD*/ST*/UTMA*/...), each times the iterations of the loop it sits in, per score
element of the tile, in thread-instructions (instructions x threads of the block / score
elements of one tile-loop iteration). An H100 SM issues 128 thread-instructions a clock and
does 2048 fp16 FMA a clock, so at D = 512 the MMA of one score element takes the time of ~32:
a measure well under 32 leaves the issue slots to the tensor cores. Also
``mma_instructions_per_score`` (same units), and the analytic bytes a candidate's tiling reads
and writes through L2 per FLOP (every tile load counted, none assumed to hit L1). The JSON
entry also breaks the epilogue figure down by opcode (``epilogue_breakdown``).

    python benchmarks/triton_resources.py                # table
    python benchmarks/triton_resources.py --json out.json --target sm_90 --precision fp16
    python benchmarks/triton_resources.py --target sm_90 --precision bf16 --geometry aligned \
        --ablation gate_off --ablation max_only --ablation mma_only   # the ncu ablations

Run it without TRITON_INTERPRET (the interpreter has nothing to compile).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from transmatcher_fast.kernels import max_sim as kernels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sass_measure  # noqa: E402  (beside this script; shared with cuda_resources.py)

# Image counts, locations (24x8) and features of the suite's evaluation shape; and a feature
# size whose rows are not 16-byte aligned.
GEOMETRIES = {
    "aligned": dict(num_query=256, num_gallery=4096, len_q=192, len_g=192, dim=512),
    "D%16!=0": dict(num_query=256, num_gallery=4096, len_q=192, len_g=192, dim=500),
}
TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}
# (label, feature dtype, input_precision): 16-bit and TF32 use tensor cores; ieee is exact fp32.
PRECISIONS = [
    ("fp16", torch.float16, "tf32"),
    ("bf16", torch.bfloat16, "tf32"),
    ("fp32-tf32", torch.float32, "tf32"),
    ("fp32-ieee", torch.float32, "ieee"),
]
_TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _signature(fn, pointer_types: dict, constexprs: dict) -> dict:
    """Triton signature: pointers get their element type (or a full ``tensordesc<...>`` type:
    TMA descriptors), constexprs 'constexpr', the rest i32."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            kind = pointer_types.get(name, "fp32")
            signature[name] = kind if kind.startswith("tensordesc") else "*" + kind
        else:
            signature[name] = "i32"
    return signature


def _descriptor_type(dtype: torch.dtype, block: list) -> str:
    """The signature type of a TMA descriptor argument, as a launch would mangle it."""
    from triton.runtime.jit import mangle_type
    return mangle_type(kernels._descriptor(torch.empty(1, 16, 512, dtype=dtype), *block))


def _launch_attrs(fn, constexprs: dict, ints: dict, descriptors=()) -> dict:
    """The divisibility a launch specialises on: every pointer (torch allocations are aligned)
    and every integer argument divisible by 16; none for TMA descriptors."""
    attrs = {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs or name in descriptors:
            continue
        if name.endswith("_ptr") or ints.get(name, 1) % 16 == 0:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return attrs


def kernel_specs(dtype: torch.dtype, precision: str, geometry: dict, ablation: str | None = None):
    """(name, jit function, pointer types, constexprs, num_warps, num_stages, label, forward
    config or None, integer arguments beyond ``geometry``) of every kernel as the launch
    wrappers run them for ``geometry``; every forward candidate. With ``ablation`` (one of
    kernels.ABLATIONS, the GPU suite's ncu cases), the forward candidates alone, as
    ``forward(..., ablation=...)`` launches them."""
    feature = _TRITON_TYPE[dtype]
    code = kernels._ABLATION_CODES[ablation] if ablation else kernels.FULL.value
    ints = {"q_index_ptr": "i32", "g_index_ptr": "i32"}
    len_q, len_g, dim = geometry["len_q"], geometry["len_g"], geometry["dim"]
    for fwd in kernels.forward_candidates(len_q, len_g, dim, dtype):
        num_s = triton.cdiv(len_g, fwd.block_s)
        constexprs = dict(HAS_GATE=ablation != "gate_off", BLOCK_S=fwd.block_s,
                          BLOCK_T=fwd.block_t, BLOCK_K=fwd.block_k, INPUT_PRECISION=precision,
                          ABLATION=code)
        pointers = {"q_ptr": feature, "g_ptr": feature, **ints}
        if fwd.variant == "pairs":  # as kernels.forward launches it
            fn = kernels._max_sim_forward_pairs_kernel
            constexprs.update(kernels.pairs_constexprs(fwd, len_q, len_g, dim), TMA=fwd.tma)
            if fwd.tma:
                pointers.update(q_ptr=_descriptor_type(dtype, [fwd.block_t, fwd.block_k]),
                                g_ptr=_descriptor_type(dtype, [fwd.block_s, fwd.block_k]))
        elif fwd.variant == "strip":
            fn = kernels._max_sim_forward_strip_kernel
            constexprs.update(NUM_S=num_s, GROUP_Q=fwd.group_q)
        else:
            fn = kernels._max_sim_forward_kernel
            constexprs.update(GROUP_Q=fwd.group_q)
        yield ("forward", fn, pointers, constexprs,
               fwd.num_warps, fwd.num_stages, fwd.name + (f"-{ablation}" if ablation else ""),
               fwd, {"group_g": fwd.group_g})
    if ablation:
        return
    bwd = kernels.backward_config(len_q, len_g, dim, dtype)
    # d query and d gallery: one gather kernel, launched once per side (max_sim_gather.launch).
    gather = kernels.max_sim_gather._max_sim_backward_gather_kernel
    label = f"d{bwd.block_d}-c{bwd.chunk}-w{bwd.num_warps}"
    pointers = {"other_ptr": feature, "idx_own_ptr": "i32", "idx_oth_ptr": "i32",
                "order_ptr": "i32", "start_ptr": "i32"}
    num_query, num_gallery = geometry["num_query"], geometry["num_gallery"]
    for side, own, other, n_oth, pair, gate in (
            ("query", len_q, len_g, num_gallery, (num_gallery, 1), (1, len_q)),
            ("gallery", len_g, len_q, num_query, (1, num_gallery), (len_q, 1))):
        values = dict(n_oth=n_oth, l_own=own, l_oth=other, dim=dim, pair_so=pair[0],
                      pair_sx=pair[1], gate_so=gate[0], gate_sx=gate[1])
        yield (f"backward_{side}", gather, pointers,
               dict(HAS_GATE=True, HAS_OWN=True, HAS_OTH=True, BLOCK_D=bwd.block_d,
                    CHUNK=bwd.chunk), bwd.num_warps, 1, label, None, values)
    if dtype == torch.float32 and precision == "ieee":  # reads no features: one dtype is enough
        yield ("backward_score_embed",
               kernels.max_sim_score_embed._max_sim_backward_score_embed_kernel, ints,
               dict(BLOCK_S=bwd.block_s, BLOCK_T=bwd.block_t, HAS_GRAD_Q=True, HAS_GRAD_G=True),
               8, 1, f"{bwd.block_s}x{bwd.block_t}-w8-s1", None, {})


def _cuobjdump_output(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_cuobjdump(), flag, f.name],
                              capture_output=True, text=True, check=True).stdout


# --------------------------------------------------------------------------------------------
# The static measure, from the SASS.

def tile_loop_measure(sass: str, k_iterations: int, threads: int, scores_per_tile: int) -> dict:
    """The static measure of a forward, per score element in thread-instructions, from the SASS
    text of the kernel (parsing, loops and instruction classes: benchmarks/sass_measure.py).

    How the loops are found: a branch whose target lies at or before it closes a loop whose body
    is the address range from the target to the branch (sass_measure.find_loops). The K loop is
    the innermost loop holding tensor-core instructions (HGMMA/HMMA); the tile loop is the
    innermost loop around it, one iteration of which produces one score tile (the "tiled" s0
    loop, the "strip" t0 loop, the "pairs" gallery-image loop). The epilogue is the tile loop
    less the K loop: the gate, max and argmax, stores, the next tile's set-up; it counts once
    per tile (``epilogue_instructions_per_score``, the figure the issue's "about 34" for the
    default refers to). The K loop's own non-MMA, non-memory instructions (addresses,
    barriers, pipeline waits) count ``k_iterations`` times (ceil(D / BLOCK_K), the dot's trip
    count; Triton's pipelined loop runs it whole with predicated prefetches) and are reported
    apart (``k_loop_instructions_per_score``), as are the MMA instructions. Any other loop
    inside the tile loop (none in these kernels) would count once per tile."""
    instructions = sass_measure.parse_sass(sass)
    loops = sass_measure.find_loops(instructions)
    k_loops = [lp for lp in loops if any(i.base in ("HGMMA", "HMMA") for i in lp.instructions)]
    if not k_loops:
        return {"epilogue_instructions_per_score": None, "mma_instructions_per_score": None,
                "measure_note": "no tensor-core loop (exact fp32 FMA dot)"}
    k_loop = min(k_loops, key=lambda lp: lp.end - lp.start)
    outer = [lp for lp in loops if lp.contains(k_loop)]
    if not outer:
        return {"epilogue_instructions_per_score": None, "mma_instructions_per_score": None,
                "measure_note": "no loop around the K loop"}
    tile_loop = min(outer, key=lambda lp: lp.end - lp.start)
    in_k = sass_measure.loop_counts(k_loop)  # one K iteration
    whole = sass_measure.loop_counts(tile_loop)  # one tile, every loop counted once

    def per_score(count, iterations=1):
        return sass_measure.per_score(count, threads=threads, scores=scores_per_tile,
                                      iterations=iterations)

    other, tensor_core = sass_measure.OTHER, sass_measure.TENSOR_CORE
    breakdown = {}  # the epilogue by opcode (modifiers dropped), most frequent first
    for ins in tile_loop.instructions:
        if ins.kind == other and not k_loop.start <= ins.address <= k_loop.end:
            breakdown[ins.base] = breakdown.get(ins.base, 0) + 1
    breakdown = {op: round(per_score(n), 2)
                 for op, n in sorted(breakdown.items(), key=lambda item: -item[1])}
    return {"epilogue_instructions_per_score": round(per_score(whole[other] - in_k[other]), 2),
            "epilogue_breakdown": breakdown,
            "k_loop_instructions_per_score": round(per_score(in_k[other], k_iterations), 2),
            "mma_instructions_per_score": round(
                per_score(whole[tensor_core] - in_k[tensor_core])
                + per_score(in_k[tensor_core], k_iterations), 3),
            "tile_loop_sass": [hex(tile_loop.start), hex(tile_loop.end)],
            "k_loop_sass": [hex(k_loop.start), hex(k_loop.end)]}


def l2_bytes_per_flop(config, geometry: dict, itemsize: int) -> float:
    """Bytes one pair moves through L2 per useful FLOP under ``config``'s tiling: every tile of
    features loaded (padded), the gate, and the outputs (8 bytes: value and index), with the
    read-back of g_best between query blocks where the variant has one."""
    len_q, len_g, dim = geometry["len_q"], geometry["len_g"], geometry["dim"]
    blocks_t = triton.cdiv(len_q, config.block_t)
    blocks_s = triton.cdiv(len_g, config.block_s)
    rows_s, rows_t = blocks_s * config.block_s, blocks_t * config.block_t
    gate = 4 * rows_s * rows_t
    if config.variant == "tiled":  # every (s, t) tile loads both its row blocks
        features = blocks_t * blocks_s * (config.block_s + config.block_t) * dim
        outputs = 8 * (len_q + blocks_t * len_g + (blocks_t - 1) * len_g)
    elif config.variant == "strip":  # a query block meets the whole gallery image
        features = blocks_t * (rows_s + config.block_t) * dim
        outputs = 8 * (len_q + len_g)
    else:  # pairs: as strip, the gate once per group_g pairs, g_best read back between blocks
        features = blocks_t * (rows_s + config.block_t) * dim
        gate /= config.group_g
        outputs = 8 * (len_q + blocks_t * len_g + (blocks_t - 1) * len_g)
    return (features * itemsize + gate + outputs) / (2.0 * len_q * len_g * dim)


def _resource_usage(cubin: bytes) -> dict:
    out = _cuobjdump_output(cubin, "--dump-resource-usage")
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if found is None:
        raise RuntimeError(f"cuobjdump output not understood:\n{out}")
    reg, stack, shared, local = map(int, found.groups())
    return {"registers": reg, "stack_bytes": stack, "static_shared_bytes": shared,
            "local_bytes": local}


def compile_one(target, geometry: dict, spec, dtype: torch.dtype = torch.float16) -> dict:
    name, fn, pointers, constexprs, warps, stages, label, config, values = spec
    ints = dict(geometry, **values)  # the integer arguments a launch passes, for divisibility
    descriptors = [n for n, kind in pointers.items() if kind.startswith("tensordesc")]
    source = ASTSource(fn=fn, signature=_signature(fn, pointers, constexprs),
                       constexprs=constexprs, attrs=_launch_attrs(fn, constexprs, ints, descriptors))
    compiled = triton.compile(source, target=target,
                              options={"num_warps": warps, "num_stages": stages})
    ptx = compiled.asm["ptx"]
    row = {"kernel": name, "config": label, "num_warps": warps, "num_stages": stages,
           "shared_bytes": compiled.metadata.shared,
           "wgmma": "wgmma.mma_async" in ptx,
           "mma": bool(re.search(r"\bmma\.sync\.aligned", ptx)),
           "cp_async": "cp.async" in ptx,
           "tma": "cp.async.bulk.tensor" in ptx,
           **_resource_usage(compiled.asm["cubin"])}
    row["spills"] = row["local_bytes"] > 0 or row["stack_bytes"] > 0
    row["has_dot"] = name == "forward"  # the backward gathers rows: no tensor cores
    row["tensor_cores"] = "wgmma" if row["wgmma"] else ("mma" if row["mma"] else None)
    row["sm"] = f"sm_{target.arch}"
    if config is not None:
        num_s = triton.cdiv(geometry["len_g"], config.block_s)
        scores = config.block_s * config.block_t * (num_s if config.variant != "tiled" else 1)
        row["variant"] = config.variant
        sass = _cuobjdump_output(compiled.asm["cubin"], "-sass")
        row["tma_loads_in_sass"] = sass.count("UTMALDG")  # TMA tile loads (sm_90)
        row.update(tile_loop_measure(sass,
                                     triton.cdiv(geometry["dim"], config.block_k),
                                     32 * warps, scores))
        row["l2_bytes_per_flop"] = round(l2_bytes_per_flop(config, geometry, dtype.itemsize), 5)
    return row


def _first_of_each_variant(specs):
    """The first forward candidate of each variant (an ablation switch is the same for all the
    tile shapes of a variant, so one compile per variant checks it)."""
    seen = set()
    for spec in specs:
        if spec[7].variant not in seen:
            seen.add(spec[7].variant)
            yield spec


def compile_all(precisions=None, targets=None, geometries=None, ablations=None):
    """Rows for every kernel; with ``ablations``, the forward alone under each ablation, one
    candidate per variant."""
    rows = []
    for target_name, target in TARGETS.items():
        if targets and target_name not in targets:
            continue
        for label, dtype, precision in PRECISIONS:
            if precisions and label not in precisions:
                continue
            for geometry_name, geometry in GEOMETRIES.items():
                if geometries and geometry_name not in geometries:
                    continue
                runs = [(None, kernel_specs(dtype, precision, geometry))]
                if ablations:
                    runs = [(a, _first_of_each_variant(kernel_specs(dtype, precision, geometry, a)))
                            for a in ablations]
                for ablation, specs in runs:
                    for spec in specs:
                        rows.append({"target": target_name, "precision": label,
                                     "geometry": geometry_name, "ablation": ablation,
                                     **compile_one(target, geometry, spec, dtype)})
    return rows


def table(rows) -> str:
    def number(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [f"{'target':6} {'precision':9} {'geometry':8} {'kernel':20} {'config':28} "
             f"{'regs':>4} {'smem':>6} {'spill':>5} {'cp.async':>8} {'tma':>3} {'tensor-cores':12} "
             f"{'epi/score':>9} {'kloop/score':>11} {'mma/score':>9} {'L2 B/FLOP':>9}"]
    for r in rows:
        lines.append(f"{r['target']:6} {r['precision']:9} {r['geometry']:8} {r['kernel']:20} "
                     f"{r['config']:28} {r['registers']:>4} {r['shared_bytes']:>6} "
                     f"{('yes' if r['spills'] else 'no'):>5} "
                     f"{('yes' if r['cp_async'] else 'no'):>8} {('yes' if r['tma'] else 'no'):>3} "
                     f"{r['tensor_cores'] or 'none':12} "
                     f"{number(r.get('epilogue_instructions_per_score'), 1):>9} "
                     f"{number(r.get('k_loop_instructions_per_score'), 1):>11} "
                     f"{number(r.get('mma_instructions_per_score'), 2):>9} "
                     f"{number(r.get('l2_bytes_per_flop'), 4):>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--precision", action="append", choices=[p[0] for p in PRECISIONS],
                        help="only these precisions (repeatable; default: all)")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS),
                        help="only these targets (repeatable; default: all)")
    parser.add_argument("--geometry", action="append", choices=sorted(GEOMETRIES),
                        help="only these geometries (repeatable; default: all)")
    parser.add_argument("--ablation", action="append", choices=kernels.ABLATIONS,
                        help="instead: the forward under these benchmark ablations, one "
                             "candidate per variant (repeatable)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    rows = compile_all(args.precision, args.target, args.geometry, args.ablation)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "torch": torch.__version__,
                       "geometries": GEOMETRIES, "kernels": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
