"""Evaluating TransReID-style embeddings at MSMT17 size on the CPU: our engine (bounded memory,
top-k) against upstream TransReID's full-matrix evaluation.

    python benchmarks/bench_embedding_eval.py           # 11,659 x 82,161; D = 768, then 3840 if time allows
    python benchmarks/bench_embedding_eval.py --quick   # tiny sizes in seconds (what the test runs)

- ours: ``engine.evaluate.evaluate_features(EmbeddingDistance(), query, gallery, topk=k)``:
  probe x gallery blocks sized from free memory, only the k (+ same-id-same-camera margin)
  nearest gallery items kept per query; CMC exact up to rank k, mAP becomes AP@k.
- upstream (TransReID ``utils/metrics.py``, ``R1_mAP_eval``): L2-normalise, squared Euclidean
  distances by torch ``addmm`` on the CPU, ``.numpy()`` -> a float32 (nq, ng) matrix, ``np.argsort``
  over all of it, the int32 match matrix, then ``eval_func``'s per-query CMC / AP loop. It needs
  ``nq * ng * 21`` bytes at its peak (float32 distances 4 + int64 argsort 8 + the int64
  ``g_pids[indices]`` 8 and its bool comparison 1, while the int32 match matrix 4 is made), so it
  runs here on as many queries as fit in ``--baseline-gb`` against the full gallery; its full-size
  memory is given analytically and its full-size time extrapolated linearly in queries.

Features are random ``a * centre[pid] + noise`` (a^2 = 3 / sqrt(D)), float32, so that the metrics
are neither 0 nor 1; the cost does not depend on their values. pids: ``--ids`` identities drawn
uniformly for gallery and query images; cameras uniform over ``--cams``.

Memory: the peak resident set (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the kernel's RSS
high-water mark) of a fresh child process per measurement, and the same read right after the
imports and right after the features were made (made in row blocks, so that point is the
features' own footprint): ``peak_minus_features`` = peak - the features' float32 bytes,
``extra`` = peak - RSS with the features, i.e. what the evaluation itself needed.
Every measurement runs ``--repeat`` times in interleaved rounds and the fastest is reported (the
machine is shared: the others were slowed by whatever else ran), with all times and the load.
Writes results/bench_embedding_eval_cpu.json (``--quick``: ..._cpu_quick.json) and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
MSMT17 = (11659, 82161)  # query, gallery images (MSMT17 V1 test split)
BASELINE_BYTES_PER_PAIR = 4 + 8 + 8 + 1  # upstream's peak per query x gallery pair, see above
PERSISTENT_BYTES_PER_PAIR = 4 + 8 + 4  # distances + argsort + int32 matches (§6.2's >15 GB)
MIB = 1 << 20


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=MSMT17[0])
    parser.add_argument("--gallery", type=int, default=MSMT17[1])
    parser.add_argument("--dims", default="768,3840",
                        help="embedding sizes in order (768: ViT-B global; 3840: with JPM); a later one "
                             "runs only if the time budget allows it")
    parser.add_argument("--ids", type=int, default=1041)
    parser.add_argument("--cams", type=int, default=15)
    parser.add_argument("--topk", type=int, default=100)
    parser.add_argument("--baseline-gb", type=float, default=7.0,
                        help="memory the upstream baseline may take (it runs on as many queries as fit)")
    parser.add_argument("--time-budget", type=float, default=540.0,
                        help="seconds for the whole run: a later dimension runs without the upstream "
                             "baseline, or not at all, when it would not fit")
    parser.add_argument("--repeat", type=int, default=2,
                        help="interleaved rounds of every measurement (the fastest is reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (200 x 1,500, D = 32, k = 20)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--child", choices=("ours", "upstream"), help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    if parser.parse_args(argv).quick:  # tiny defaults; what is given explicitly still wins
        parser.set_defaults(queries=200, gallery=1500, dims="32", ids=50, topk=20, repeat=1)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- data

def make_features(num_query: int, num_gallery: int, dim: int, ids: int, cams: int, seed: int):
    """Query and gallery ``Features`` (float32 ``[n, dim]``, int64 pids and cameras)."""
    from transmatcher_fast.engine.features import Features

    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(ids, dim, generator=gen)
    amplitude = (3.0 / dim ** 0.5) ** 0.5

    def one(n):
        pids = torch.randint(ids, (n,), generator=gen)
        cams_ = torch.randint(cams, (n,), generator=gen)
        x = torch.empty(n, dim)
        for start in range(0, n, 8192):  # row blocks: no transient copy of the whole set
            stop = min(start + 8192, n)
            x[start:stop] = torch.randn(stop - start, dim, generator=gen).add_(centres[pids[start:stop]],
                                                                               alpha=amplitude)
        return Features(x, pids, cams_)

    return one(num_query), one(num_gallery)


# ----------------------------------------------------------------------------- upstream

def upstream_euclidean_distance(qf: torch.Tensor, gf: torch.Tensor) -> np.ndarray:
    """TransReID ``utils/metrics.py`` ``euclidean_distance``: float32 ``[m, n]`` numpy matrix
    (``addmm_(1, -2, ...)`` in the current keyword form)."""
    m, n = qf.shape[0], gf.shape[0]
    dist_mat = torch.pow(qf, 2).sum(dim=1, keepdim=True).expand(m, n) + \
        torch.pow(gf, 2).sum(dim=1, keepdim=True).expand(n, m).t()
    dist_mat.addmm_(qf, gf.t(), beta=1, alpha=-2)
    return dist_mat.cpu().numpy()


def upstream_eval_func(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """TransReID ``utils/metrics.py`` ``eval_func`` (Market protocol), as it is."""
    num_q, num_g = distmat.shape
    if num_g < max_rank:
        max_rank = num_g
    indices = np.argsort(distmat, axis=1)
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_AP, num_valid_q = [], [], 0.
    for q_idx in range(num_q):
        q_pid, q_camid = q_pids[q_idx], q_camids[q_idx]
        order = indices[q_idx]
        remove = (g_pids[order] == q_pid) & (g_camids[order] == q_camid)
        keep = np.invert(remove)
        orig_cmc = matches[q_idx][keep]
        if not np.any(orig_cmc):
            continue
        cmc = orig_cmc.cumsum()
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        num_valid_q += 1.
        num_rel = orig_cmc.sum()
        tmp_cmc = orig_cmc.cumsum()
        y = np.arange(1, tmp_cmc.shape[0] + 1) * 1.0
        tmp_cmc = tmp_cmc / y
        tmp_cmc = np.asarray(tmp_cmc) * orig_cmc
        all_AP.append(tmp_cmc.sum() / num_rel)
    assert num_valid_q > 0, "Error: all query identities do not appear in gallery"
    all_cmc = np.asarray(all_cmc).astype(np.float32)
    all_cmc = all_cmc.sum(0) / num_valid_q
    return all_cmc, float(np.mean(all_AP)), int(num_valid_q)


# ----------------------------------------------------------------------------- children

def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args) -> None:
    """One measurement in this fresh process; prints one JSON line."""
    from transmatcher_fast.engine.evaluate import evaluate_features
    from transmatcher_fast.models import memory
    from transmatcher_fast.models.embedding import EmbeddingDistance

    rss_start = _rss_mb()
    q, g = make_features(args.queries, args.gallery, args.dim, args.ids, args.cams, args.seed)
    features_mb = (q.features.numel() + g.features.numel()) * 4 / MIB
    rss_features = _rss_mb()
    start = time.perf_counter()
    if args.child == "ours":
        comparer = EmbeddingDistance()
        # What match() will pick for its default 256-probe blocks (free memory changes a little).
        chunk = memory.gallery_chunk(min(256, args.queries), args.gallery, comparer.bytes_per_pair(),
                                     torch.device("cpu"))
        m = evaluate_features(comparer, q, g, topk=args.topk, progress=False).metrics
        cmc, mAP, valid, extra = m["cmc"], m["mAP"], m["num_queries"], {"gallery_chunk": chunk}
    else:
        qf, gf = F.normalize(q.features, dim=1, p=2), F.normalize(g.features, dim=1, p=2)
        distmat = upstream_euclidean_distance(qf, gf)
        cmc, mAP, valid = upstream_eval_func(distmat, q.pids.numpy(), g.pids.numpy(), q.cams.numpy(),
                                             g.cams.numpy())
        cmc, extra = [float(c) for c in cmc], {}
    seconds = time.perf_counter() - start
    peak = _rss_mb()
    print(json.dumps({
        "method": args.child, "dim": args.dim, "queries": args.queries, "gallery": args.gallery,
        "seconds": seconds, "peak_rss_mb": peak, "rss_start_mb": rss_start,
        "rss_with_features_mb": rss_features, "features_mb": features_mb,
        "peak_minus_features_mb": peak - features_mb, "extra_mb": peak - rss_features,
        "rank1": cmc[0], "rank5": cmc[4], "rank10": cmc[9], "cmc": cmc, "mAP": mAP,
        "mAP_kind": f"AP@{args.topk}" if args.child == "ours" else "AP (full ranking)",
        "num_valid_queries": valid, **extra}))


def run_child(args, method: str, queries: int, dim: int) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--child", method, "--queries", str(queries),
            "--gallery", str(args.gallery), "--dim", str(dim), "--ids", str(args.ids), "--cams",
            str(args.cams), "--topk", str(args.topk), "--seed", str(args.seed)]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)  # stderr shown below
    if out.returncode != 0:
        raise RuntimeError(f"{method} D={dim} nq={queries} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {method:9s} D={dim:<5d} {queries:>6d} x {args.gallery}: {row['seconds']:8.2f} s, "
          f"peak RSS {row['peak_rss_mb']:8.0f} MB (features {row['features_mb']:.0f} MB, "
          f"evaluation {row['extra_mb']:.0f} MB), R1 {row['rank1']:.4f}, {row['mAP_kind']} {row['mAP']:.4f}",
          flush=True)
    return row


# ----------------------------------------------------------------------------- parent

def merge_rounds(rows: list) -> dict:
    """One row from repeated runs of a measurement: the fastest time (the others were slowed by
    whatever else ran on the machine), all times, and the largest peaks."""
    out = dict(rows[0])
    out["seconds_all"] = [r["seconds"] for r in rows]
    out["seconds"] = min(out["seconds_all"])
    for key in ("peak_rss_mb", "extra_mb", "peak_minus_features_mb"):
        out[key] = max(r[key] for r in rows)
    return out


def baseline_queries(args, dim: int) -> int:
    """Queries the upstream baseline can take against the full gallery within --baseline-gb:
    its per-pair peak plus the features and their normalised copies, and ~0.5 GB of runtime."""
    budget = args.baseline_gb * 1e9 - 0.5e9 - 2 * args.gallery * dim * 4
    per_query = args.gallery * BASELINE_BYTES_PER_PAIR + 2 * dim * 4
    n = int(budget // per_query)
    n = n - n % 100 if n > 1000 else n
    return max(1, min(args.queries, n))


def analytic_baseline(args, dim: int) -> dict:
    pairs = args.queries * args.gallery
    features = 2 * (args.queries + args.gallery) * dim * 4  # the features and their normalised copy
    return {"queries": args.queries, "gallery": args.gallery, "dim": dim,
            "distance_gb": pairs * 4 / 1e9, "argsort_gb": pairs * 8 / 1e9, "matches_gb": pairs * 4 / 1e9,
            "persistent_gb": pairs * PERSISTENT_BYTES_PER_PAIR / 1e9,
            "peak_gb": (pairs * BASELINE_BYTES_PER_PAIR + features) / 1e9}


def summarise(dim, ours_full, ours_same, upstream, analytic, full_queries) -> dict:
    """One dimension's figures; ``upstream`` None where only ours ran (time budget)."""
    out = {"dim": dim, "ours_seconds_full": ours_full["seconds"],
           "ours_peak_rss_mb_full": ours_full["peak_rss_mb"], "ours_extra_mb_full": ours_full["extra_mb"],
           "ours_peak_minus_features_mb_full": ours_full["peak_minus_features_mb"],
           "upstream_peak_gb_full_analytic": analytic["peak_gb"], "upstream_measured": upstream is not None}
    if upstream is None:
        return out
    k = len(ours_same["cmc"])  # min(50, topk): the ranks the top-k lists measure exactly
    return {**out,
            "same_size_queries": upstream["queries"],
            "speedup_same_size": upstream["seconds"] / ours_same["seconds"],
            # Upstream's cost is linear in the queries (GEMM rows, argsort rows, the loop).
            "upstream_seconds_full_extrapolated": upstream["seconds"] * full_queries / upstream["queries"],
            "upstream_extra_mb_measured": upstream["extra_mb"],
            # Its per-pair peak plus the normalised copies of the features: the model behind peak_gb.
            "upstream_extra_mb_predicted": (upstream["queries"] * upstream["gallery"] * BASELINE_BYTES_PER_PAIR
                                            + upstream["features_mb"] * MIB) / MIB,
            # Top-k CMC is exact up to k: the same random data must give upstream's CMC.
            "cmc_equal_to_upstream_up_to_k": bool(np.allclose(ours_same["cmc"], upstream["cmc"][:k],
                                                              atol=1e-6)),
            "num_valid_queries_equal": ours_same["num_valid_queries"] == upstream["num_valid_queries"]}


def plot(result: dict, path: str) -> None:
    from transmatcher_fast import benchmarking

    plt = benchmarking.pyplot()
    if plt is None:
        return
    nq, ng = result["sizes"]["queries"], result["sizes"]["gallery"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    width, labelled = 0.2, set()
    for i, s in enumerate(result["summary"]):
        rows = {(r["method"], r["queries"]): r for r in result["rows"] if r["dim"] == s["dim"]}
        ours = rows[("ours", nq)]
        bars_t = [("ours top-k, full size", ours["seconds"], "tab:blue", "")]
        bars_m = [("ours top-k, full size", ours["peak_rss_mb"] / 1024, "tab:blue", "")]
        if s["upstream_measured"]:
            nb = s["same_size_queries"]
            same, up = rows[("ours", nb)], rows[("upstream", nb)]
            bars_t += [(f"ours top-k, {nb} queries", same["seconds"], "tab:cyan", ""),
                       (f"upstream, {nb} queries", up["seconds"], "tab:red", ""),
                       ("upstream, full size (extrapolated)", s["upstream_seconds_full_extrapolated"],
                        "tab:red", "//")]
            bars_m += [(f"ours top-k, {nb} queries", same["peak_rss_mb"] / 1024, "tab:cyan", ""),
                       (f"upstream, {nb} queries", up["peak_rss_mb"] / 1024, "tab:red", "")]
        bars_m.append(("upstream, full size (analytic: features + arrays)",
                       s["upstream_peak_gb_full_analytic"] * 1e9 / 2**30, "tab:red", "//"))
        for ax, bars in ((ax_t, bars_t), (ax_m, bars_m)):
            for j, (label, value, color, hatch) in enumerate(bars):
                x = i + (j - (len(bars) - 1) / 2) * width
                key = (ax is ax_t, color, hatch)  # one legend entry per kind of bar
                ax.bar(x, value, width, color=color, hatch=hatch, edgecolor="black", alpha=0.85,
                       label=None if key in labelled else label)
                labelled.add(key)
                ax.text(x, value, f"{value:.0f}" if value >= 10 else f"{value:.1f}", ha="center",
                        va="bottom", fontsize=7)
    labels = [f"D = {s['dim']}" for s in result["summary"]]
    for ax, title in ((ax_t, "evaluation time (s)"), (ax_m, "peak RSS (GiB)")):
        ax.set_xticks(range(len(labels)), labels)
        ax.set_title(title)
        ax.legend(fontsize=7)
    env = result["environment"]
    fig.suptitle(f"Embedding evaluation at MSMT17 size ({nq:,} x {ng:,}), CPU, {env['threads']} threads: "
                 f"ours (top-{result['topk']}) vs upstream TransReID (full matrix)", fontsize=10)
    fig.tight_layout()
    benchmarking.save_figure(fig, path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    import transmatcher_fast
    from transmatcher_fast import benchmarking

    dims = [int(d) for d in args.dims.split(",") if d.strip()]
    name = "bench_embedding_eval_cpu" + ("_quick" if args.quick else "")
    result = {
        "benchmark": "bench_embedding_eval", "device": "cpu",
        "environment": {**benchmarking.environment(torch.device("cpu")), "numpy": np.__version__,
                        "transmatcher_fast": getattr(transmatcher_fast, "__version__", None),
                        "load_average_start": os.getloadavg()},
        "sizes": {"queries": args.queries, "gallery": args.gallery, "ids": args.ids, "cams": args.cams},
        "topk": args.topk, "seed": args.seed, "quick": args.quick, "baseline_gb": args.baseline_gb,
        "memory_measure": "resource.getrusage(RUSAGE_SELF).ru_maxrss of a fresh child process per row "
                          "(peak RSS); extra_mb = peak - RSS right after the features were made; "
                          "peak_minus_features_mb = peak - the float32 features' bytes",
        "features": "float32 a*centre[pid] + N(0,1) noise, a^2 = 3/sqrt(D); values do not affect cost",
        "upstream": "TransReID utils/metrics.py: normalise, torch addmm squared Euclidean on the CPU, "
                    "numpy (nq, ng) float32, np.argsort over all of it, int32 match matrix, eval_func loop",
        "dims_requested": dims, "dims_run": {}, "dims_skipped": {}, "rows": [], "summary": [],
        "upstream_full_size_analytic": {},
    }
    started = time.perf_counter()
    first = None  # (D, seconds of one round of its ours-full run, of one round of all its runs)
    for dim in dims:
        plan, repeat = "ours and upstream", args.repeat
        if first is not None:
            # Cost grows at most linearly in D (the GEMM; sorting and ranking do not grow), so the
            # first dimension's times scaled by D bound it: the fullest plan that fits runs.
            elapsed, ratio = time.perf_counter() - started, dim / first[0]
            plans = [("ours and upstream", args.repeat, first[2]), ("ours only", args.repeat, first[1]),
                     ("ours only", 1, first[1])]
            fits = [(p, r) for p, r, per_round in plans if elapsed + per_round * r * ratio <= args.time_budget]
            if not fits:
                why = (f"ours alone estimated at {first[1] * ratio:.0f} s after {elapsed:.0f} s: over "
                       f"--time-budget {args.time_budget:g} s")
                result["dims_skipped"][str(dim)] = why
                print(f"D={dim} skipped: {why}")
                continue
            plan, repeat = fits[0]
        nb = baseline_queries(args, dim)
        print(f"D={dim}: ours on {args.queries} x {args.gallery}"
              + (f"; ours and upstream on {nb} x {args.gallery}" if plan != "ours only" else
                 " (upstream skipped: time budget)") + f"; {repeat} round(s)", flush=True)
        specs = [("ours", args.queries)]
        if plan != "ours only":
            specs += ([("ours", nb)] if nb != args.queries else []) + [("upstream", nb)]
        runs, spent = {spec: [] for spec in specs}, dict.fromkeys(specs, 0.0)
        for _ in range(repeat):  # interleaved rounds: every measurement sees the same machine load
            for spec in specs:
                start = time.perf_counter()
                runs[spec].append(run_child(args, spec[0], spec[1], dim))
                spent[spec] += time.perf_counter() - start
        rows = {spec: merge_rounds(r) for spec, r in runs.items()}
        ours_full = rows[("ours", args.queries)]
        ours_same, upstream = rows.get(("ours", nb), ours_full), rows.get(("upstream", nb))
        if first is None:
            first = (dim, spent[("ours", args.queries)] / repeat, sum(spent.values()) / repeat)
        analytic = analytic_baseline(args, dim)
        result["rows"] += list(rows.values())
        result["upstream_full_size_analytic"][str(dim)] = analytic
        result["summary"].append(summarise(dim, ours_full, ours_same if upstream else None, upstream,
                                           analytic, args.queries))
        result["dims_run"][str(dim)] = {"plan": plan, "rounds": repeat}
        result["total_seconds"] = time.perf_counter() - started
        result["environment"]["load_average_end"] = os.getloadavg()
        benchmarking.write_result(result, args.out, name)  # saved after every dimension
    if result["dims_skipped"]:
        benchmarking.write_result(result, args.out, name)
    for s in result["summary"]:
        line = (f"D={s['dim']}: ours {s['ours_seconds_full']:.1f} s, {s['ours_peak_rss_mb_full']:.0f} MB "
                f"peak RSS at full size; upstream needs {s['upstream_peak_gb_full_analytic']:.1f} GB there "
                "(analytic)")
        if s["upstream_measured"]:
            line += (f", ~{s['upstream_seconds_full_extrapolated']:.0f} s (extrapolated); at "
                     f"{s['same_size_queries']} queries ours is {s['speedup_same_size']:.1f}x as fast; "
                     f"CMC equal up to k: {s['cmc_equal_to_upstream_up_to_k']}")
        print(line)
    if not args.no_plot and result["summary"]:
        plot(result, os.path.join(args.out, name + ".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
