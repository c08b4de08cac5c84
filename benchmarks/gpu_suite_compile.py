"""GPU suite, compile: every Triton kernel the later sections launch, compiled first by parallel
worker processes into Triton's on-disk cache (a launch in one process compiles serially, about
a second or two each on the GPU box; later sections then load them in milliseconds).

A job launches the same code path as its section on inputs of the same Triton specialisation:
the same L, D and dtype, and image counts of the same kind (1, a multiple of 16, or neither), so
the cache key is the one the section will look up. ``jobs()`` is also what the plan counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import gpu_suite_common as common

LABEL_DTYPES = {label: (dtype, tf32) for label, dtype, tf32 in common.PRECISIONS}


def same_kind(n: int) -> int:
    """A small image count Triton specialises like ``n`` (ints: == 1, % 16 == 0, or other)."""
    return n if n < 16 else (16 if n % 16 == 0 else 17)


def jobs(backends, kernels=None, order_variants=False) -> list:
    """Distinct Triton launches of the correctness, sweep, training and evaluation sections, and
    the tile-sum baselines: [{"kind": "op" | "config" | "tile_sums", ...}]."""
    from gpu_suite_correctness import op_launches
    from gpu_suite_variants import SWEEP_CLASSES, triton_candidates

    if "triton" not in backends:
        return []
    found = []

    def add(job):
        if job not in found:
            found.append(job)
    for (nq, ng, lq, lg, d), label, gate, backward in op_launches():
        add({"kind": "op", "shape": [same_kind(nq), same_kind(ng), lq, lg, d], "label": label,
             "gate": gate, "backward": backward})
    add({"kind": "op", "shape": [16, 16, 192, 192, 512], "label": "fp16", "gate": True,
         "backward": True})  # training
    for label in ("bf16", "fp32-tf32"):
        add({"kind": "op", "shape": [16, 16, 192, 192, 512], "label": label, "gate": True,
             "backward": False})  # evaluation and market
    for cls, ((nq, ng, lq, lg, d), dtype, tf32) in SWEEP_CLASSES.items():
        label = {"float16": "fp16", "bfloat16": "bf16"}.get(dtype, "fp32-tf32" if tf32 else "fp32-ieee")
        if kernels is not None:
            import torch

            configs, _ = triton_candidates(kernels, lq, lg, d, getattr(torch, dtype), order_variants)
            for index, config in enumerate(configs):
                for gate in ((True, False) if index == 0 and cls == "large-bf16" else (True,)):
                    add({"kind": "config", "shape": [same_kind(nq), same_kind(ng), lq, lg, d],
                         "label": label, "gate": gate, "config": dataclasses.asdict(config)})
        add({"kind": "tile_sums", "label": label})
    return found


def run_job(job: dict) -> None:
    import torch

    import transmatcher_fast
    from transmatcher_fast.kernels import max_sim as kernels
    from gpu_suite_timing import gemm_tile_sums

    dtype_name, tf32 = LABEL_DTYPES[job["label"]]
    dtype = getattr(torch, dtype_name)
    dev = common.DEVICE
    if job["kind"] == "tile_sums":
        # M and N multiples of 16, as Nq*Lq and Ng*Lg at L = 192: the same specialisation.
        a = torch.randn(320, job.get("d", 512), device=dev, dtype=dtype)
        gemm_tile_sums(a, a)
        return
    nq, ng, lq, lg, d = job["shape"]
    q = torch.randn(nq, lq, d, device=dev, dtype=dtype)
    g = torch.randn(ng, lg, d, device=dev, dtype=dtype)
    e = torch.randn(lg, lq, device=dev) if job["gate"] else None
    if job["kind"] == "config":
        outs = [torch.empty(nq, ng, lq, device=dev), torch.empty(nq, ng, lg, device=dev),
                torch.empty(nq, ng, lq, device=dev, dtype=torch.int32),
                torch.empty(nq, ng, lg, device=dev, dtype=torch.int32)]
        sig = None if e is None else torch.sigmoid(e).contiguous()
        precision = "tf32" if tf32 or dtype != torch.float32 else "ieee"
        kernels.forward(q, g, sig, outs, config=kernels.ForwardConfig(**job["config"]),
                        precision=precision)
        return
    with transmatcher_fast.use_backend("triton"), common.float32_precision(tf32):
        leaves = [t.requires_grad_(job["backward"]) if t is not None else None for t in (q, g, e)]
        q_best, g_best = transmatcher_fast.max_sim(*leaves)[:2]
        if job["backward"]:
            (q_best.sum() + g_best.sum()).backward()


def worker(jobs_path: Path, index: int, count: int, result_path: Path) -> int:
    from gpu_suite_build import import_package

    import_package(lambda text: None)

    done = []
    for job in json.loads(jobs_path.read_text())[index::count]:
        start = time.time()
        record = {"job": job}
        common.attempt(record, lambda text: None, "compile", lambda: run_job(job))
        common.sync()
        record["seconds"] = round(time.time() - start, 2)
        done.append(record)
    result_path.write_text(json.dumps(done))
    return 0


def warm_up(out: Path, log, backends, timeout: float, workers: int, order_variants=False,
            found: list | None = None) -> dict:
    """The compile section: ``workers`` processes share the jobs (``found``, default ``jobs()``);
    their results are merged."""
    from transmatcher_fast.kernels import max_sim as kernels

    start = time.time()
    found = jobs(backends, kernels, order_variants) if found is None else found
    if not found:
        return {"jobs": 0, "note": "no Triton backend"}
    workers = max(1, min(workers, len(found)))
    folder = out / "compile"
    folder.mkdir(exist_ok=True)
    jobs_path = folder / "jobs.json"
    jobs_path.write_text(json.dumps(found))
    procs = []
    for index in range(workers):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--jobs", str(jobs_path),
               "--worker", str(index), "--workers", str(workers),
               "--result", str(folder / f"worker{index}.json")]
        procs.append(common.popen(cmd, folder / f"worker{index}.log",
                                  env={**os.environ, "GPU_SUITE_DEVICE": common.DEVICE}))
    deadline = start + timeout
    for proc in procs:
        common.wait(proc, max(1.0, deadline - time.time()))
    records = []
    for index in range(workers):
        path = folder / f"worker{index}.json"
        if path.exists():
            records += json.loads(path.read_text())
    failed = [r for r in records if r.get("ok") is False]
    result = {"jobs": len(found), "workers": workers, "done": len(records),
              "failed": [{"job": r["job"], "error": r["error"][-600:]} for r in failed],
              "job_seconds_sum": round(sum(r["seconds"] for r in records), 1),
              "seconds": round(time.time() - start, 1)}
    log(f"compile: {len(records)}/{len(found)} launches in {workers} workers, "
        f"{len(failed)} failed, {result['job_seconds_sum']:.0f} s of work in {result['seconds']:.0f} s")
    return result


def estimate_s(job_count: int, workers: int, compile_s: float, start_s: float) -> float:
    return start_s + math.ceil(job_count / max(1, workers)) * compile_s if job_count else 0.0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a compile worker of gpu_suite")
    parser.add_argument("--jobs", required=True)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(worker(Path(args.jobs), args.worker, args.workers, Path(args.result)))
