"""``demo``: the built-in end-to-end run (synthetic data, evaluate, train on CPU, evaluate,
pictures)."""

from __future__ import annotations

import argparse

from .common import _NOT_OPTIONS, _optional_int, _positive_int


def run_end_to_end_demo(args: argparse.Namespace) -> int:
    from ..engine.demo import DemoConfig, run_demo

    values = {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS}
    run_demo(DemoConfig(**values))
    return 0


def add_demo_parser(commands) -> None:
    from ..engine.demo import DemoConfig

    d = DemoConfig()
    demo = commands.add_parser(
        "demo", help="end to end: synthetic data, evaluate, train on CPU, evaluate, pictures",
        description="Generate a synthetic person dataset, evaluate an untrained small model of --method "
                    "(TransMatcher: resnet18, neck 64; TransReID: a tiny ViT from scratch), train it for a few "
                    "minutes, evaluate it again, and write the before/after table, the training curve, ranked "
                    "lists and the method's pictures (correspondences; ViT attention maps).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--method", default=d.method,
                      help="transmatcher (resnet18, neck 64), qaconv, or transreid (a tiny ViT with SIE and JPM)")
    demo.add_argument("--out", default=d.out, help="output folder (data, checkpoint, results, pictures)")
    demo.add_argument("--ids", type=_positive_int, default=d.ids, help="identities (half train, half test)")
    demo.add_argument("--cams", type=_positive_int, default=d.cams)
    demo.add_argument("--images-per-cam", dest="images_per_cam", type=_positive_int, default=d.images_per_cam)
    demo.add_argument("--epochs", type=_positive_int, default=d.epochs)
    demo.add_argument("--step-size", dest="step_size", type=_positive_int, default=d.step_size)
    demo.add_argument("-b", "--batch-size", dest="batch_size", type=_positive_int, default=d.batch_size)
    demo.add_argument("--num-instances", dest="num_instances", type=_positive_int, default=d.num_instances)
    demo.add_argument("--lr", type=float, default=d.lr)
    demo.add_argument("--backbone-lr-factor", dest="backbone_lr_factor", type=float, default=d.backbone_lr_factor)
    demo.add_argument("-j", "--workers", type=int, default=d.workers)
    demo.add_argument("--seed", type=int, default=d.seed)
    demo.add_argument("--max-steps-per-epoch", dest="max_steps_per_epoch", type=_optional_int,
                      default=d.max_steps_per_epoch, help="cut epochs short (quick runs)")
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress)
    demo.set_defaults(run=run_end_to_end_demo)
