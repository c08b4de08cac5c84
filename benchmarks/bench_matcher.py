"""Memory and time of one TransMatcher training step: ours against upstream's materialised matcher.

    python benchmarks/bench_matcher.py                  # batch 64, 24x8 map, d 512, 3 layers, FF 2048
    python benchmarks/bench_matcher.py --batch 16 --repeat 1

One step is what upstream's trainer does with the matcher: ``make_kernel(features)``,
``score = matcher(features)`` (the batch against itself, [B, B] logits), the pairwise matching
loss (BCE with logits against same-identity labels, summed per row, averaged), and backward to
every matcher parameter and to the features. Both methods run the same TransMatcher module (same
weights, training mode, so every BatchNorm uses batch statistics): "ours" is its forward on the
fused op, "reference" is ``transmatcher_fast.reference.transmatcher_scores`` (upstream's
materialised computation) on that module. The features are built before the measurement starts.

Peak memory is the extra resident memory of one step above the memory in use after the inputs
were built and one warm-up step ran, each method in a fresh process. Times are medians of
interleaved rounds. Writes results/bench_matcher.json (CPU, threads, versions, date, arguments)
and results/bench_matcher.png.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from transmatcher_fast import TransMatcher, benchmarking, reference, use_backend

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("ours", "reference")
IMAGES_PER_ID = 4  # upstream's --num_instance


def make_inputs(args, seed: int = 0):
    """(matcher, features, labels) of the configuration, deterministic."""
    torch.manual_seed(seed)
    matcher = TransMatcher(args.height * args.width, args.d_model, args.layers,
                           args.dim_feedforward).train()
    features = torch.randn(args.batch, args.height, args.width, args.layers * args.d_model)
    features.requires_grad_(True)
    pids = torch.arange(args.batch) // IMAGES_PER_ID
    labels = (pids[:, None] == pids[None, :]).float()
    return matcher, features, labels


def make_step(method: str, matcher, features, labels):
    """A no-argument callable running one training step of the matcher."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")

    def step():
        if method == "ours":
            matcher.make_kernel(features)
            score = matcher(features)
        else:
            score = reference.transmatcher_scores(matcher, features, features)
        # Upstream's PairwiseMatchingLoss: BCE per pair, summed per probe row, mean over rows.
        loss = F.binary_cross_entropy_with_logits(score, labels, reduction="none").sum(1).mean()
        loss.backward()
        matcher.zero_grad(set_to_none=True)
        features.grad = None
        matcher.memory = None
        return loss.item()
    return step


def config_args(args) -> list[str]:
    return ["--batch", str(args.batch), "--height", str(args.height), "--width", str(args.width),
            "--d-model", str(args.d_model), "--layers", str(args.layers),
            "--dim-feedforward", str(args.dim_feedforward)]


def measure_memory_in_child(method: str, args) -> int:
    """Extra peak resident bytes of one step, in a fresh interpreter."""
    return benchmarking.cpu_peak_in_child(
        [os.path.abspath(__file__), "--child-memory", method, *config_args(args)], timeout=3600)


def child_memory(method: str, args) -> None:
    step = make_step(method, *make_inputs(args))
    step()  # warm-up: lazy initialisation is not the step's memory
    benchmarking.print_cpu_peak(step)


def run(args) -> dict:
    matcher, features, labels = make_inputs(args)
    steps = {m: make_step(m, matcher, features, labels) for m in METHODS}
    losses = {m: steps[m]() for m in METHODS}  # also the warm-up
    seconds = benchmarking.median_seconds(steps, warmup=0, repeat=args.repeat)
    rows = []
    for method in METHODS:
        row = {"method": method, "seconds": seconds[method], "loss": losses[method]}
        if not args.no_memory:
            row["peak_extra_bytes"] = measure_memory_in_child(method, args)
        rows.append(row)
    by = {r["method"]: r for r in rows}
    summary = {
        "speedup_vs_reference": by["reference"]["seconds"] / by["ours"]["seconds"],
        "loss_relative_difference": abs(losses["ours"] - losses["reference"])
        / max(abs(losses["reference"]), 1e-30),
    }
    if not args.no_memory:
        summary["memory_reference_over_ours"] = (
            by["reference"]["peak_extra_bytes"] / max(1, by["ours"]["peak_extra_bytes"]))
    return {"rows": rows, "summary": summary}


def print_result(result, args) -> None:
    print(f"TransMatcher training step, batch {args.batch} vs itself, {args.height}x{args.width} "
          f"map, d_model {args.d_model}, {args.layers} layers, feedforward {args.dim_feedforward}")
    print(f"{'method':<12}{'seconds':>10}{'peak MiB':>12}")
    for r in result["rows"]:
        peak = r.get("peak_extra_bytes")
        print(f"{r['method']:<12}{r['seconds']:10.2f}"
              f"{'' if peak is None else '%.1f' % (peak / 2**20):>12}")
    s = result["summary"]
    line = f"ours is {s['speedup_vs_reference']:.2f}x faster"
    if "memory_reference_over_ours" in s:
        line += f" and needs {s['memory_reference_over_ours']:.1f}x less extra peak memory"
    print(line + f"; losses agree to {s['loss_relative_difference']:.1e} relative")


def plot(result, path) -> None:
    plt = benchmarking.pyplot()
    if plt is None:
        return
    rows = result["rows"]
    panels = [("seconds", "time per step (s)", 1.0)]
    if all("peak_extra_bytes" in r for r in rows):
        panels.append(("peak_extra_bytes", "extra peak memory (MiB)", 2**20))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (key, label, unit) in zip(axes[0], panels):
        values = [r[key] / unit for r in rows]
        bars = ax.bar([r["method"] for r in rows], values, color=["tab:blue", "tab:gray"])
        ax.bar_label(bars, fmt="%.1f")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.2 * max(values))
    fig.suptitle("TransMatcher training step (fwd+bwd, CPU fp32)", fontsize=10)
    fig.tight_layout()
    benchmarking.save_figure(fig, path)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=positive, default=64)
    parser.add_argument("--height", type=positive, default=24, help="feature-map height")
    parser.add_argument("--width", type=positive, default=8, help="feature-map width")
    parser.add_argument("--d-model", type=positive, default=512)
    parser.add_argument("--layers", type=positive, default=3)
    parser.add_argument("--dim-feedforward", type=positive, default=2048)
    parser.add_argument("--repeat", type=positive, default=3)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--child-memory", metavar="METHOD", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch < 2:
        parser.error("--batch must be at least 2 (BatchNorm in training mode)")
    if args.child_memory:
        with use_backend("cpu"):
            child_memory(args.child_memory, args)
        return 0
    with use_backend("cpu"):
        result = run(args)
    print_result(result, args)
    result = {"benchmark": "bench_matcher", "dtype": "float32",
              "environment": benchmarking.environment(torch.device("cpu")),
              "args": {k: v for k, v in vars(args).items() if k not in ("child_memory", "out")},
              **result}
    benchmarking.write_result(result, args.out, "bench_matcher")
    if not args.no_plot:
        plot(result, os.path.join(args.out, "bench_matcher.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
