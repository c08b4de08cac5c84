"""Matching cost of a whole evaluation: ours against upstream's chunked, materialised evaluation.

    python benchmarks/bench_eval.py                        # CPU: 64 x 512 images, extrapolated to Market
    python benchmarks/bench_eval.py --queries 3368 --gallery 15913 --device cuda   # Market-1501 on a GPU

Features are random (matching cost does not depend on their values) in the default configuration:
3 decoder layers, 24x8 = 192 locations, d = 512, MLP 2048, matcher in eval mode.

- ours: ``engine.matching.match``: every image projected once, probe x gallery blocks sized from
  free memory, fused op; bf16 autocast on a GPU, float32 on the CPU.
- upstream: ``reid/evaluators.py`` at a2194c8: for every gallery batch of 256 (``--test_fea_batch``),
  for every probe chunk of 128 (``--test_prob_batch``): ``make_kernel(probe_chunk)``,
  ``forward(gallery_batch)`` on the materialised ``[p, g, 192, 192]`` similarity tensor, fc1
  recomputed every call; float32. ``--reference-pairs`` limits it to a subset whose time is
  scaled by the pair count (upstream's cost is linear in pairs; the JSON says when it was scaled).

Peak memory: CUDA ``max_memory_allocated`` above the inputs, or on the CPU the extra peak resident
memory in a fresh process. Writes results/bench_eval.json (and _<device>.json on a GPU).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
MARKET = (3368, 15913)
UPSTREAM_GALLERY_BATCH, UPSTREAM_PROBE_BATCH = 256, 128


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--gallery", type=int, default=512)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--height", type=int, default=24)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--dim-feedforward", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reference-pairs", type=int, default=None,
                        help="time upstream's evaluation on about this many pairs and scale (default: all)")
    parser.add_argument("--topk", type=int, default=100, help="also time ours in top-k mode")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--child", choices=("ours", "upstream"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def make_inputs(args, device):
    from transmatcher_fast import TransMatcher

    torch.manual_seed(0)
    matcher = TransMatcher(args.height * args.width, args.d_model, args.layers, args.dim_feedforward)
    matcher.to(device).eval()
    shape = (args.height, args.width, args.layers * args.d_model)
    query = torch.randn(args.queries, *shape, device=device)
    gallery = torch.randn(args.gallery, *shape, device=device)
    return matcher, query, gallery


def ours(matcher, query, gallery, topk=None):
    from transmatcher_fast.engine import matching

    return matching.match(matcher, query, gallery, topk=topk)


@torch.no_grad()
def upstream(matcher, query, gallery, num_gallery=None):
    """Upstream's loop over gallery batches and probe chunks (the probe set re-sent every batch)."""
    from transmatcher_fast import reference

    num_gallery = gallery.shape[0] if num_gallery is None else num_gallery
    out = torch.empty(query.shape[0], num_gallery)
    for g in range(0, num_gallery, UPSTREAM_GALLERY_BATCH):
        gal = gallery[g:g + UPSTREAM_GALLERY_BATCH]
        for p in range(0, query.shape[0], UPSTREAM_PROBE_BATCH):
            score = reference.transmatcher_scores(matcher, query[p:p + UPSTREAM_PROBE_BATCH], gal)
            out[p:p + UPSTREAM_PROBE_BATCH, g:g + gal.shape[0]] = (1 - torch.sigmoid(score / 10)).cpu()
    return out


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
    return result, seconds, peak


def child(args) -> None:
    """One method on the CPU in a fresh process, for its peak memory."""
    from transmatcher_fast import benchmarking

    matcher, query, gallery = make_inputs(args, torch.device("cpu"))
    limit = _reference_gallery(args)
    fn = (lambda: ours(matcher, query, gallery)) if args.child == "ours" else \
        (lambda: upstream(matcher, query, gallery, limit))
    benchmarking.print_cpu_peak(fn)


def _reference_gallery(args) -> int:
    if args.reference_pairs is None:
        return args.gallery
    per_query = max(UPSTREAM_GALLERY_BATCH, args.reference_pairs // max(1, args.queries))
    return min(args.gallery, math.ceil(per_query / UPSTREAM_GALLERY_BATCH) * UPSTREAM_GALLERY_BATCH)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    from transmatcher_fast import benchmarking

    device = torch.device(args.device)
    matcher, query, gallery = make_inputs(args, device)
    locations = args.height * args.width
    pairs = args.queries * args.gallery
    flops = 2 * pairs * locations * locations * args.d_model * args.layers
    ours(matcher, query[:2], gallery[:2])  # warm-up (kernels, allocator)
    dense, t_ours, m_ours = _timed(lambda: ours(matcher, query, gallery), device)
    top, t_topk, m_topk = _timed(lambda: ours(matcher, query, gallery, args.topk), device)
    limit = _reference_gallery(args)
    expected, t_ref, m_ref = _timed(lambda: upstream(matcher, query, gallery, limit), device)
    t_ref_full = t_ref * args.gallery / limit
    agreement = (dense[:, :limit] - expected).abs().max().item()
    if device.type == "cpu":
        script = os.path.abspath(__file__)
        common = ["--queries", str(args.queries), "--gallery", str(args.gallery), "--layers", str(args.layers),
                  "--height", str(args.height), "--width", str(args.width), "--d-model", str(args.d_model),
                  "--dim-feedforward", str(args.dim_feedforward)]
        if args.reference_pairs:
            common += ["--reference-pairs", str(args.reference_pairs)]
        m_ours = benchmarking.cpu_peak_in_child([script, "--child", "ours", *common], timeout=3600)
        m_ref = benchmarking.cpu_peak_in_child([script, "--child", "upstream", *common], timeout=3600)
    market_pairs = MARKET[0] * MARKET[1]
    result = {
        "config": {"queries": args.queries, "gallery": args.gallery, "layers": args.layers,
                   "locations": locations, "d_model": args.d_model, "dim_feedforward": args.dim_feedforward,
                   "topk": args.topk, "ours_dtype": "bfloat16" if device.type == "cuda" else "float32",
                   "upstream_dtype": "float32", "upstream_batches": [UPSTREAM_PROBE_BATCH, UPSTREAM_GALLERY_BATCH]},
        "environment": benchmarking.environment(device),
        "flops": flops,
        "ours": {"seconds": t_ours, "tflops": flops / t_ours / 1e12, "peak_bytes": m_ours,
                 "topk_seconds": t_topk, "topk_peak_bytes": m_topk,
                 "market_seconds_extrapolated": t_ours * market_pairs / pairs},
        "upstream": {"seconds": t_ref_full, "measured_gallery": limit, "scaled": limit < args.gallery,
                     "peak_bytes": m_ref, "market_seconds_extrapolated": t_ref_full * market_pairs / pairs},
        "speedup": t_ref_full / t_ours,
        "max_abs_distance_difference": agreement,
        "full_market_size": (args.queries, args.gallery) == MARKET,
    }
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:,.0f} MiB"  # noqa: E731
    print(f"{args.queries} x {args.gallery} pairs on {device} ({flops / 1e12:.2f} TFLOP):")
    print(f"  ours      {t_ours:8.2f} s  {flops / t_ours / 1e12:6.3f} TFLOP/s  peak {mib(m_ours)}  "
          f"(top-{args.topk}: {t_topk:.2f} s)")
    print(f"  upstream  {t_ref_full:8.2f} s{' (scaled from ' + str(limit) + ' gallery)' if limit < args.gallery else ''}"
          f"  peak {mib(m_ref)}")
    print(f"  speed-up {result['speedup']:.1f}x; max |distance difference| {agreement:.1e}")
    if not result["full_market_size"]:
        print(f"  Market-1501 ({MARKET[0]} x {MARKET[1]}) extrapolated: ours "
              f"{result['ours']['market_seconds_extrapolated'] / 60:.1f} min, upstream "
              f"{result['upstream']['market_seconds_extrapolated'] / 60:.1f} min")
    name = "bench_eval" if device.type == "cpu" else f"bench_eval_{torch.cuda.get_device_name().replace(' ', '_')}"
    benchmarking.write_result(result, args.out, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
