"""The built-in end-to-end demo: synthetic persons -> evaluate an untrained small model -> train it
on the CPU for a few minutes -> evaluate again -> results table, training curve, ranked lists and
local correspondences under one folder."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..data import build_dataset, generate_synthetic
from . import visualize
from .evaluate import evaluate, load_trained, results_table
from .trainer import Trainer, TrainConfig


@dataclass
class DemoConfig:
    out: str = "demo_out"
    ids: int = 60  # half train, half test
    cams: int = 6
    images_per_cam: int = 8
    height: int = 128
    width: int = 64
    epochs: int = 15
    step_size: int = 12
    batch_size: int = 32
    num_instances: int = 4
    lr: float = 0.02
    # Without pretrained weights the backbone must learn as fast as the rest.
    backbone_lr_factor: float = 1.0
    workers: int = 2
    seed: int = 0
    num_trans_layers: int = 1
    neck: int = 64
    dim_feedforward: int = 128
    max_steps_per_epoch: Optional[int] = None
    progress: bool = True


def _log(message: str) -> None:
    print(message, flush=True)


def run_demo(config: DemoConfig) -> Dict[str, Any]:
    """Runs every stage and returns the before/after metrics; see the module docstring."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data_dir = out / "data"
    if not (data_dir / "synthetic.json").exists():
        _log(f"[1/5] writing {config.ids} synthetic identities x {config.cams} cameras x "
             f"{config.images_per_cam} images to {data_dir}")
        generate_synthetic(data_dir, ids=config.ids, cams=config.cams, images_per_cam=config.images_per_cam,
                           seed=config.seed, height=config.height, width=config.width)
    dataset = build_dataset("market1501", data_dir)
    _log(dataset.summary())
    train_config = TrainConfig(
        dataset="market1501", data_dir=str(data_dir), height=config.height, width=config.width,
        workers=config.workers, arch="resnet18", ibn=None, neck=config.neck,
        num_trans_layers=config.num_trans_layers, dim_feedforward=config.dim_feedforward,
        batch_size=config.batch_size, num_instances=config.num_instances, lr=config.lr,
        backbone_lr_factor=config.backbone_lr_factor,
        epochs=config.epochs, step_size=config.step_size, freeze_bn=False, seed=config.seed,
        exp_dir=str(out / "train"), max_steps_per_epoch=config.max_steps_per_epoch,
        progress=config.progress, log_every=5,
        overwrite=True)  # the demo's own folder: a second demo retrains it from scratch
    trainer = Trainer(train_config)
    evaluation_args = dict(height=config.height, width=config.width, batch_size=64, workers=config.workers,
                           progress=config.progress)

    _log("[2/5] evaluating the untrained model")
    before = evaluate(trainer.model, trainer.matcher, dataset.query, dataset.gallery, **evaluation_args)
    _log(results_table({"untrained": before.metrics}))

    _log(f"[3/5] training for {config.epochs} epochs on {trainer.device}")
    train_start = time.perf_counter()
    trainer.fit()
    train_seconds = time.perf_counter() - train_start

    _log("[4/5] evaluating the trained model (from its checkpoint)")
    model, matcher, _ = load_trained(trainer.checkpoint_path)
    after = evaluate(model, matcher, dataset.query, dataset.gallery, **evaluation_args)
    table = results_table({"untrained": before.metrics, "trained": after.metrics})
    _log(table)

    _log("[5/5] pictures")
    pictures = [visualize.plot_training_curves(trainer.exp_dir / "log.jsonl", out / "training_curve.png")]
    pictures += visualize.save_ranked_lists(out / "ranked_lists", dataset.query, dataset.gallery,
                                            after.distances.numpy(), num_queries=6, topk=10,
                                            seed=config.seed)
    pictures += save_query_correspondences(model, matcher, dataset, after, out / "correspondences")

    summary = {"before": before.metrics, "after": after.metrics, "train_seconds": train_seconds,
               "total_seconds": time.perf_counter() - started, "config": vars(config),
               "mAP_ratio": after.metrics["mAP"] / max(before.metrics["mAP"], 1e-12)}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n")
    _log(f"mAP {100 * before.metrics['mAP']:.1f}% -> {100 * after.metrics['mAP']:.1f}% "
         f"({summary['mAP_ratio']:.1f}x); training {train_seconds / 60:.1f} min, total "
         f"{summary['total_seconds'] / 60:.1f} min; wrote {out}/results.md, results.json and "
         f"{len(pictures)} pictures")
    return summary


def save_query_correspondences(model, matcher, dataset, evaluation, folder: Path, pairs: int = 3):
    """For the first few queries: the correspondences with their nearest correct gallery image."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = evaluation.distances
    written = []
    q_pids, g_pids = evaluation.query.pids, evaluation.gallery.pids
    q_cams, g_cams = evaluation.query.cams, evaluation.gallery.cams
    for qi in range(min(pairs, len(dataset.query))):
        # The nearest same-identity image from another camera: what the protocol counts as a match.
        candidates = (g_pids == q_pids[qi]) & (g_cams != q_cams[qi])
        if not candidates.any():
            continue
        gi = int(torch.where(candidates, dist[qi], torch.inf).argmin())
        probe = evaluation.query.features[qi:qi + 1].float()
        gallery = evaluation.gallery.features[gi:gi + 1].float()
        matches = visualize.correspondences(matcher, probe, gallery)
        path = folder / f"q{qi}_pid{int(q_pids[qi])}_g{gi}.png"
        written.append(visualize.save_correspondences(path, dataset.query[qi][0], dataset.gallery[gi][0],
                                                      matches))
    return written
