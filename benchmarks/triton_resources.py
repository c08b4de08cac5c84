"""Compile every Triton kernel of ``max_sim`` ahead of time and report what the GPU will run.

No GPU is needed: each kernel is compiled for a GPUTarget (sm_90 and sm_80 by default) in every
dtype and launch configuration the launch wrappers use, and the script prints, per kernel:
registers, shared memory, spills (from ptxas via ``cuobjdump --dump-resource-usage``) and the
tensor-core instruction family in the PTX (``wgmma`` on Hopper, ``mma`` on Ampere).

    python benchmarks/triton_resources.py                # table
    python benchmarks/triton_resources.py --json out.json

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
from dataclasses import asdict

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from transmatcher_fast.kernels import max_sim as kernels

# The training/evaluation geometry of the suite: 192 locations (24x8), 512 features.
LEN, DIM = 192, 512
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


def kernel_specs(dtype: torch.dtype, precision: str):
    """(name, jit function, pointer types, constexprs, num_warps, num_stages) of every kernel as
    the launch wrappers run them for the suite's geometry."""
    feature = _TRITON_TYPE[dtype]
    ints = {"q_index_ptr": "i32", "g_index_ptr": "i32"}
    fwd = kernels.forward_config(LEN, LEN, DIM, dtype)
    yield ("forward", kernels._max_sim_forward_kernel,
           {"q_ptr": feature, "g_ptr": feature, **ints},
           dict(HAS_GATE=True, BLOCK_S=fwd.block_s, BLOCK_T=fwd.block_t, BLOCK_K=fwd.block_k,
                GROUP_Q=fwd.group_q, INPUT_PRECISION=precision),
           fwd.num_warps, fwd.num_stages)
    bwd = kernels.backward_config(LEN, LEN, DIM, dtype)
    blocks = dict(BLOCK_S=bwd.block_s, BLOCK_T=bwd.block_t, BLOCK_D=bwd.block_d,
                  INPUT_PRECISION=precision, HAS_GATE=True, HAS_GRAD_Q=True, HAS_GRAD_G=True)
    yield ("backward_query", kernels._max_sim_backward_query_kernel,
           {"g_ptr": feature, **ints}, blocks, bwd.num_warps, bwd.num_stages)
    yield ("backward_gallery", kernels._max_sim_backward_gallery_kernel,
           {"q_ptr": feature, **ints}, blocks, bwd.num_warps, bwd.num_stages)
    if dtype == torch.float32 and precision == "ieee":  # reads no features: one dtype is enough
        yield ("backward_score_embed", kernels._max_sim_backward_score_embed_kernel, ints,
               dict(BLOCK_S=bwd.block_s, BLOCK_T=bwd.block_t, HAS_GRAD_Q=True, HAS_GRAD_G=True),
               bwd.num_warps, 1)


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


def compile_all(precisions=None):
    rows = []
    for target_name, target in TARGETS.items():
        for label, dtype, precision in PRECISIONS:
            if precisions and label not in precisions:
                continue
            for name, fn, pointers, constexprs, warps, stages in kernel_specs(dtype, precision):
                source = ASTSource(fn=fn, signature=_signature(fn, pointers, constexprs),
                                   constexprs=constexprs)
                compiled = triton.compile(source, target=target,
                                          options={"num_warps": warps, "num_stages": stages})
                ptx = compiled.asm["ptx"]
                row = {
                    "target": target_name, "precision": label, "kernel": name,
                    "config": {k: v for k, v in constexprs.items() if k.startswith("BLOCK")},
                    "num_warps": warps, "num_stages": stages,
                    "shared_bytes": compiled.metadata.shared,
                    "wgmma": "wgmma.mma_async" in ptx,
                    "mma": bool(re.search(r"\bmma\.sync\.aligned", ptx)),
                    **_resource_usage(compiled.asm["cubin"]),
                }
                row["spills"] = row["local_bytes"] > 0 or row["stack_bytes"] > 0
                row["has_dot"] = name != "backward_score_embed"
                rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--precision", action="append", choices=[p[0] for p in PRECISIONS],
                        help="only these precisions (repeatable; default: all)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    rows = compile_all(args.precision)
    header = f"{'target':6} {'precision':10} {'kernel':17} {'blocks':16} {'warps':>5} " \
             f"{'stages':>6} {'regs':>4} {'smem':>7} {'spill':>5} tensor-cores"
    print(header)
    for r in rows:
        blocks = "x".join(str(v) for v in r["config"].values())
        cores = "wgmma" if r["wgmma"] else ("mma" if r["mma"] else "none")
        print(f"{r['target']:6} {r['precision']:10} {r['kernel']:17} {blocks:16} "
              f"{r['num_warps']:>5} {r['num_stages']:>6} {r['registers']:>4} "
              f"{r['shared_bytes']:>7} {('yes' if r['spills'] else 'no'):>5} {cores}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "torch": torch.__version__,
                       "geometry": {"L": LEN, "D": DIM}, "kernels": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
