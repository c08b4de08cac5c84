"""``pretrain``: DINO self-supervised pre-training of a ViT on unlabelled images, with every
option of ``train`` (a private copy of its parser) plus the CFS list's and DINO's."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import _non_negative_int, _optional_int, _optional_str, _positive_int
from .train import add_train_parser, train_entry


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
    """``pretrain``: every option of ``train`` (a private copy of its parser, so that its defaults
    and help can be DINO's without touching train's), the unlabelled data's and DINO's."""
    from ..engine.trainer import TrainConfig

    d = TrainConfig(method="dino")
    scratch = argparse.ArgumentParser(add_help=False).add_subparsers()
    pretrain = commands.add_parser(
        "pretrain", parents=[add_train_parser(scratch)], add_help=False,
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
    helps = {"method": "the self-supervised method", "dataset": "images: any folder tree of unlabelled "
             "images; or a labelled dataset (its training images)",
             "lr": "peak learning rate per 256 images: the run uses lr x batch x GPUs / 256",
             "weight_decay": "weight decay at the start (cosine to --weight-decay-end)",
             "epochs": "epochs", "arch": "the ViT (vit_small_patch16, vit_base_patch16, ...)",
             "drop_path": "student's stochastic depth (the teacher has none)",
             "pretrained": "continue from weights: a DINO checkpoint (teacher), checkpoint.pt / teacher.pth "
                           "of pretrain, TransReID-SSL's released ViT or ImageNet weights",
             "batch_size": "images per GPU (upstream 64 x 8 GPUs)"}
    for action in pretrain._actions:  # the copy's actions: train's stay as they are
        if action.dest in helps:
            action.help = helps[action.dest]
        if action.dest == "method":
            action.choices = ("dino",)
    pretrain.set_defaults(method="dino", dataset="images", exp_dir="runs/pretrain", arch=d.arch,
                          height=d.height, width=d.width, lr=d.lr, weight_decay=d.weight_decay,
                          epochs=d.epochs, sampler=d.sampler, loss=d.loss, clip_value=d.clip_value,
                          freeze_bn=d.freeze_bn, schedule=d.schedule, ibn=d.ibn, run=run_pretrain)

    data = pretrain.add_argument_group("unlabelled images: CFS list")
    data.add_argument("--filter-list", "--filter_path", dest="filter_list", type=_optional_str,
                      default=d.filter_list, help="a CFS-ranked list of the images to keep (cfs_list.txt or "
                      "upstream's CFS_list.pkl; names relative to the dataset's folder)")
    data.add_argument("--keep", "--keep-num", "--keep_num", dest="keep_num", type=_optional_int,
                      default=d.keep_num, help="keep the first N of the list (upstream 2508146: 60 %%)")
    data.add_argument("--keep-ratio", dest="keep_ratio", type=float, default=d.keep_ratio,
                      help="keep this fraction of the list (0.6 or 0.5 upstream)")
    dino = pretrain.add_argument_group("DINO")
    dino.add_argument("--out-dim", "--out_dim", dest="dino_out_dim", type=_positive_int, default=d.dino_out_dim,
                      help="DINO head's output width (prototypes)")
    dino.add_argument("--norm-last-layer", dest="dino_norm_last_layer", action=argparse.BooleanOptionalAction,
                      default=d.dino_norm_last_layer, help="weight-normalised last layer with its norm frozen")
    dino.add_argument("--use-bn-in-head", dest="dino_use_bn_in_head", action=argparse.BooleanOptionalAction,
                      default=d.dino_use_bn_in_head, help="BatchNorm in the head's MLP")
    dino.add_argument("--momentum-teacher", dest="dino_momentum_teacher", type=float,
                      default=d.dino_momentum_teacher, help="teacher EMA momentum at the start (cosine to 1)")
    dino.add_argument("--warmup-teacher-temp", dest="dino_warmup_teacher_temp", type=float,
                      default=d.dino_warmup_teacher_temp)
    dino.add_argument("--teacher-temp", dest="dino_teacher_temp", type=float, default=d.dino_teacher_temp)
    dino.add_argument("--warmup-teacher-temp-epochs", dest="dino_warmup_teacher_temp_epochs",
                      type=_non_negative_int, default=d.dino_warmup_teacher_temp_epochs)
    dino.add_argument("--student-temp", dest="dino_student_temp", type=float, default=d.dino_student_temp)
    dino.add_argument("--center-momentum", dest="dino_center_momentum", type=float,
                      default=d.dino_center_momentum, help="momentum of the teacher's centre")
    dino.add_argument("--local-crops", "--local-crops-number", dest="dino_local_crops", type=_non_negative_int,
                      default=d.dino_local_crops, help="local crops per image (besides the 2 global ones)")
    dino.add_argument("--local-height", "--crop-height", dest="dino_local_height", type=_optional_int,
                      default=d.dino_local_height, help="local crop height (default: half the height)")
    dino.add_argument("--local-width", "--crop-width", dest="dino_local_width", type=_optional_int,
                      default=d.dino_local_width, help="local crop width (default: half the width)")
    dino.add_argument("--global-scale", "--global-crops-scale", dest="dino_global_scale", type=float, nargs=2,
                      metavar=("MIN", "MAX"), default=list(d.dino_global_scale),
                      help="area range of the global crops")
    dino.add_argument("--local-scale", "--local-crops-scale", dest="dino_local_scale", type=float, nargs=2,
                      metavar=("MIN", "MAX"), default=list(d.dino_local_scale), help="area range of the local crops")
    dino.add_argument("--dino-warmup-epochs", dest="dino_warmup_epochs", type=_non_negative_int,
                      default=d.dino_warmup_epochs, help="linear learning-rate warm-up from 0 (per iteration)")
    dino.add_argument("--min-lr", dest="dino_min_lr", type=float, default=d.dino_min_lr,
                      help="the cosine's end")
    dino.add_argument("--weight-decay-end", dest="dino_weight_decay_end", type=float,
                      default=d.dino_weight_decay_end)
    dino.add_argument("--clip-grad", dest="dino_clip_grad", type=float, default=d.dino_clip_grad,
                      help="each parameter's gradient norm, on its own (0: off)")
    dino.add_argument("--freeze-last-layer", dest="dino_freeze_last_layer", type=_non_negative_int,
                      default=d.dino_freeze_last_layer, help="epochs during which the head's last layer stays")
    return pretrain
