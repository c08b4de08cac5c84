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

    python benchmarks/triton_resources.py                # table
    python benchmarks/triton_resources.py --json out.json --target sm_90 --precision fp16

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
    """Triton signature: pointers get their element type, constexprs 'constexpr', the rest i32."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_types.get(name, "fp32")
        else:
            signature[name] = "i32"
    return signature


def _launch_attrs(fn, constexprs: dict, ints: dict) -> dict:
    """The divisibility a launch specialises on: every pointer (torch allocations are aligned)
    and every integer argument divisible by 16."""
    attrs = {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            continue
        if name.endswith("_ptr") or ints.get(name, 1) % 16 == 0:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return attrs


def kernel_specs(dtype: torch.dtype, precision: str, geometry: dict):
    """(name, jit function, pointer types, constexprs, num_warps, num_stages, label) of every
    kernel as the launch wrappers run them for ``geometry``; every forward candidate."""
    feature = _TRITON_TYPE[dtype]
    ints = {"q_index_ptr": "i32", "g_index_ptr": "i32"}
    len_q, len_g, dim = geometry["len_q"], geometry["len_g"], geometry["dim"]
    for fwd in kernels.forward_candidates(len_q, len_g, dim, dtype):
        strip = fwd.variant == "strip"
        constexprs = dict(HAS_GATE=True, BLOCK_S=fwd.block_s, BLOCK_T=fwd.block_t,
                          BLOCK_K=fwd.block_k, GROUP_Q=fwd.group_q, INPUT_PRECISION=precision)
        if strip:
            constexprs["NUM_S"] = triton.cdiv(len_g, fwd.block_s)
        yield ("forward", kernels._max_sim_forward_strip_kernel if strip
               else kernels._max_sim_forward_kernel,
               {"q_ptr": feature, "g_ptr": feature, **ints}, constexprs,
               fwd.num_warps, fwd.num_stages, fwd.name)
    bwd = kernels.backward_config(len_q, len_g, dim, dtype)
    blocks = dict(BLOCK_S=bwd.block_s, BLOCK_T=bwd.block_t, BLOCK_D=bwd.block_d,
                  ROUTE_FP32=dtype == torch.float16, INPUT_PRECISION=precision,
                  HAS_GATE=True, HAS_GRAD_Q=True, HAS_GRAD_G=True)
    label = f"{bwd.block_s}x{bwd.block_t}x{bwd.block_d}-w{bwd.num_warps}-s{bwd.num_stages}"
    yield ("backward_query", kernels._max_sim_backward_query_kernel,
           {"g_ptr": feature, **ints}, blocks, bwd.num_warps, bwd.num_stages, label)
    yield ("backward_gallery", kernels._max_sim_backward_gallery_kernel,
           {"q_ptr": feature, **ints}, blocks, bwd.num_warps, bwd.num_stages, label)
    if dtype == torch.float32 and precision == "ieee":  # reads no features: one dtype is enough
        yield ("backward_score_embed", kernels._max_sim_backward_score_embed_kernel, ints,
               dict(BLOCK_S=bwd.block_s, BLOCK_T=bwd.block_t, HAS_GRAD_Q=True, HAS_GRAD_G=True),
               bwd.num_warps, 1, f"{bwd.block_s}x{bwd.block_t}-w{bwd.num_warps}-s1")


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if found is None:
        raise RuntimeError(f"cuobjdump output not understood:\n{out}")
    reg, stack, shared, local = map(int, found.groups())
    return {"registers": reg, "stack_bytes": stack, "static_shared_bytes": shared,
            "local_bytes": local}


def compile_one(target, geometry: dict, spec) -> dict:
    name, fn, pointers, constexprs, warps, stages, label = spec
    source = ASTSource(fn=fn, signature=_signature(fn, pointers, constexprs),
                       constexprs=constexprs, attrs=_launch_attrs(fn, constexprs, geometry))
    compiled = triton.compile(source, target=target,
                              options={"num_warps": warps, "num_stages": stages})
    ptx = compiled.asm["ptx"]
    row = {"kernel": name, "config": label, "num_warps": warps, "num_stages": stages,
           "shared_bytes": compiled.metadata.shared,
           "wgmma": "wgmma.mma_async" in ptx,
           "mma": bool(re.search(r"\bmma\.sync\.aligned", ptx)),
           "cp_async": "cp.async" in ptx,
           **_resource_usage(compiled.asm["cubin"])}
    row["spills"] = row["local_bytes"] > 0 or row["stack_bytes"] > 0
    row["has_dot"] = name != "backward_score_embed"
    return row


def compile_all(precisions=None, targets=None, geometries=None):
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
                for spec in kernel_specs(dtype, precision, geometry):
                    rows.append({"target": target_name, "precision": label,
                                 "geometry": geometry_name,
                                 **compile_one(target, geometry, spec)})
    return rows


def table(rows) -> str:
    lines = [f"{'target':6} {'precision':9} {'geometry':8} {'kernel':20} {'config':28} "
             f"{'regs':>4} {'smem':>6} {'spill':>5} {'cp.async':>8} tensor-cores"]
    for r in rows:
        cores = "wgmma" if r["wgmma"] else ("mma" if r["mma"] else "none")
        lines.append(f"{r['target']:6} {r['precision']:9} {r['geometry']:8} {r['kernel']:20} "
                     f"{r['config']:28} {r['registers']:>4} {r['shared_bytes']:>6} "
                     f"{('yes' if r['spills'] else 'no'):>5} "
                     f"{('yes' if r['cp_async'] else 'no'):>8} {cores}")
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
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    rows = compile_all(args.precision, args.target, args.geometry)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "torch": torch.__version__,
                       "geometries": GEOMETRIES, "kernels": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
