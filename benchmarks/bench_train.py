"""Training throughput and memory of a small configuration on the synthetic persons.

    python benchmarks/bench_train.py                 # resnet18, neck 64, 1 layer, FF 128, 128x64
    python benchmarks/bench_train.py --steps 10 --data-dir /tmp/synthetic

Throughput: the trainer (graph sampler, pairwise loss, SGD, data loader with augmentation) runs
``--steps`` steps of one epoch on a synthetic Market-1501-layout set (100 ids x 6 cameras x 8
images, written first unless --data-dir has one); images/s counts the steps after the first,
data loading included, and the graph sampler's planning time is reported on its own.

Memory: one training step of the whole model (backbone, neck, matcher, loss, backward) on a batch
of random images, in a fresh process per method: the fused matcher ("ours") and upstream's
materialised matcher ("reference"). The op's share is what it keeps for backward (both maxima and
their argmax per pair and layer) over the step's extra peak memory.
Writes results/bench_train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = dict(arch="resnet18", ibn=None, neck=64, num_trans_layers=1, dim_feedforward=128,
             height=128, width=64)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="training steps timed")
    parser.add_argument("--batch", type=int, default=64, help="batch size (16 ids x 4 images)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data-dir", help="synthetic set to use (default: write one to a temp folder)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", choices=("ours", "reference"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def throughput(args, data_dir: str) -> dict:
    from transmatcher_fast.engine.trainer import Trainer, TrainConfig

    with tempfile.TemporaryDirectory() as exp_dir:
        config = TrainConfig(dataset="market1501", data_dir=data_dir, **SMALL, batch_size=args.batch,
                             num_instances=4, epochs=1, max_steps_per_epoch=args.steps,
                             workers=args.workers, exp_dir=exp_dir, freeze_bn=False, progress=False,
                             tensorboard=False, log_every=1)
        trainer = Trainer(config)
        start = time.perf_counter()
        record = trainer.fit()[0]
        total = time.perf_counter() - start
        steps = [json.loads(line) for line in (Path(exp_dir) / "log.jsonl").read_text().splitlines()]
    steady = [s["images_per_s"] for s in steps if s["kind"] == "step"][1:]
    return {"steps": record["steps"], "images_per_s_epoch": record["images_per_s"],
            "images_per_s_median_step": sorted(steady)[len(steady) // 2] if steady else None,
            "graph_sampler_seconds": record["plan_seconds"], "epoch_seconds": record["seconds"],
            "wall_seconds": total, "final_loss": record["loss"]}


def memory_child(method: str, batch: int) -> None:
    """One full training step in this process; prints its extra peak memory."""
    from transmatcher_fast import benchmarking, build_model, reference

    torch.manual_seed(0)
    model, matcher = build_model(**SMALL)
    images = torch.rand(batch, 3, SMALL["height"], SMALL["width"])
    pids = torch.arange(batch) // 4
    labels = (pids[:, None] == pids[None, :]).float()

    def step():
        features = model(images)
        if method == "ours":
            matcher.make_kernel(features)
            score = matcher(features)
        else:
            score = reference.transmatcher_scores(matcher, features, features)
        F.binary_cross_entropy_with_logits(score, labels, reduction="none").sum(1).mean().backward()

    step()
    benchmarking.print_cpu_peak(step)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.batch)
        return 0
    from transmatcher_fast import benchmarking
    from transmatcher_fast.data import generate_synthetic

    result = {"config": {**SMALL, "batch": args.batch, "num_instances": 4, "workers": args.workers},
              "environment": benchmarking.environment(torch.device("cpu"))}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            data_dir = os.path.join(tmp, "synthetic")
            start = time.perf_counter()
            generate_synthetic(data_dir, ids=100, cams=6, images_per_cam=8, height=128, width=64)
            print(f"synthetic set written in {time.perf_counter() - start:.1f} s")
        result["throughput"] = throughput(args, data_dir)
    t = result["throughput"]
    print(f"training: {t['images_per_s_epoch']:.1f} images/s over {t['steps']} steps (median step "
          f"{t['images_per_s_median_step']:.1f} images/s); graph sampler {t['graph_sampler_seconds']:.1f} s")
    if not args.skip_memory:
        peaks = {m: benchmarking.cpu_peak_in_child([os.path.abspath(__file__), "--memory-child", m,
                                                    "--batch", str(args.batch)], timeout=600)
                 for m in ("ours", "reference")}
        h, w = SMALL["height"] // 16, SMALL["width"] // 16
        layers = SMALL["num_trans_layers"]
        # q_best and g_best (float32) and their int32 argmax, per pair and layer.
        op_bytes = args.batch * args.batch * 2 * h * w * (4 + 4) * layers
        result["memory"] = {"step_peak_bytes": peaks, "op_saved_bytes": op_bytes,
                            "op_share_of_step": op_bytes / peaks["ours"] if peaks["ours"] else None,
                            "materialised_similarity_bytes": args.batch ** 2 * (h * w) ** 2 * 4 * layers}
        m = result["memory"]
        print(f"step peak: ours {peaks['ours'] / 2**20:.1f} MiB, reference {peaks['reference'] / 2**20:.1f} MiB; "
              f"the op keeps {op_bytes / 2**20:.2f} MiB = {100 * m['op_share_of_step']:.1f}% of ours")
    benchmarking.write_result(result, args.out, "bench_train")
    return 0


if __name__ == "__main__":
    sys.exit(main())
