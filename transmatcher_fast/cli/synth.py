"""``synth``: write a procedural synthetic person dataset in Market-1501 layout."""

from __future__ import annotations

import argparse

from .common import _positive_int


def run_synth(args: argparse.Namespace) -> int:
    import time

    from ..data.datasets import Market1501
    from ..data.synthetic import generate_synthetic

    start = time.perf_counter()
    generate_synthetic(args.out, ids=args.ids, cams=args.cams, images_per_cam=args.images_per_cam,
                       seed=args.seed, height=args.height, width=args.width)
    print(f"wrote {args.ids} ids x {args.cams} cameras x {args.images_per_cam} images "
          f"({args.height}x{args.width}) to {args.out} in {time.perf_counter() - start:.1f} s")
    print(Market1501(args.out).summary())
    return 0


def add_synth_parser(commands) -> None:
    synth = commands.add_parser("synth", help="write a synthetic person dataset in Market-1501 layout")
    synth.add_argument("--out", required=True, help="output folder (its split folders must be empty)")
    synth.add_argument("--ids", type=_positive_int, default=100,
                       help="identities; the first half train, the rest query/gallery")
    synth.add_argument("--cams", type=_positive_int, default=6, help="cameras (at most 9)")
    synth.add_argument("--images-per-cam", type=_positive_int, default=8)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--height", type=_positive_int, default=128)
    synth.add_argument("--width", type=_positive_int, default=64)
    synth.set_defaults(run=run_synth)
