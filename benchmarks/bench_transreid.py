"""TransReID: a training step and feature extraction, ours against upstream's computation.

    python benchmarks/bench_transreid.py                    # CPU: vit_small_patch16, batch 16
    python benchmarks/bench_transreid.py --device cuda      # ViT-B/16, batch 64 (upstream's recipe)
    python benchmarks/bench_transreid.py --quick            # tiny ViT, batch 8, one round
    python benchmarks/bench_transreid.py --device cuda --amp fp16 --compile   # as upstream trains, + compiled

Configuration: 256x128 images, JPM (shift 5, 2 shuffle groups, 4 branches) with camera SIE
(6 cameras), 751 identities, drop path 0.1, at strides 16 and 12 (TransReID and TransReID*).
``transmatcher_fast.TransReID`` ("ours") and ``tests/upstream_transreid.py`` ("reference":
upstream's explicit attention, full-sequence last blocks, four sequential JPM branches) start from
the same weights. Per stride:

- training step: forward in training mode, upstream's loss (0.5 x (CE global + mean CE local)
  + 0.5 x (soft-margin batch-hard triplet, same split)) and backward; no optimizer step;
- feature extraction: eval mode, no grad, the 5 x D test feature;
- time: median of ``--repeat`` interleaved rounds; peak activation memory of one training step:
  what it allocates above the memory in use when it starts (parameters, gradients and inputs are
  there already): ``torch.cuda.max_memory_allocated`` on CUDA, on CPU the running sum of every
  allocation and free the profiler records (``profile_memory``);
- outputs: eval features, and (stochastic depth off) the loss and all gradients as one vector,
  of both models in float32 against upstream's computation in float64: the largest difference
  relative to the largest value.

On CPU the default is ViT-S/16 at batch 16 (ViT-B at batch 64 is minutes a step on 2 cores);
``--arch``/``--batch`` change it. On a shared machine use ``--threads 1``: with 2 threads on 2
busy cores a descheduled OpenMP worker stalls every op and times swing 3x between rounds. The
committed CPU results are ``--threads 1 --repeat 5``. Writes results/bench_transreid_<device>.json
and .png.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the upstream reference

import upstream_transreid as upstream  # noqa: E402

from transmatcher_fast.benchmarking import (  # noqa: E402
    environment, median_seconds, peak_extra_bytes, pyplot, save_figure, write_result)
from transmatcher_fast.models import TransReID  # noqa: E402

TARGETS = {"train_speedup": 1.3, "train_memory_ratio": 0.6}
DEFAULTS = {"cpu": ("vit_small_patch16", 16), "cuda": ("vit_base_patch16", 64)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default=None, help="ViT (models.vit.ARCHS); default by device")
    parser.add_argument("--batch", type=int, default=None, help="images per step (multiple of 4); default by device")
    parser.add_argument("--strides", type=int, nargs="+", default=[16, 12])
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--amp", choices=["none", "fp16", "bf16"], default="none",
                        help="autocast for the timed/measured steps (the output check is float32)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of both models (inductor; minutes of compiling on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="vit_tiny_patch16, batch 8, one round")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    return parser.parse_args(argv)


# -- upstream's loss --------------------------------------------------------------------------------


def soft_triplet(feat, target):
    """Batch-hard soft-margin triplet on Euclidean distances (upstream's ``TripletLoss(None)``)."""
    dist = (feat.square().sum(1, keepdim=True) + feat.square().sum(1) - 2 * feat @ feat.t()).clamp(min=1e-12).sqrt()
    same = target[:, None] == target[None, :]
    hardest_pos = dist.masked_fill(~same, float("-inf")).amax(1)
    hardest_neg = dist.masked_fill(same, float("inf")).amin(1)
    return F.softplus(hardest_pos - hardest_neg).mean()


def jpm_loss(scores, feats, target):
    """0.5 x [CE(global) + mean CE(local)] + 0.5 x [T(global) + mean T(local)]."""
    ce = [F.cross_entropy(s.float(), target) for s in scores]
    tri = [soft_triplet(f.float(), target) for f in feats]
    return 0.5 * (ce[0] + sum(ce[1:]) / len(ce[1:])) + 0.5 * (tri[0] + sum(tri[1:]) / len(tri[1:]))


# -- measuring --------------------------------------------------------------------------------------


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


def cpu_peak_bytes(fn) -> int:
    """Peak of the running sum of the allocations and frees ``fn()`` makes, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_bytes(fn, device: torch.device) -> int:
    if device.type == "cuda":
        return peak_extra_bytes(fn, device)
    return cpu_peak_bytes(fn)  # the allocations' own peak, not the process's RSS


@contextlib.contextmanager
def no_drop_path(*models):
    """Stochastic depth off (its random draws differ between the two implementations)."""
    modules = [m for model in models for m in model.modules() if hasattr(m, "drop_prob")]
    old = [m.drop_prob for m in modules]
    for m in modules:
        m.drop_prob = 0.0
    try:
        yield
    finally:
        for m, prob in zip(modules, old):
            m.drop_prob = prob


def relative_error(actual, expected) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def outputs(model, images, cams, target):
    """Eval features, and the training loss and all gradients (one vector) without stochastic depth."""
    model.eval()
    with torch.no_grad():
        features = model(images, cam_label=cams)
    model.train()
    model.zero_grad(set_to_none=True)
    with no_drop_path(model):
        loss = jpm_loss(*model(images, cam_label=cams), target)
        loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return features, loss.detach(), grads


def compare(ours, ref, images, cams, target) -> dict:
    """Both models' float32 outputs against upstream's computation in float64 (and each other)."""
    truth = outputs(copy.deepcopy(ref).double(), images.double(), cams, target)
    got = {"ours": outputs(ours, images, cams, target), "reference": outputs(ref, images, cams, target)}
    report = {}
    for i, name in enumerate(("eval_feature", "loss", "grad")):
        report[f"{name}_rel_error"] = {k: relative_error(v[i], truth[i]) for k, v in got.items()}
        report[f"{name}_rel_error"]["ours_vs_reference"] = relative_error(got["ours"][i], got["reference"][i])
    return report


def run_stride(args, stride: int, device: torch.device) -> dict:
    cfg = dict(arch=args.arch, img_size=(256, 128), stride=stride, sie_camera=True, jpm=True, drop_path=0.1)
    torch.manual_seed(0)
    ours = TransReID(751, 6, 0, **cfg).to(device)
    ref = upstream.make_model(751, 6, 0, **cfg).to(device)
    ref.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, 256, 128, generator=gen).to(device)
    cams = torch.randint(0, 6, (args.batch,), generator=gen).to(device)
    target = torch.arange(args.batch // 4).repeat_interleave(4).to(device)  # P x K = (B / 4) x 4

    check = compare(ours, ref, images, cams, target)
    print(f"stride {stride}: float32 errors against float64 upstream: {check}")

    def train_step(model):
        def step():
            with autocast(device, args.amp):
                loss = jpm_loss(*model(images, cam_label=cams), target)
            loss.backward()
        return step

    def extract(model):
        def run():
            with torch.no_grad(), autocast(device, args.amp):
                model(images, cam_label=cams)
        return run

    models = {"ours": ours, "reference": ref}
    if args.compile:  # the same modules (and parameters) through torch.compile
        models.update(ours_compiled=torch.compile(ours), reference_compiled=torch.compile(ref))
    for model in models.values():  # gradients allocated (and graphs compiled) before measuring
        model.train()
        train_step(model)()
        model.zero_grad(set_to_none=False)
    train = median_seconds({k: train_step(m) for k, m in models.items()}, device=device, warmup=0,
                           repeat=args.repeat)
    memory = {k: peak_bytes(train_step(m), device) for k, m in models.items()}
    for model in models.values():
        model.eval()
    evaluation = median_seconds({k: extract(m) for k, m in models.items()}, device=device, warmup=1,
                                repeat=args.repeat)
    grid = ours.base.num_y, ours.base.num_x
    row = {
        "stride": stride, "grid": list(grid), "tokens": grid[0] * grid[1] + 1,
        "train_step_s": train, "train_speedup": train["reference"] / train["ours"],
        "train_peak_activation_bytes": memory, "train_memory_ratio": memory["ours"] / memory["reference"],
        "eval_s": evaluation, "eval_images_per_s": {k: args.batch / v for k, v in evaluation.items()},
        "eval_speedup": evaluation["reference"] / evaluation["ours"],
        "outputs": check,
    }
    if args.compile:
        row["speedup_over_reference"] = {k: {"train": train["reference"] / train[k],
                                             "eval": evaluation["reference"] / evaluation[k]} for k in models}
    print(f"stride {stride} ({grid[0]}x{grid[1]}): train {train['ours']:.3f}s vs {train['reference']:.3f}s "
          f"= {row['train_speedup']:.2f}x; peak {memory['ours'] / 2**20:.1f} vs {memory['reference'] / 2**20:.1f} MiB "
          f"= {row['train_memory_ratio']:.2f}x; eval {evaluation['ours']:.3f}s vs {evaluation['reference']:.3f}s "
          f"= {row['eval_speedup']:.2f}x")
    if args.compile:
        print(f"stride {stride}: speed-up over the eager reference: " + ", ".join(
            f"{k} train {v['train']:.2f}x eval {v['eval']:.2f}x" for k, v in row["speedup_over_reference"].items()))
    return row


def plot(result: dict, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return

    rows = result["rows"]
    labels = [f"stride {r['stride']}\n{r['grid'][0]}x{r['grid'][1]}" for r in rows]
    x = range(len(rows))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9, 3.6))
    width = 0.38
    for offset, key, label in ((-width / 2, "train_speedup", "training step"),
                               (width / 2, "eval_speedup", "feature extraction")):
        bars = ax_t.bar([i + offset for i in x], [r[key] for r in rows], width, label=label)
        ax_t.bar_label(bars, fmt="%.2f", fontsize=8)
    ax_t.axhline(TARGETS["train_speedup"], color="k", ls="--", lw=1, label="target (training)")
    ax_t.axhline(1.0, color="grey", lw=0.8)
    ax_t.set_xticks(list(x), labels)
    ax_t.set_ylabel("speed-up over upstream (x)")
    ax_t.legend(fontsize=8, loc="lower right")
    bars = ax_m.bar(list(x), [r["train_memory_ratio"] for r in rows], 0.5, color="tab:green", label="training step")
    ax_m.bar_label(bars, fmt="%.2f", fontsize=8)
    ax_m.axhline(TARGETS["train_memory_ratio"], color="k", ls="--", lw=1, label="target")
    ax_m.set_xticks(list(x), labels)
    ax_m.set_ylim(0, 1.05)
    ax_m.set_ylabel("peak activation memory / upstream's")
    ax_m.legend(fontsize=8, loc="upper right")
    cfg = result["config"]
    env = result["environment"]
    where = env.get("gpu") or f"{env['cpu']}, {env['threads']} thread(s)"
    fig.suptitle(f"TransReID JPM+SIE, {cfg['arch']}, batch {cfg['batch']}, 256x128, {cfg['amp']} AMP, {where}",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    arch, batch = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    if args.quick:
        arch, batch, args.repeat = "vit_tiny_patch16", 8, 1
    args.arch, args.batch = args.arch or arch, args.batch or batch
    if args.batch < 4 or args.batch % 4:
        raise SystemExit(f"--batch must be a multiple of 4 (P x K sampling with K = 4), got {args.batch}")
    rows = [run_stride(args, stride, device) for stride in args.strides]
    result = {
        "benchmark": "bench_transreid",
        "environment": environment(device),
        "config": {"arch": args.arch, "batch": args.batch, "img_size": [256, 128], "jpm": True,
                   "sie": "camera (6)", "num_classes": 751, "drop_path": 0.1, "amp": args.amp,
                   "repeat": args.repeat, "quick": args.quick, "compile": args.compile},
        "targets": TARGETS,
        "rows": rows,
        "summary": {f"stride_{r['stride']}": {"train_speedup": round(r["train_speedup"], 3),
                                              "train_memory_ratio": round(r["train_memory_ratio"], 3),
                                              "eval_speedup": round(r["eval_speedup"], 3)} for r in rows},
    }
    name = f"bench_transreid_{device.type}" + ("_quick" if args.quick else "") + ("_compile" if args.compile else "")
    write_result(result, args.out, name)
    plot(result, os.path.join(args.out, name + ".png"))
    return result


if __name__ == "__main__":
    main()
