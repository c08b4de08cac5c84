"""Command-line interface: ``transmatcher-fast <command>``.

``demo`` matches random query features against random gallery features with the fused op and with
upstream's materialised reference, and prints shapes, time, peak memory and agreement.

``synth`` writes a procedural synthetic person dataset in Market-1501 layout.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from . import benchmarking, ops, reference


def _mib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def run_demo(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    query = torch.randn(args.queries, args.locations, args.dim, generator=generator).to(device)
    gallery = torch.randn(args.gallery, args.locations, args.dim, generator=generator).to(device)
    score_embed = (0.1 * torch.randn(args.locations, args.locations, generator=generator)).to(device)
    backend = ops.dispatch.select(device).name
    print(f"transmatcher_fast demo: {args.queries} queries x {args.gallery} gallery images, "
          f"{args.locations} locations, {args.dim} channels, float32 on {device} "
          f"(backend {backend!r}, {torch.get_num_threads()} threads)")

    def fused():
        return ops.max_sim(query, gallery, score_embed, return_indices=True)

    def materialised():
        return reference.max_sim(query, gallery, score_embed, return_indices=True)

    ours = fused()
    print(f"  q_best {tuple(ours[0].shape)}  g_best {tuple(ours[1].shape)}  "
          f"indices {ours[2].dtype}")
    fns = {"fused max_sim": fused}
    score_bytes = 2 * 4 * args.queries * args.gallery * args.locations**2
    if args.skip_reference:
        print(f"  reference skipped (it would materialise about {_mib(score_bytes)})")
    else:
        fns["reference (materialised)"] = materialised
    # Peak memory first, on cold calls (the reference warmed up on a tiny input only): once large
    # blocks have been freed, the allocator may hand them out again without the process growing.
    reference.max_sim(query[:1, :2], gallery[:1, :2], score_embed[:2, :2])
    peaks = {name: benchmarking.peak_extra_bytes(fn, device) for name, fn in fns.items()}
    seconds = benchmarking.median_seconds(fns, device=device, warmup=1, repeat=args.repeat)
    for name in fns:
        print(f"  {name:<26} {seconds[name] * 1e3:9.1f} ms   peak extra memory {_mib(peaks[name])}")
    if not args.skip_reference:
        expected = materialised()
        diff = max((a - b).abs().max().item() for a, b in zip(ours[:2], expected[:2]))
        same = sum(int((a == b).all()) for a, b in zip(ours[2:], expected[2:]))
        (t_ours, t_ref), (m_ours, m_ref) = seconds.values(), peaks.values()
        print(f"  max |difference| {diff:.2e}; argmax identical in {same}/2 directions")
        print(f"  fused is {t_ref / t_ours:.2f}x faster"
              + ("" if not m_ours or not m_ref else f" and needs {m_ref / m_ours:.0f}x less memory"))
    return 0


def run_synth(args: argparse.Namespace) -> int:
    import time

    from .data.datasets import Market1501
    from .data.synthetic import generate_synthetic

    start = time.perf_counter()
    generate_synthetic(args.out, ids=args.ids, cams=args.cams, images_per_cam=args.images_per_cam,
                       seed=args.seed, height=args.height, width=args.width)
    print(f"wrote {args.ids} ids x {args.cams} cameras x {args.images_per_cam} images "
          f"({args.height}x{args.width}) to {args.out} in {time.perf_counter() - start:.1f} s")
    print(Market1501(args.out).summary())
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transmatcher-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the fused op on random features against the reference")
    demo.add_argument("--queries", type=_positive_int, default=32)
    demo.add_argument("--gallery", type=_positive_int, default=128)
    demo.add_argument("--locations", type=_positive_int, default=192,
                      help="locations per image (24x8 = 192)")
    demo.add_argument("--dim", type=_positive_int, default=512)
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    demo.add_argument("--repeat", type=_positive_int, default=3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--skip-reference", action="store_true",
                      help="do not run the materialised reference (large sizes)")
    demo.set_defaults(run=run_demo)
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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
