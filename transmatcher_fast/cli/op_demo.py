"""``op-demo``: the fused op on random features against upstream's materialised reference
(shapes, time, peak memory, agreement)."""

from __future__ import annotations

import argparse
from typing import Optional

import torch

from .. import benchmarking, ops, reference
from .common import _positive_int


def _mib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def run_op_demo(args: argparse.Namespace) -> int:
    from ..engine.validate import check_device

    device = check_device(args.device)
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


def add_op_demo_parser(commands) -> None:
    demo = commands.add_parser("op-demo", help="run the fused op on random features against the reference")
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
    demo.set_defaults(run=run_op_demo)
