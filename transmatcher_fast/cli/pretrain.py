"""``pretrain``: DINO self-supervised pre-training of a ViT on unlabelled images, with every
option of ``train`` (generated from the same option fields) plus the CFS list's and DINO's
(declared by the DINO method)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .train import add_training_options, train_entry


def run_pretrain(args: argparse.Namespace) -> int:
    return train_entry(args, "pretrain", check=_check_filter_list, finished=_point_to_teacher)


def _check_filter_list(config) -> None:
    from ..engine import validate

    if config.filter_list is not None:
        validate.check_input_file(config.filter_list, "--filter-list")


def _point_to_teacher(trainer, config) -> None:
    """Where the teacher is and how to fine-tune it (once, on the main process)."""
    from ..methods.dino import TEACHER_NAME

    if trainer.is_main:
        path = Path(config.exp_dir) / TEACHER_NAME
        print(f"{path} holds the teacher (DINO's layout, written after every epoch): fine-tune with "
              f"transmatcher-fast train --method transreid --pretrained {path} (or --pretrained its checkpoint.pt)")


def add_pretrain_parser(commands) -> argparse.ArgumentParser:
    """``pretrain``: every option of ``train`` (generated from the same fields, with DINO's
    defaults and some help of its own), the unlabelled data's and DINO's."""
    from ..engine.config import TrainConfig
    from ..methods import METHOD_DEFAULTED

    d = TrainConfig(method="dino")
    pretrain = commands.add_parser(
        "pretrain",
        help="self-supervised pre-training of a ViT on unlabelled images (DINO, TransReID-SSL)",
        description="DINO self-supervised pre-training (TransReID-SSL's LUPerson recipe): a student "
                    "ViT + DINO head on 2 global and --local-crops local crops per image, an EMA teacher "
                    "on the global ones, AdamW with lr per 256 images, warm-up + cosine per iteration, "
                    "weight decay 0.04 -> 0.4, each parameter's gradient clipped to 3.0, AMP. Data: "
                    "-d images (default) is any folder tree of images under --data-dir (LUPerson: "
                    "--data-dir LUP reads LUP/images); a labelled --dataset's training images work too "
                    "and keep its query/gallery for --eval-every (kNN mAP of the teacher). --filter-list "
                    "(cfs_list.txt of transmatcher-fast cfs, or upstream's CFS_list.pkl) with --keep N or "
                    "--keep-ratio R pre-trains on the top of the list. Checkpoints, --resume, logs, "
                    "TensorBoard and torchrun as train (its options below apply; those of other methods are "
                    "refused or unused); at the end EXP_DIR/teacher.pth holds the teacher in DINO's layout. "
                    "Fine-tune with train --method transreid --pretrained EXP_DIR/teacher.pth "
                    "--pretrain-hw-ratio 2 (the pre-training size's height/width; "
                    "configs/transreid_ssl_*.yaml).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_training_options(pretrain, "pretrain")
    helps = {"method": "the self-supervised method", "dataset": "images: any folder tree of unlabelled "
             "images; or a labelled dataset (its training images)",
             "lr": "peak learning rate per 256 images: the run uses lr x batch x GPUs / 256",
             "weight_decay": "weight decay at the start (cosine to --weight-decay-end)",
             "epochs": "epochs", "arch": "the ViT (vit_small_patch16, vit_base_patch16, ...)",
             "drop_path": "student's stochastic depth (the teacher has none)",
             "pretrained": "continue from weights: a DINO checkpoint (teacher), checkpoint.pt / teacher.pth "
                           "of pretrain, TransReID-SSL's released ViT or ImageNet weights",
             "batch_size": "images per GPU (upstream 64 x 8 GPUs)"}
    for action in pretrain._actions:  # pretrain's own actions: train's stay as they are
        if action.dest in helps:
            action.help = helps[action.dest]
        if action.dest == "method":
            action.choices = ("dino",)
    pretrain.set_defaults(method="dino", dataset="images", exp_dir="runs/pretrain", run=run_pretrain,
                          **{name: getattr(d, name) for name in METHOD_DEFAULTED})
    return pretrain
