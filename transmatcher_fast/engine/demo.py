"""The built-in end-to-end demo of any method: synthetic persons -> evaluate an untrained small
model -> train it on the CPU for a few minutes -> evaluate again -> results table, training curve,
ranked lists and the method's own pictures (local correspondences of the fused matchers, attention
maps of ViTs) under one folder. The small model is the method's ``demo_options``."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..data import build_dataset, generate_synthetic
from ..methods import DEFAULT_METHOD, get_method
from . import attention_pictures, visualize
from .evaluate import eval_transform, evaluate, load_trained, results_table
from .trainer import Trainer, TrainConfig


@dataclass
class DemoConfig:
    method: str = DEFAULT_METHOD
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
    # Without pretrained weights the backbone must learn as fast as the rest (the matchers').
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
    method = get_method(config.method)
    train_config = TrainConfig(
        method=config.method, **method.demo_options,
        dataset="market1501", data_dir=str(data_dir), height=config.height, width=config.width,
        workers=config.workers, neck=config.neck,
        num_trans_layers=config.num_trans_layers, dim_feedforward=config.dim_feedforward,
        batch_size=config.batch_size, num_instances=config.num_instances, lr=config.lr,
        backbone_lr_factor=config.backbone_lr_factor,
        epochs=config.epochs, step_size=config.step_size, seed=config.seed,
        exp_dir=str(out / "train"), max_steps_per_epoch=config.max_steps_per_epoch,
        progress=config.progress, log_every=5,
        overwrite=True)  # the demo's own folder: a second demo retrains it from scratch
    trainer = Trainer(train_config)
    evaluation_args = dict(height=config.height, width=config.width, batch_size=64, workers=config.workers,
                           progress=config.progress, transform=trainer.test_transform(), amp=method.eval_amp,
                           query_views=dataset.query_views, gallery_views=dataset.gallery_views)

    _log("[2/5] evaluating the untrained model")
    before = evaluate(trainer.model, trainer.matcher, dataset.query, dataset.gallery, **evaluation_args)
    _log(results_table({"untrained": before.metrics}))

    _log(f"[3/5] training {method.name} for {config.epochs} epochs on {trainer.device}")
    train_start = time.perf_counter()
    trainer.fit()
    train_seconds = time.perf_counter() - train_start

    _log("[4/5] evaluating the trained model (from its checkpoint)")
    model, matcher, trained_config = load_trained(trainer.checkpoint_path)
    evaluation_args["transform"] = eval_transform(trained_config, config.height, config.width)
    after = evaluate(model, matcher, dataset.query, dataset.gallery, **evaluation_args)
    table = results_table({"untrained": before.metrics, "trained": after.metrics})
    _log(table)

    _log("[5/5] pictures")
    pictures = [visualize.plot_training_curves(trainer.exp_dir / "log.jsonl", out / "training_curve.png")]
    pictures += visualize.save_ranked_lists(out / "ranked_lists", dataset.query, dataset.gallery,
                                            after.distances.numpy(), num_queries=6, topk=10,
                                            seed=config.seed, camera_base=dataset.camera_base)
    if visualize.draws_correspondences(matcher):
        pictures += save_query_correspondences(model, matcher, dataset, after, out / "correspondences")
    if attention_pictures.draws_attention(model):
        first_of_pid = {}
        for i, item in enumerate(after.query_items):
            first_of_pid.setdefault(int(item[1]), i)
        picked = sorted(first_of_pid.values())[:4]  # four identities
        items = [after.query_items[i] for i in picked]
        pictures += attention_pictures.save_attention_pictures(
            out / "attention", model, items, evaluation_args["transform"], views=dataset.views_of(items),
            indices=picked, camera_base=dataset.camera_base)

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


def save_query_correspondences(model, matcher, dataset, evaluation, folder: Path, pairs: int = 3, *,
                               negatives: bool = True):
    """Correspondence pictures of up to ``pairs`` queries of distinct identities: in query order,
    the first query of each not yet drawn pid that has a correct gallery image (same pid, another
    camera: what the protocol counts), with its nearest correct gallery image; with ``negatives``
    also with its nearest wrong one (another pid). Nearest by ``evaluation.distances`` (dense, or
    within a top-k list). Each picture's header has the pair's score, ``matcher.match`` on the two
    feature maps (float32, eval mode), and its distance ``1 - sigmoid(score / 10)``; same /
    different identity; and each image's index, pid, camera and file name. Files are named
    ``visualize.correspondence_name(...)``. Returns the paths written, query by query (correct
    pair first). ``model`` is unused (kept for the callers)."""
    from .matching import TopK, score_to_distance

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    q_items = evaluation.query_items if evaluation.query_items is not None else list(dataset.query)
    g_items = evaluation.gallery_items if evaluation.gallery_items is not None else list(dataset.gallery)
    q_pids, g_pids = evaluation.query.pids, evaluation.gallery.pids
    q_cams, g_cams = evaluation.query.cams, evaluation.gallery.cams
    num_query, num_gallery = len(q_pids), len(g_pids)
    dist = evaluation.distances

    def distance_row(qi: int) -> torch.Tensor:
        if isinstance(dist, TopK):  # only the kept candidates are known
            row = torch.full((num_gallery,), float("inf"))
            keep = dist.index[qi] >= 0
            row[dist.index[qi][keep]] = dist.dist[qi][keep].float()
            return row
        return dist[qi].float()

    try:
        device = next(matcher.parameters()).device
    except StopIteration:
        device = torch.device("cpu")

    def pair_score(probe: torch.Tensor, gallery: torch.Tensor) -> float:
        modes = {m: m.training for m in matcher.modules()}
        matcher.eval()
        try:
            with torch.no_grad():
                return float(matcher.match(probe, gallery).reshape(-1)[0])
        finally:
            for module, mode in modes.items():
                module.training = mode

    def label(items, index: int, pid, cam, role: str) -> str:
        label = visualize.id_label(pid, cam, getattr(dataset, "camera_base", 0))
        return f"{role} {index}, {label}, {Path(items[index][0]).name}"

    written, drawn = [], set()
    for qi in range(num_query):
        if len(drawn) >= pairs:
            break
        pid = int(q_pids[qi])
        if pid in drawn:
            continue
        row = distance_row(qi)
        same = g_pids == q_pids[qi]
        correct = same & (g_cams != q_cams[qi]) & torch.isfinite(row)
        if not correct.any():
            continue
        drawn.add(pid)
        chosen = [int(torch.where(correct, row, torch.inf).argmin())]
        wrong = ~same & torch.isfinite(row)
        if negatives and wrong.any():
            chosen.append(int(torch.where(wrong, row, torch.inf).argmin()))
        probe = evaluation.query.features[qi:qi + 1].float().to(device)
        for gi in chosen:
            gallery = evaluation.gallery.features[gi:gi + 1].float().to(device)
            matches = visualize.correspondences(matcher, probe, gallery)
            score = pair_score(probe, gallery)
            g_pid = int(g_pids[gi])
            path = folder / visualize.correspondence_name(qi, pid, gi, g_pid, num_query, num_gallery)
            written.append(visualize.save_correspondences(
                path, q_items[qi][0], g_items[gi][0], matches, score=score,
                distance=float(score_to_distance(torch.tensor(score))), same_identity=g_pid == pid,
                probe_label=label(q_items, qi, pid, q_cams[qi], "query"),
                gallery_label=label(g_items, gi, g_pid, g_cams[gi], "gallery")))
    return written
