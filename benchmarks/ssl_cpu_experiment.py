"""TransReID-SSL on the CPU in minutes: DINO pre-training of a tiny ViT on the synthetic persons'
training images (used as unlabelled images), then TransReID fine-tuning from the pre-trained
teacher against the same fine-tuning from scratch (same recipe, same epochs, same seed).

    python benchmarks/ssl_cpu_experiment.py             # 11.7 min on 2 shared cores (committed results)
    python benchmarks/ssl_cpu_experiment.py --quick     # a smoke run of the whole pipeline

What it does, with the engine's methods (``dino`` then ``transreid``), as the CLI would
(``transmatcher-fast pretrain`` / ``train --pretrained EXP/teacher.pth``):

1. ``generate_synthetic``: ``--ids`` identities (half train) x ``--cams`` cameras x
   ``--images-per-cam`` at 128 x 64.
2. DINO: ``vit_tiny_patch16`` (192 wide, 4 blocks), 2 global crops at 128 x 64 + ``--local-crops``
   at 64 x 32, head of ``--out-dim`` prototypes, AdamW (lr per 256 images), warm-up + cosine,
   weight decay 0.04 -> 0.4, teacher momentum ``--momentum`` -> 1, teacher temperature 0.04,
   per-parameter clipping 3.0, last layer frozen in epoch 0. After every epoch, on a fixed batch
   of 128 training images (global view, test transform) the teacher's collapse statistics
   (``models.dino.teacher_stats``): entropy of its mean (centred, sharpened) output distribution
   (0 = every image on the same prototypes), mean per-image entropy (log K = uniform outputs), and
   the std over the batch of the L2-normalised cls features (0 = one feature for all images;
   1/sqrt(D) ~ spread over the sphere); and every ``--eval-every`` epochs the teacher's kNN re-ID
   mAP (cosine) on query/gallery.
3. Fine-tuning, twice: TransReID without JPM/SIE (TransReID-SSL's model), CE + soft triplet, P x K,
   SGD ``--lr-finetune``, warm-up + cosine stepped at the epoch's end (SSL's offset 0),
   ``--finetune-epochs``; from the DINO teacher (``pretrain_hw_ratio`` 2) and from scratch.
   mAP / rank-1 on query/gallery every ``--eval-every`` epochs and at the end.
4. Attention: the last layer's cls attention per head, thresholded to 60 % of its mass (DINO's
   view), of the pre-trained teacher and of the fine-tuned model, side by side.

Writes results/ssl_cpu_experiment.json, ssl_cpu_experiment.png and ssl_cpu_attention.png (the
work folder, with the runs, is --work, a temporary folder by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from transmatcher_fast.benchmarking import environment, pyplot, save_figure, write_result
from transmatcher_fast.data import build_dataset, generate_synthetic
from transmatcher_fast.engine import attention_pictures, checkpoint
from transmatcher_fast.engine.evaluate import eval_transform, evaluate, load_trained
from transmatcher_fast.engine.trainer import Trainer, TrainConfig
from transmatcher_fast.methods.dino import teacher_checkpoint
from transmatcher_fast.models.dino import teacher_stats

HERE = Path(__file__).resolve().parent
PROBE_IMAGES = 128


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=None, help="work folder (default: a temporary one, removed)")
    p.add_argument("--ids", type=int, default=60)
    p.add_argument("--cams", type=int, default=4)
    p.add_argument("--images-per-cam", type=int, default=4)
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=12)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--local-crops", type=int, default=4)
    p.add_argument("--out-dim", type=int, default=1024)
    p.add_argument("--lr-dino", type=float, default=0.004, help="DINO lr per 256 images")
    p.add_argument("--momentum", type=float, default=0.99, help="teacher EMA momentum at the start")
    p.add_argument("--lr-finetune", type=float, default=0.01)
    p.add_argument("--eval-every", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 + 2 epochs of 3 steps: checks the pipeline")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    return p.parse_args(argv)


def common(args, work: Path, exp: str) -> dict:
    return dict(dataset="market1501", data_dir=str(work / "data"), height=128, width=64, workers=args.workers,
                arch="vit_tiny_patch16", batch_size=args.batch, seed=args.seed, exp_dir=str(work / exp),
                progress=False, tensorboard=False, log_every=1, eval_every=args.eval_every, overwrite=True,
                max_steps_per_epoch=3 if args.quick else None)


@torch.no_grad()
def probe(parts, images: torch.Tensor, epoch: int) -> dict:
    """The teacher's collapse statistics on ``images`` [N, 3, 128, 64] after ``epoch``."""
    teacher, loss = parts["teacher"], parts["dino_loss"]
    was_training = teacher.training
    teacher.eval()
    try:
        features = teacher.backbone(images)
        logits = teacher.head(features)
    finally:
        teacher.train(was_training)
    stats = teacher_stats(logits, loss.center, float(loss.teacher_temp_schedule[epoch])).as_dict()
    stats["feature_std"] = float(F.normalize(features, dim=1).std(dim=0).mean())
    stats["feature_std_reference"] = 1 / math.sqrt(features.shape[1])  # spread evenly over the sphere
    return stats


def records(exp_dir: Path, kind: str) -> list:
    return [r for r in map(json.loads, (exp_dir / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def final_metrics(path: Path, dataset) -> dict:
    model, matcher, config = load_trained(path)
    result = evaluate(model, matcher, dataset.query, dataset.gallery, height=128, width=64, batch_size=64,
                      workers=0, progress=False, transform=eval_transform(config, 128, 64))
    return {k: float(result.metrics[k]) for k in ("mAP", "rank1", "rank5")}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="ssl_cpu_"))
    result = {"environment": environment(torch.device("cpu")), "config": vars(args), "seconds": {}}
    start = time.perf_counter()
    counts = generate_synthetic(work / "data", ids=args.ids, cams=args.cams, images_per_cam=args.images_per_cam,
                                seed=args.seed, height=128, width=64)
    result["data"] = counts
    dataset = build_dataset("market1501", work / "data")

    # --- DINO -------------------------------------------------------------------------------
    pre_epochs = 2 if args.quick else args.pretrain_epochs
    dino = TrainConfig(method="dino", **common(args, work, "dino"), epochs=pre_epochs, lr=args.lr_dino,
                       dino_out_dim=args.out_dim, dino_local_crops=args.local_crops,
                       dino_warmup_epochs=min(2, pre_epochs), dino_momentum_teacher=args.momentum)
    trainer = Trainer(dino)
    probe_items = dataset.train[::max(1, len(dataset.train) // PROBE_IMAGES)][:PROBE_IMAGES]
    transform = trainer.test_transform()
    from transmatcher_fast.data.images import open_image
    images = torch.stack([transform(open_image(path)) for path, _, _ in probe_items])
    stats = [{"epoch": -1, **probe(trainer.parts, images, 0)}]  # the random initialisation
    knn_before = evaluate(trainer.model, trainer.matcher, dataset.query, dataset.gallery, height=128, width=64,
                          workers=0, progress=False, transform=transform).metrics
    train_epoch = trainer.train_epoch

    def train_epoch_and_probe(epoch):
        record = train_epoch(epoch)
        stats.append({"epoch": epoch, **probe(trainer.parts, images, epoch)})
        s = stats[-1]
        print(f"  teacher: entropy of the mean output {s['entropy']:.3f} (max {s['max_entropy']:.3f}), "
              f"per image {s['sample_entropy']:.3f}, feature std {s['feature_std']:.4f}", flush=True)
        return record

    trainer.train_epoch = train_epoch_and_probe
    history = trainer.fit()
    teacher_file = checkpoint.save_atomic(teacher_checkpoint(trainer.parts, pre_epochs, dataclasses.asdict(dino)),
                                          work / "dino" / "teacher.pth")
    trainer.close()
    result["seconds"]["pretrain"] = time.perf_counter() - start
    result["dino"] = {
        "epoch_loss": [r["loss"] for r in history], "epoch_agreement": [r["acc"] for r in history],
        "step_loss": [r["loss"] for r in records(work / "dino", "step")],
        "teacher": stats, "knn_before": {k: float(knn_before[k]) for k in ("mAP", "rank1")},
        "knn": [{"epoch": r["epoch"], "mAP": r["mAP"], "rank1": r["rank1"]} for r in records(work / "dino", "eval")],
        "knn_final": final_metrics(work / "dino" / "checkpoint.pt", dataset)}
    print(f"DINO loss {history[0]['loss']:.4f} (epoch 1) -> {history[-1]['loss']:.4f} (epoch {len(history)}); "
          f"teacher kNN mAP {knn_before['mAP']:.3f} (random init) -> {result['dino']['knn_final']['mAP']:.3f}")

    # --- fine-tuning, from the teacher and from scratch -------------------------------------
    ft_epochs = 2 if args.quick else args.finetune_epochs
    result["finetune"] = {}
    for name, pretrained in (("from_dino", str(teacher_file)), ("from_scratch", None)):
        t0 = time.perf_counter()
        config = TrainConfig(method="transreid", **common(args, work, f"ft_{name}"), epochs=ft_epochs,
                             lr=args.lr_finetune, warmup_epochs=min(2, ft_epochs), schedule_offset=0,
                             pretrained=pretrained, pretrain_hw_ratio=2, num_instances=4)
        ft = Trainer(config)
        ft_history = ft.fit()
        ft.close()
        result["seconds"][f"finetune_{name}"] = time.perf_counter() - t0
        metrics = final_metrics(work / f"ft_{name}" / "checkpoint.pt", dataset)
        result["finetune"][name] = {
            "epoch_loss": [r["loss"] for r in ft_history], "epoch_acc": [r["acc"] for r in ft_history],
            "evals": [{"epoch": r["epoch"], "mAP": r["mAP"], "rank1": r["rank1"]}
                      for r in records(work / f"ft_{name}", "eval")],
            "final": metrics}
        print(f"fine-tuned {name}: mAP {metrics['mAP']:.3f}, rank-1 {metrics['rank1']:.3f}", flush=True)

    # --- attention: pre-trained teacher vs fine-tuned ------------------------------------------
    teacher_model, _, teacher_config = load_trained(work / "dino" / "checkpoint.pt")
    tuned_model, _, tuned_config = load_trained(work / "ft_from_dino" / "checkpoint.pt")
    first_of_pid = {}
    for i, item in enumerate(dataset.query):
        first_of_pid.setdefault(item[1], i)
    picked = sorted(first_of_pid.values())[:3]
    pictures = attention_pictures.save_attention_comparison(
        work / "attention", {"pre-trained (DINO teacher)": (teacher_model, eval_transform(teacher_config, 128, 64)),
                             "fine-tuned (TransReID)": (tuned_model, eval_transform(tuned_config, 128, 64))},
        [dataset.query[i] for i in picked], size=(128, 64), keep=0.6, indices=picked)
    result["seconds"]["total"] = time.perf_counter() - start
    os.makedirs(args.out_dir, exist_ok=True)
    if not args.quick:
        _stack(pictures, Path(args.out_dir) / "ssl_cpu_attention.png")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _stack(paths, out: Path) -> None:
    """The comparison pictures of several queries, side by side, as one PNG."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    canvas = Image.new("RGB", (sum(i.width for i in images) + 8 * (len(images) - 1), max(i.height for i in images)),
                       "white")
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
        x += image.width + 8
    canvas.save(out)
    print(f"wrote {out}")


def plot(result: dict, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return

    dino = result["dino"]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    steps = dino["step_loss"]
    per_epoch = len(steps) / max(len(dino["epoch_loss"]), 1)
    axes[0].plot([(i + 1) / per_epoch for i in range(len(steps))], steps, lw=0.6, alpha=0.5, label="step")
    axes[0].plot(range(1, len(dino["epoch_loss"]) + 1), dino["epoch_loss"], "o-", ms=3, label="epoch mean")
    axes[0].set(title="DINO loss", xlabel="epoch")
    axes[0].legend(fontsize=8)
    epochs = [s["epoch"] + 1 for s in dino["teacher"]]
    axes[1].plot(epochs, [s["entropy"] for s in dino["teacher"]], "o-", ms=3, label="of the mean output")
    axes[1].plot(epochs, [s["sample_entropy"] for s in dino["teacher"]], "s-", ms=3, label="per image (mean)")
    axes[1].axhline(dino["teacher"][0]["max_entropy"], color="k", ls="--", lw=0.8, label="log K (uniform)")
    axes[1].set(title="teacher output entropy (nats)", xlabel="epoch (0 = init)")
    axes[1].legend(fontsize=8)
    axes[2].plot(epochs, [s["feature_std"] for s in dino["teacher"]], "o-", ms=3, label="teacher cls features")
    axes[2].axhline(dino["teacher"][0]["feature_std_reference"], color="k", ls="--", lw=0.8, label="1/sqrt(D)")
    axes[2].set(title="std of L2-normalised features", xlabel="epoch (0 = init)", ylim=(0, None))
    axes[2].legend(fontsize=8)
    for name, style in (("from_dino", "o-"), ("from_scratch", "s--")):
        evals = result["finetune"][name]["evals"]
        axes[3].plot([e["epoch"] + 1 for e in evals], [100 * e["mAP"] for e in evals], style, ms=3,
                     label=f"{name.replace('_', ' ')}: mAP {100 * result['finetune'][name]['final']['mAP']:.1f}, "
                           f"R1 {100 * result['finetune'][name]['final']['rank1']:.1f}")
    knn = dino["knn_final"]
    axes[3].axhline(100 * knn["mAP"], color="grey", ls=":", lw=1, label=f"DINO teacher kNN mAP {100 * knn['mAP']:.1f}")
    axes[3].set(title="fine-tuning: query/gallery mAP (%)", xlabel="epoch")
    axes[3].legend(fontsize=7)
    cfg, env = result["config"], result["environment"]
    fig.suptitle(f"TransReID-SSL on the CPU: vit_tiny_patch16, synthetic persons ({result['data']['bounding_box_train']} "
                 f"train images), DINO {cfg['pretrain_epochs']} epochs then TransReID {cfg['finetune_epochs']} epochs; "
                 f"{env['cpu']}, {env['threads']} threads, {result['seconds']['total'] / 60:.1f} min", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def summarise(result: dict) -> dict:
    """The figures the issue asks for, from the measured series."""
    dino, teacher = result["dino"], result["dino"]["teacher"]
    losses = dino["epoch_loss"]
    return {"dino_loss_first_epoch": losses[0], "dino_loss_last_epoch": losses[-1],
            "dino_loss_min": min(losses), "dino_loss_min_epoch": losses.index(min(losses)) + 1,
            "teacher_entropy_init_first_last": [teacher[0]["entropy"], teacher[1]["entropy"], teacher[-1]["entropy"]],
            "teacher_sample_entropy_last": teacher[-1]["sample_entropy"], "max_entropy": teacher[0]["max_entropy"],
            "teacher_feature_std_init_last": [teacher[0]["feature_std"], teacher[-1]["feature_std"]],
            "feature_std_reference": teacher[0]["feature_std_reference"],
            "teacher_knn_mAP_init_final": [dino["knn_before"]["mAP"], dino["knn_final"]["mAP"]],
            **{f"finetune_{name}": v["final"] for name, v in result["finetune"].items()}}


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    result["summary"] = summarise(result)
    name = "ssl_cpu_experiment" + ("_quick" if args.quick else "")
    if not args.quick:
        write_result(result, args.out_dir, name)
        plot(result, os.path.join(args.out_dir, f"{name}.png"))
    else:
        print(json.dumps({"dino_loss": result["dino"]["epoch_loss"],
                          "finetune": {k: v["final"] for k, v in result["finetune"].items()}}, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
