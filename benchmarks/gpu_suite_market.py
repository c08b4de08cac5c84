"""GPU suite, whole workloads: a Market-1501-size evaluation for every backend's best candidate,
and the TransReID benchmark.

market_eval: 3,368 query x 15,913 gallery feature maps (L 192, D 512, 3 decoder layers, random
features: the matching cost does not depend on their values) through ``engine.matching.match``
(bf16 autocast), once per backend with the launch table that names its fastest correct launch
in the sweep; the distances of the backends are compared with each other, and upstream's
materialised evaluation runs on one 128 x 256 chunk, scaled by the pair count.
"""

from __future__ import annotations

import sys
import time

import gpu_suite_common as common
from gpu_suite_common import REPO, sync

MARKET = (3368, 15913)
LAYERS, HEIGHT, WIDTH, D_MODEL, FEEDFORWARD = 3, 24, 8, 512, 2048


def backend_tables(table: dict | None, sweep: dict | None, backends) -> dict:
    """Per backend: a launch table naming it for every class, with its fastest correct launch
    of each class in the sweep (the built-in default where the sweep has none)."""
    from gpu_suite_variants import best_by_backend

    tables = {}
    for backend in backends:
        classes = {}
        for cls, entry in ((sweep or {}).get("classes") or {}).items():
            best = best_by_backend(entry).get(backend)
            chosen = {"backend": backend}
            if best is not None:
                chosen[backend] = (dict(best["config"]) if backend == "triton" else
                                   dict(best.get("cuda") or {"query_group": best["query_group"]}))
            classes[cls] = chosen
        tables[backend] = {"format": (table or {}).get("format", 1), "device": None,
                           "source": "gpu_suite: this backend's best launches", "classes": classes}
    return tables


def warm_up(matcher, counts=(16, 17, 256, 257), dtype=None) -> None:
    """The op on every kind of block the evaluation can send it, so no compilation lands in
    the timed call: image counts a multiple of 16 or not (Triton specialises on it), small and
    large launch-table classes (LARGE_PAIRS), bf16 with the gate, as match runs it."""
    import torch

    import transmatcher_fast

    dtype = dtype or torch.bfloat16
    locations = HEIGHT * WIDTH
    embed = torch.randn(locations, locations, device=common.DEVICE)
    with torch.no_grad():
        for nq in counts:
            for ng in counts:
                q = torch.randn(nq, locations, D_MODEL, device=common.DEVICE, dtype=dtype)
                g = torch.randn(ng, locations, D_MODEL, device=common.DEVICE, dtype=dtype)
                transmatcher_fast.max_sim(q, g, embed)


def market_eval(backends, tables: dict, log, remaining, ceilings: dict | None = None,
                sizes=MARKET, reference_chunk=(128, 256), amp="bfloat16",
                warm_counts=(16, 17, 256, 257), rates: dict | None = None) -> dict:
    """``amp``: the autocast dtype of match (None: float32, the tests on the interpreter).
    ``rates``: TFLOP/s per backend measured by the sweep (large-bf16): a backend runs only when
    its expected time (at that rate, else the plan's assumed one) is left."""
    import torch

    import transmatcher_fast
    from transmatcher_fast import TransMatcher, reference
    from transmatcher_fast.engine import matching
    from transmatcher_fast.ops import tuning

    from gpu_suite_plan import COSTS

    num_q, num_g = sizes
    locations = HEIGHT * WIDTH
    work = 2.0 * num_q * num_g * locations * locations * D_MODEL * LAYERS
    torch.manual_seed(0)
    matcher = TransMatcher(locations, D_MODEL, LAYERS, FEEDFORWARD).to(common.DEVICE).eval()
    shape = (HEIGHT, WIDTH, LAYERS * D_MODEL)
    query = torch.randn(num_q, *shape, device=common.DEVICE)
    gallery = torch.randn(num_g, *shape, device=common.DEVICE)
    result = {"queries": num_q, "gallery": num_g, "layers": LAYERS, "locations": locations,
              "d_model": D_MODEL, "flops": work, "amp": amp, "backends": {}}
    amp_dtype = getattr(torch, amp) if amp else None
    distances = {}
    for backend in backends:
        record = result["backends"][backend] = {"launch_table": tables.get(backend)}
        rate = (rates or {}).get(backend) or COSTS["assumed_tflops"]
        each_s = work / (rate * 1e12) + 5  # + warm-up and projections
        record["expected_s"] = round(each_s, 1)
        if remaining() < each_s:
            record["skipped"] = f"deadline: {remaining():.0f} s left, estimated {each_s:.0f} s"
            continue

        def run():
            with transmatcher_fast.use_backend(backend), tuning.use_table(tables[backend]):
                warm_up(matcher, warm_counts, amp_dtype or torch.float32)
                matching.match(matcher, query[:2], gallery[:2], amp=amp_dtype)  # projections, handles
                sync()
                start = time.perf_counter()
                dist = matching.match(matcher, query, gallery, amp=amp_dtype)
                sync()
                return dist, time.perf_counter() - start
        got = common.attempt(record, log, f"market {backend}", run)
        if got is None:
            continue
        distances[backend], seconds = got
        record.update(ok=True, seconds=seconds, tflops=work / seconds / 1e12)
        for key, label in (("gemm_bf16_8192_tflops", "fraction_of_gemm_8192"),):
            if ceilings and ceilings.get(key):
                record[label] = record["tflops"] / ceilings[key]
        log(f"market {backend}: {seconds:.2f} s, {record['tflops']:.0f} TFLOP/s")
    if len(distances) == 2:
        a, b = distances.values()
        result["max_abs_distance_difference_between_backends"] = (a - b).abs().max().item()
    # Upstream on one chunk (float32, materialised), scaled by the pair count.
    pq, pg = reference_chunk
    record = result["upstream_chunk"] = {"queries": pq, "gallery": pg}

    def upstream():
        with torch.no_grad():
            reference.transmatcher_scores(matcher, query[:pq], gallery[:pg])  # warm-up
            sync()
            start = time.perf_counter()
            score = reference.transmatcher_scores(matcher, query[:pq], gallery[:pg])
            sync()
            return score, time.perf_counter() - start
    got = common.attempt(record, log, "market upstream chunk", upstream)
    if got is not None:
        score, seconds = got
        record.update(ok=True, seconds=seconds,
                      market_seconds_scaled=seconds * num_q * num_g / (pq * pg))
        if distances:
            ours = next(iter(distances.values()))[:pq, :pg].float()
            theirs = matching.score_to_distance(score).float().cpu()
            record["max_abs_distance_difference_vs_ours"] = (ours - theirs).abs().max().item()
        for backend, entry in result["backends"].items():
            if entry.get("seconds"):
                entry["speedup_vs_upstream"] = record["market_seconds_scaled"] / entry["seconds"]
    del query, gallery, matcher
    common.empty_cache()
    return result


def bench_transreid_gpu(out, log, timeout: float, env=None) -> dict:
    """benchmarks/bench_transreid.py on the GPU: ViT-B/16 training step (batch 64, 256x128,
    strides 16 and 12, JPM + SIE, fp16 AMP as upstream trains) and feature extraction, ours
    against upstream's explicit-attention, sequential-JPM computation."""
    folder = out / "transreid"
    folder.mkdir(exist_ok=True)
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_transreid.py"), "--device", "cuda",
           "--arch", "vit_base_patch16", "--batch", "64", "--amp", "fp16", "--out", str(folder)]
    record = common.run(cmd, timeout, log, env=env, tail=3000)
    record["summary"] = record.get("output_tail", "").strip().splitlines()[-8:]
    return record
