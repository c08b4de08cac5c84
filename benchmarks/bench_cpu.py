"""CPU benchmark of max_sim: the C++ kernel against upstream's materialised reference,
torch.compile(reference) and a plain GEMM of the same FLOPs, for float32 and bfloat16 features.

    python benchmarks/bench_cpu.py                      # (32,32,192,512) and (64,64,192,512)
    python benchmarks/bench_cpu.py --shapes 8,8,192,512 --repeat 3 --dtypes bfloat16

FLOPs = 2 * Nq * Ng * Lq * Lg * D (the dot products; the gate and the max are O(Nq*Ng*L^2)).
The GEMM is [Nq*Lq, D] @ [D, Ng*Lg] in the features' dtype (torch's bfloat16 GEMM for bfloat16):
what any implementation must at least compute. The score_embed gate stays float32 next to
bfloat16 features, as a model's parameter does. Times are medians of interleaved rounds (every
dtype and method once per round), so ratios, between dtypes too, come from one run; the summary
gives the median of the per-round ratios and their range. Peak memory is the extra resident
memory of one call after a warm-up call, each measured in a fresh process.
Writes results/bench_cpu.json (with CPU model and flags, threads, versions, date, and the ISA the
kernel's bfloat16 block GEMMs ran on: "avx512_core_amx", "avx512_core_bf16", or "" for float32)
and results/bench_cpu.png. `--tag NAME` writes bench_cpu.NAME.json/.png instead (e.g. a run with
oneDNN capped by ONEDNN_MAX_CPU_ISA).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

import torch

from transmatcher_fast import benchmarking, max_sim, reference, use_backend

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SHAPES = ["32,32,192,512", "64,64,192,512"]
DEFAULT_DTYPES = ["float32", "bfloat16"]
METHODS = ("ours", "reference", "compiled_reference", "gemm")
TRAINING_METHODS = ("ours", "reference", "compiled_reference")  # the GEMM has no max to train


def make_inputs(nq, ng, length, dim, requires_grad, seed=0, dtype="float32"):
    """query and gallery features in `dtype`; the gate logits in float32."""
    generator = torch.Generator().manual_seed(seed)
    features = getattr(torch, dtype)
    query = torch.randn(nq, length, dim, generator=generator).to(features)
    gallery = torch.randn(ng, length, dim, generator=generator).to(features)
    embed = 0.01 * torch.randn(length, length, generator=generator)
    return [t.requires_grad_(requires_grad) for t in (query, gallery, embed)]


_compiled_reference = None


def _op(method):
    global _compiled_reference
    if method == "ours":
        return max_sim
    if method == "reference":
        return reference.max_sim
    if method == "compiled_reference":
        if _compiled_reference is None:
            _compiled_reference = torch.compile(reference.max_sim)
        return _compiled_reference
    raise ValueError(method)


def make_call(method, mode, inputs):
    """A no-argument callable running `method` once in `mode` ("forward" or "training")."""
    query, gallery, embed = inputs
    if method == "gemm":
        q2, g2 = query.detach().flatten(0, 1), gallery.detach().flatten(0, 1)
        return lambda: q2 @ g2.T
    op = _op(method)
    if mode == "forward":
        def forward():
            with torch.no_grad():
                return op(query, gallery, embed)
        return forward

    def training():
        q_best, g_best = op(query, gallery, embed)
        (q_best.sum() + g_best.sum()).backward()
        for t in inputs:
            t.grad = None
    return training


def measure_memory_in_child(method, mode, shape, dtype="float32"):
    """Run one call in a fresh interpreter and return its extra peak resident memory in bytes."""
    return benchmarking.cpu_peak_in_child(
        [os.path.abspath(__file__), "--child-memory", method, mode, ",".join(map(str, shape)),
         dtype], timeout=1800)


def child_memory(method, mode, shape, dtype="float32"):
    inputs = make_inputs(*shape, requires_grad=(mode == "training"), dtype=dtype)
    call = make_call(method, mode, inputs)
    call()  # warm-up: lazy initialisation and compilation are not the op's memory
    benchmarking.print_cpu_peak(call)


def interleaved_seconds(calls, warmup, repeat):
    """Wall times of every call, in rounds that run each call once (so that a change in machine
    speed, on a shared machine, hits all of them alike): {key: [seconds per round]}."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times = {key: [] for key in calls}
    for _ in range(repeat):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - start)
    return times


def run_shape(shape, repeat, memory, dtypes=("float32",)):
    nq, ng, length, dim = shape
    flops = 2 * nq * ng * length * length * dim
    rows = []
    for mode, methods in (("forward", METHODS), ("training", TRAINING_METHODS)):
        calls = {}
        for dtype in dtypes:
            inputs = make_inputs(*shape, requires_grad=(mode == "training"), dtype=dtype)
            calls.update({(dtype, m): make_call(m, mode, inputs) for m in methods})
        rounds = interleaved_seconds(calls, warmup=1, repeat=repeat)
        for dtype, method in calls:
            took = statistics.median(rounds[(dtype, method)])
            row = {"nq": nq, "ng": ng, "l": length, "d": dim, "dtype": dtype, "mode": mode,
                   "method": method, "seconds": took, "gflops": flops / took / 1e9,
                   "seconds_per_round": rounds[(dtype, method)]}
            if memory:
                row["peak_extra_bytes"] = measure_memory_in_child(method, mode, shape, dtype)
            rows.append(row)
    return rows


def round_ratios(numerator, denominator):
    """The median and range of the per-round time ratios of two rows measured in one run."""
    ratios = [a / b for a, b in zip(numerator["seconds_per_round"],
                                    denominator["seconds_per_round"])]
    return statistics.median(ratios), [min(ratios), max(ratios)]


def summarise(rows):
    """The figures the issues target, per shape and dtype, then bfloat16 against float32.
    Ratios of times: medians of the per-round ratios, with their range."""
    by = {(r["nq"], r["ng"], r["l"], r["d"], r["dtype"], r["mode"], r["method"]): r for r in rows}
    dtype_order = {d: k for k, d in enumerate(DEFAULT_DTYPES)}
    summary = []
    for key in sorted({k[:5] for k in by}, key=lambda k: (k[:4], dtype_order.get(k[4], 9), k[4])):
        ours_f, gemm, ref_f, compiled_f = (by[key + ("forward", m)] for m in
                                           ("ours", "gemm", "reference", "compiled_reference"))
        ours_t, ref_t = by[key + ("training", "ours")], by[key + ("training", "reference")]
        over_gemm, over_gemm_range = round_ratios(ours_f, gemm)
        over_compiled, over_compiled_range = round_ratios(ours_f, compiled_f)
        item = {
            "shape": "x".join(map(str, key[:4])),
            "dtype": key[4],
            "forward_ours_over_gemm": over_gemm,
            "forward_ours_over_gemm_range": over_gemm_range,
            "forward_ours_over_compiled_reference": over_compiled,
            "forward_ours_over_compiled_reference_range": over_compiled_range,
            "forward_speedup_vs_reference": round_ratios(ref_f, ours_f)[0],
            "training_speedup_vs_reference": round_ratios(ref_t, ours_t)[0],
        }
        if "peak_extra_bytes" in ours_f:
            item["forward_memory_ours_over_reference"] = (
                ours_f["peak_extra_bytes"] / max(1, ref_f["peak_extra_bytes"]))
            item["training_memory_ours_over_reference"] = (
                ours_t["peak_extra_bytes"] / max(1, ref_t["peak_extra_bytes"]))
        summary.append(item)
    for key in sorted({k[:4] for k in by}):
        if not all(key + (d, "forward", "ours") in by for d in ("float32", "bfloat16")):
            continue
        f32, bf16 = ({(mode, m): by[key + (d, mode, m)] for mode, m in
                      (("forward", "ours"), ("forward", "gemm"), ("training", "ours"))}
                     for d in ("float32", "bfloat16"))
        summary.append({
            "shape": "x".join(map(str, key)),
            "dtype": "bfloat16 vs float32",
            # float32 time / bfloat16 time: how much faster bfloat16 features are.
            "forward_bfloat16_speedup": (f32["forward", "ours"]["seconds"]
                                         / bf16["forward", "ours"]["seconds"]),
            "gemm_bfloat16_speedup": (f32["forward", "gemm"]["seconds"]
                                      / bf16["forward", "gemm"]["seconds"]),
            "training_bfloat16_speedup": (f32["training", "ours"]["seconds"]
                                          / bf16["training", "ours"]["seconds"]),
        })
    return summary


def print_table(rows, summary):
    print(f"{'shape (Nq,Ng,L,D)':<20}{'dtype':<10}{'mode':<10}{'method':<20}{'ms':>10}"
          f"{'GFLOP/s':>10}{'peak MiB':>11}")
    for r in rows:
        peak = r.get("peak_extra_bytes")
        print(f"{'%d,%d,%d,%d' % (r['nq'], r['ng'], r['l'], r['d']):<20}{r['dtype']:<10}"
              f"{r['mode']:<10}{r['method']:<20}{r['seconds'] * 1e3:10.1f}{r['gflops']:10.1f}"
              f"{'' if peak is None else '%.1f' % (peak / 2**20):>11}")
    for s in summary:
        if "forward_bfloat16_speedup" in s:
            print(f"{s['shape']}: bfloat16 forward {s['forward_bfloat16_speedup']:.2f}x faster "
                  f"than float32 (GEMM alone {s['gemm_bfloat16_speedup']:.2f}x), forward+backward "
                  f"{s['training_bfloat16_speedup']:.2f}x")
            continue
        low, high = s["forward_ours_over_gemm_range"]
        c_low, c_high = s["forward_ours_over_compiled_reference_range"]
        print(f"{s['shape']} {s['dtype']}: forward = {s['forward_ours_over_gemm']:.2f}x GEMM time "
              f"(rounds {low:.2f}-{high:.2f}), {s['forward_ours_over_compiled_reference']:.2f}x "
              f"torch.compile(reference) ({c_low:.2f}-{c_high:.2f}), "
              f"{s['forward_speedup_vs_reference']:.2f}x faster than reference; forward+backward "
              f"{s['training_speedup_vs_reference']:.2f}x faster than reference"
              + ("" if "forward_memory_ours_over_reference" not in s else
                 f"; extra peak memory {100 * s['forward_memory_ours_over_reference']:.2f}% "
                 f"(forward) and {100 * s['training_memory_ours_over_reference']:.2f}% "
                 "(forward+backward) of the reference's"))


def plot(rows, path):
    plt = benchmarking.pyplot()
    if plt is None:
        return
    dtype_order = {d: k for k, d in enumerate(DEFAULT_DTYPES)}
    groups = sorted({(r["nq"], r["ng"], r["l"], r["d"], r["dtype"]) for r in rows},
                    key=lambda g: (g[:4], dtype_order.get(g[4], 9), g[4]))
    short = {"float32": "fp32", "bfloat16": "bf16"}
    fig, axes = plt.subplots(1, 2, figsize=(5 + 1.5 * len(groups), 4))
    for ax, mode in zip(axes, ("forward", "training")):
        methods = [m for m in METHODS if any(r["method"] == m and r["mode"] == mode for r in rows)]
        width = 0.8 / len(methods)
        for k, method in enumerate(methods):
            values = [next(r["gflops"] for r in rows if r["mode"] == mode and r["method"] == method
                           and (r["nq"], r["ng"], r["l"], r["d"], r["dtype"]) == g)
                      for g in groups]
            ax.bar([x + k * width for x in range(len(groups))], values, width, label=method)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))])
        ax.set_xticklabels(["%d,%d,%d,%d\n%s" % (*g[:4], short.get(g[4], g[4])) for g in groups])
        ax.set_xlabel("Nq, Ng, L, D / feature dtype")
        ax.set_ylabel("GFLOP/s (2·Nq·Ng·L²·D / time)")
        ax.set_title(f"max_sim {'forward' if mode == 'forward' else 'forward + backward'}, CPU")
        ax.set_ylim(0, 1.35 * max(r["gflops"] for r in rows if r["mode"] == mode))
        ax.legend(fontsize=8, ncol=2, loc="upper center")
    fig.tight_layout()
    benchmarking.save_figure(fig, path)


def cpu_description():
    """What decides the kernel's bfloat16 path: the CPU's identity and ISA flags, oneDNN's
    version and any cap on its ISA, and the ISA the kernel's bfloat16 GEMMs ran on."""
    info = {"flags": [], "family_model_stepping": None}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            fields = dict(line.split(":", 1) for line in cpuinfo.read().split("\n\n")[0]
                          .splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        wanted = ("avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_tile",
                  "amx_bf16")
        info["flags"] = [f for f in fields.get("flags", "").split() if f in wanted]
        info["family_model_stepping"] = "/".join(
            fields.get(k, "?") for k in ("cpu family", "model", "stepping"))
    except OSError:
        pass
    found = re.search(r"MKL-DNN v([\d.]+)", torch.__config__.show())
    info["onednn"] = found.group(1) if found else None
    info["onednn_max_cpu_isa"] = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get(
        "DNNL_MAX_CPU_ISA")
    ops = torch.ops.transmatcher_fast_C
    info["bf16_gemm_isa"] = ops.cpu_bf16_gemm_isa() if hasattr(ops, "cpu_bf16_gemm_isa") else None
    return info


def load_average():
    """The 1-minute load average (None where unknown): on a shared machine, how contended the
    run was (times inflate with it; the interleaved ratios much less)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def parse_shape(text):
    values = tuple(int(v) for v in text.split(","))
    if len(values) != 4 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"shape must be Nq,Ng,L,D with positive values, got {text}")
    return values


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=parse_shape,
                        default=[parse_shape(s) for s in DEFAULT_SHAPES])
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"],
                        default=DEFAULT_DTYPES, help="feature dtypes (default: float32 bfloat16)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--tag", default="",
                        help="write bench_cpu.TAG.json/.png (default: bench_cpu.json/.png)")
    parser.add_argument("--child-memory", nargs=4, metavar=("METHOD", "MODE", "SHAPE", "DTYPE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_memory:
        method, mode, shape, dtype = args.child_memory
        with use_backend("cpu" if method == "ours" else None):
            child_memory(method, mode, parse_shape(shape), dtype)
        return 0
    load_before = load_average()
    with use_backend("cpu"):
        rows = [row for shape in args.shapes
                for row in run_shape(shape, args.repeat, not args.no_memory, args.dtypes)]
    summary = summarise(rows)
    print_table(rows, summary)
    cpu = cpu_description()
    cpu["load_average_before_after"] = [load_before, load_average()]
    print(f"CPU: {benchmarking.cpu_model()} ({cpu['family_model_stepping']}; "
          f"{' '.join(cpu['flags'])}); bfloat16 GEMMs on {cpu['bf16_gemm_isa'] or 'float32'}")
    result = {"benchmark": "bench_cpu", "dtypes": list(args.dtypes),
              # Whether the kernel's bfloat16 block GEMMs ran in bfloat16 (else in float32).
              "cpu_bf16_gemm": bool(torch.ops.transmatcher_fast_C.cpu_bf16_gemm_available()),
              "cpu_bf16_gemm_isa": cpu["bf16_gemm_isa"], "cpu_details": cpu,
              "environment": benchmarking.environment(torch.device("cpu")),
              "flops_formula": "2*Nq*Ng*Lq*Lg*D", "rows": rows, "summary": summary}
    name = "bench_cpu" + (f".{args.tag}" if args.tag else "")
    benchmarking.write_result(result, args.out, name)
    if not args.no_plot:
        plot(rows, os.path.join(args.out, f"{name}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
