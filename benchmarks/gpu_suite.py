"""Everything that needs a GPU, in one call: build, correctness, timings, memory.

    python benchmarks/gpu_suite.py --out DIR        # DIR default: benchmarks/results/

1. Builds the CUDA extension (``pip install --no-build-isolation --no-deps -e .``) unless
   ``--skip-build``, so backend "cuda" exists beside "triton".
2. Correctness of every CUDA backend against the float64 reference, with poisoned outputs:
   float32 (ieee and TF32), float16 and bfloat16; forward values, argmax and all three gradients;
   Triton and CUDA must agree on the argmax (float32, ieee). Then the Triton pytest file on CUDA.
3. Timings with ``triton.testing.do_bench`` (median of many runs after warm-up; inputs rotate
   through copies larger than L2) of: each backend, the reference in the same dtype (upstream's
   materialised computation, in gallery chunks where it would not fit), ``torch.compile`` of it,
   and a cuBLAS GEMM of the same FLOPs (the speed limit), FLOPs = 2*Nq*Ng*Lq*Lg*D. Shapes:
   training (64x64 pairs, L=192, D=512, forward+backward, fp16 autocast) and evaluation
   (256x4096 pairs, forward, bf16 and fp32). Peak memory is torch.cuda.max_memory_allocated above
   the inputs.

Writes ``gpu_suite_<device>.json`` and ``gpu_suite_<device>.log`` to --out; every section is saved
as soon as it finishes, and a failing check is recorded, not fatal.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_extension(log) -> dict:
    env = {**os.environ}
    env.setdefault("TRANSMATCHER_FAST_CUDA_ARCH", "90a")  # H100/H200 only: half the compile time
    start = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
        cwd=REPO, env=env, capture_output=True, text=True)
    log(result.stdout[-4000:] + result.stderr[-4000:])
    return {"returncode": result.returncode, "seconds": round(time.time() - start, 1),
            "arch": env["TRANSMATCHER_FAST_CUDA_ARCH"]}


# The rest imports torch and the package only after the build.


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--skip-pytest", action="store_true")
    parser.add_argument("--quick", action="store_true", help="skip the evaluation-size timings")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_lines = []

    def log(text):
        print(text, flush=True)
        log_lines.append(str(text))

    results = {"date": datetime.datetime.now().isoformat(timespec="seconds")}
    build = None if args.skip_build else build_extension(log)

    import torch

    import transmatcher_fast
    from transmatcher_fast import benchmarking
    from transmatcher_fast.ops import dispatch

    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-cuda"
    tag = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
    json_path, log_path = out / f"gpu_suite_{tag}.json", out / f"gpu_suite_{tag}.log"

    def save():
        json_path.write_text(json.dumps(results, indent=1, default=str))
        log_path.write_text("\n".join(log_lines) + "\n")

    results.update(environment=benchmarking.environment(torch.device("cuda"))
                   if torch.cuda.is_available() else {"python": platform.python_version()},
                   build=build, device=device_name)
    if not torch.cuda.is_available():
        log("no CUDA device: nothing to do")
        save()
        return 1
    backends = [b for b in ("triton", "cuda") if b in dispatch.available_backends("cuda")]
    results["backends"] = backends
    log(f"device {device_name}; backends {backends}; torch {torch.__version__}")
    save()

    sections = [("correctness", lambda: correctness(backends, log)),
                ("pytest", None if args.skip_pytest else lambda: run_pytest(log)),
                ("training", lambda: bench_training(backends, log)),
                ("evaluation", None if args.quick else lambda: bench_evaluation(backends, log)),
                ("market_eval", None if args.quick else lambda: bench_market_eval(out, log))]
    for name, section in sections:
        if section is None:
            continue
        start = time.time()
        try:
            results[name] = section()
        except Exception:  # recorded, and the suite goes on
            results[name] = {"error": traceback.format_exc()}
            log(results[name]["error"])
        log(f"[{name}] {time.time() - start:.1f} s")
        save()
    plot(results, out / f"gpu_suite_{tag}.png", log)
    failures = [c for c in results.get("correctness", {}).get("checks", []) if not c["ok"]]
    log(f"correctness failures: {len(failures)}")
    save()
    return 1 if failures or "error" in results.get("correctness", {}) else 0


# --------------------------------------------------------------------------------------------
# Correctness


@contextlib.contextmanager
def float32_precision(tf32: bool):
    import torch

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def correctness(backends, log, device="cuda", shapes=None, labels=None) -> dict:
    import torch

    import transmatcher_fast
    from transmatcher_fast import reference
    from transmatcher_fast.ops import dispatch

    dispatch.poison_outputs(True)
    shapes = shapes or [(3, 4, 37, 21, 40), (8, 8, 192, 192, 512), (5, 3, 128, 96, 129)]
    precisions = [("fp32-ieee", torch.float32, False), ("fp32-tf32", torch.float32, True),
                  ("fp16", torch.float16, False), ("bf16", torch.bfloat16, False)]
    precisions = [p for p in precisions if labels is None or p[0] in labels]
    checks, indices = [], {}
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        nq, ng, lq, lg, d = shape
        base = [torch.randn(s, generator=gen, dtype=torch.float64)
                for s in ((nq, lq, d), (ng, lg, d), (lg, lq))]
        grad_q = torch.randn((nq, ng, lq), generator=gen)
        grad_g = torch.randn((nq, ng, lg), generator=gen)
        for label, dtype, tf32 in precisions:
            q16, g16 = base[0].to(dtype), base[1].to(dtype)
            # The reference in the same dtype: what the 16-bit tolerance is measured against.
            same_dtype = reference.max_sim(q16.double(), g16.double(), base[2])
            for backend in backends:
                with transmatcher_fast.use_backend(backend), float32_precision(tf32):
                    leaves = [q16.to(device).requires_grad_(), g16.to(device).requires_grad_(),
                              base[2].float().to(device).requires_grad_()]
                    q_best, g_best, q_index, g_index = transmatcher_fast.max_sim(
                        *leaves, return_indices=True)
                    ((q_best * grad_q.to(device)).sum()
                     + (g_best * grad_g.to(device)).sum()).backward()
                routed = reference.max_sim_grads(
                    grad_q.double(), grad_g.double(), q16.double(), g16.double(), base[2],
                    q_index.cpu(), g_index.cpu())
                # Forward against the exact scores of the rounded inputs; gradients against the
                # float64 formula routed through the backend's own argmax.
                # 16-bit inputs are exact in float64 and accumulate in fp32: the forward is as
                # tight as fp32; their gradients round the routed weights to 16 bits.
                fwd_limit = {"fp32-tf32": 5e-3}.get(label, 1e-5 if label == "fp32-ieee" else 1e-4)
                grad_limit = {"fp32-ieee": 1e-5, "fp32-tf32": 5e-3, "fp16": 5e-3}.get(label, 2e-2)
                errors = {
                    "q_best": _rel_err(q_best, same_dtype[0]),
                    "g_best": _rel_err(g_best, same_dtype[1]),
                    "grad_query": _rel_err(leaves[0].grad, routed[0]),
                    "grad_gallery": _rel_err(leaves[1].grad, routed[1]),
                    "grad_score_embed": _rel_err(leaves[2].grad, routed[2]),
                }
                index_ok = _indices_select_the_max(q16, g16, base[2], q_index.cpu(),
                                                   g_index.cpu(), fwd_limit)
                ok = (index_ok and all(errors[k] <= fwd_limit for k in ("q_best", "g_best"))
                      and all(errors[k] <= grad_limit for k in errors if k.startswith("grad")))
                checks.append({"backend": backend, "precision": label, "shape": shape,
                               "errors": errors, "indices_select_the_max": index_ok, "ok": ok})
                log(f"{backend:7} {label:9} {shape}: {'ok' if ok else 'FAIL'} "
                    + " ".join(f"{k}={v:.1e}" for k, v in errors.items()))
                if label == "fp32-ieee":
                    indices[(backend, shape)] = (q_index.cpu(), g_index.cpu(),
                                                 [leaf.grad.cpu() for leaf in leaves])
    agreement = []
    if len(backends) == 2:
        for shape in shapes:
            a, b = indices[(backends[0], shape)], indices[(backends[1], shape)]
            same = torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            grads = max(_rel_err(x, y) for x, y in zip(a[2], b[2]))
            agreement.append({"shape": shape, "same_argmax": same, "grad_rel_diff": grads,
                              "ok": same and grads <= 1e-5})
            log(f"triton vs cuda {shape}: same argmax {same}, gradients {grads:.1e}")
    dispatch.poison_outputs(False)
    return {"checks": checks, "triton_vs_cuda": agreement}


def _rel_err(actual, expected) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _indices_select_the_max(query, gallery, embed, q_index, g_index, rtol) -> bool:
    import torch

    scores = torch.einsum("itd,jsd->ijst", query.double(), gallery.double()) * torch.sigmoid(embed)
    tol = rtol * scores.abs().max().item()
    at_q = scores.gather(2, q_index.long().unsqueeze(2)).squeeze(2)
    at_g = scores.gather(3, g_index.long().unsqueeze(3)).squeeze(3)
    return bool((at_q >= scores.amax(2) - tol).all() and (at_g >= scores.amax(3) - tol).all())


def run_pytest(log) -> dict:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_triton_kernels.py"], cwd=REPO, capture_output=True,
                            text=True)
    log(result.stdout[-3000:] + result.stderr[-2000:])
    return {"returncode": result.returncode, "summary": result.stdout.strip().splitlines()[-1:]}


def bench_market_eval(out: Path, log) -> dict:
    """benchmarks/bench_eval.py at Market-1501 size (3,368 x 15,913, 3 layers, bf16): ours in full,
    upstream's materialised evaluation on 128 x 2,048 pairs, scaled by the pair count."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_eval.py"), "--queries", "3368", "--gallery", "15913",
           "--device", "cuda", "--reference-pairs", str(128 * 2048), "--out", str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=540)
    log(result.stdout[-3000:] + result.stderr[-2000:])
    return {"returncode": result.returncode, "summary": result.stdout.strip().splitlines()[-6:]}


# --------------------------------------------------------------------------------------------
# Timings


def _flops(nq, ng, lq, lg, d) -> float:
    return 2.0 * nq * ng * lq * lg * d


def _time(fn, rotations: int) -> float:
    """Median milliseconds of fn(k) for k cycling through the rotating input copies."""
    from triton.testing import do_bench

    state = {"k": 0}

    def call():
        state["k"] = (state["k"] + 1) % rotations
        fn(state["k"])

    return do_bench(call, warmup=100, rep=500, return_mode="median")


def _peak_bytes(fn) -> int:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(0)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _inputs(shape, dtype, copies, requires_grad=False):
    import torch

    nq, ng, lq, lg, d = shape
    out = []
    for _ in range(copies):
        q = torch.randn(nq, lq, d, device="cuda", dtype=dtype)
        g = torch.randn(ng, lg, d, device="cuda", dtype=dtype)
        e = torch.randn(lg, lq, device="cuda")
        out.append([t.requires_grad_(requires_grad) for t in (q, g, e)])
    return out


def _copies_beyond_l2(shape, dtype) -> int:
    import torch

    nq, ng, lq, lg, d = shape
    size = (nq * lq + ng * lg) * d * torch.tensor([], dtype=dtype).element_size()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(2, min(16, -(-3 * l2 // size)))


def _report(name, shape, times, peaks, log) -> dict:
    flops = _flops(*shape)
    rows = {}
    for method, ms in times.items():
        rows[method] = {"ms": ms, "tflops": flops / ms / 1e9, "peak_extra_bytes": peaks.get(method)}
    for method, row in rows.items():
        if "gemm" in rows:
            row["gemm_time_over_this"] = rows["gemm"]["ms"] / row["ms"]
        if "reference" in rows:
            row["speedup_vs_reference"] = rows["reference"]["ms"] / row["ms"]
            if peaks.get("reference") and peaks.get(method):
                row["memory_reduction_vs_reference"] = peaks["reference"] / peaks[method]
        log(f"{name} {method:18} {row['ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s "
            + " ".join(f"{k}={v:.2f}" for k, v in row.items()
                       if isinstance(v, float) and k not in ("ms", "tflops")))
    return {"shape": dict(zip(("nq", "ng", "lq", "lg", "d"), shape)), "flops": flops,
            "methods": rows}


def bench_training(backends, log) -> dict:
    """64x64 pairs, forward + backward under fp16 autocast (upstream's AMP training)."""
    import torch

    import transmatcher_fast
    from transmatcher_fast import reference

    shape = (64, 64, 192, 192, 512)
    copies = _copies_beyond_l2(shape, torch.float32)
    data = _inputs(shape, torch.float32, copies, requires_grad=True)

    def step(op):
        def run(k):
            q, g, e = data[k]
            with torch.autocast("cuda", dtype=torch.float16):
                q_best, g_best = op(q, g, e)[:2]
            (q_best.float().sum() + g_best.float().sum()).backward()
        return run

    methods = {}
    for backend in backends:
        def ours(q, g, e, backend=backend):
            with transmatcher_fast.use_backend(backend):
                return transmatcher_fast.max_sim(q, g, e)
        methods[backend] = step(ours)
    methods["reference"] = step(reference.max_sim)
    methods["compiled_reference"] = step(torch.compile(reference.max_sim))
    a = torch.randn(shape[0] * shape[2], shape[4], device="cuda", dtype=torch.float16)
    b = torch.randn(shape[1] * shape[3], shape[4], device="cuda", dtype=torch.float16)
    # fwd + bwd of the matcher is three GEMMs of this size in the materialised computation.
    methods["gemm"] = lambda k: (a @ b.T, a @ b.T, a @ b.T)
    times, peaks = {}, {}
    for name, fn in methods.items():
        peaks[name] = None if name == "gemm" else _peak_bytes(fn)
        times[name] = _time(fn, copies)
    report = _report("training fwd+bwd fp16", shape, times, peaks, log)
    report["note"] = "gemm = 3 fp16 GEMMs [Nq*Lq, D] x [D, Ng*Lg] (the fwd+bwd FLOPs)"
    report["flops"] = 3 * report["flops"]
    for row in report["methods"].values():
        row["tflops"] *= 3
    return report


def bench_evaluation(backends, log) -> dict:
    """256x4096 pairs, forward only, bf16 and fp32 (ours with TF32 allowed; the reference with
    TF32 off, upstream's setting, and with it on)."""
    import torch

    import transmatcher_fast
    from transmatcher_fast import reference

    shape = (256, 4096, 192, 192, 512)
    nq, ng, lq, lg, d = shape
    chunk = 128  # gallery images per reference chunk: 256*128*192*192 scores (2.4 GB in bf16)
    reports = {}
    compiled_chunk = torch.compile(reference.max_sim)

    def chunked(fn):
        def run(q, g, e):
            for j0 in range(0, ng, chunk):
                fn(q, g[j0:j0 + chunk], e)
        return run

    for label, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        copies = 2  # each copy is 0.85 GB (bf16): far beyond L2
        data = _inputs(shape, dtype, copies)
        methods = {}
        with torch.no_grad():
            for backend in backends:
                def ours(k, backend=backend):
                    with transmatcher_fast.use_backend(backend), float32_precision(True):
                        transmatcher_fast.max_sim(*data[k])
                methods[backend] = ours
            ref_tf32 = [False, True] if dtype == torch.float32 else [False]
            for tf32 in ref_tf32:
                def ref(k, tf32=tf32):
                    with float32_precision(tf32):
                        chunked(reference.max_sim)(*data[k])
                methods["reference" + ("_tf32" if tf32 else "")] = ref
            methods["compiled_reference"] = lambda k: chunked(compiled_chunk)(*data[k])
            a = data[0][0].reshape(nq * lq, d)
            b = data[0][1].reshape(ng * lg, d)
            out = torch.empty(nq * lq, chunk * lg, device="cuda", dtype=dtype)

            def gemm(k):
                with float32_precision(True):
                    for j0 in range(0, ng * lg, chunk * lg):
                        torch.mm(a, b[j0:j0 + chunk * lg].T, out=out)
            methods["gemm"] = gemm
            times, peaks = {}, {}
            for name, fn in methods.items():
                peaks[name] = None if name == "gemm" else _peak_bytes(fn)
                times[name] = _time(fn, copies)
        reports[label] = _report(f"evaluation fwd {label}", shape, times, peaks, log)
        del data
        torch.cuda.empty_cache()
    return reports


def plot(results, path, log) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    panels = [("training fwd+bwd fp16", results.get("training"))]
    for label, report in (results.get("evaluation") or {}).items():
        if isinstance(report, dict) and "methods" in report:
            panels.append((f"evaluation fwd {label}", report))
    panels = [(t, r) for t, r in panels if isinstance(r, dict) and "methods" in r]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, report) in zip(axes[0], panels):
        names = list(report["methods"])
        ax.bar(names, [report["methods"][n]["tflops"] for n in names])
        ax.set_title(title)
        ax.set_ylabel("TFLOP/s")
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(results.get("device", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
