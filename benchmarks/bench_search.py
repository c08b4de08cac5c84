"""``transmatcher-fast search`` / ``tmf.ReID.rank`` on the CPU: a cold search (the gallery's
features extracted into a new index) and a warm one (the same gallery, the index reused).

    python benchmarks/bench_search.py                       # galleries of 2,000 and 20,000 images
    python benchmarks/bench_search.py --sizes 200 --quick   # seconds (what the test runs)

Synthetic galleries of small JPEG images (64 x 32, coloured blocks; any file names) are written
once into ``--cache`` (default build/bench_search/) with the two tiny checkpoints, each trained
for one step on a synthetic person set: TransReID-tiny (``vit_tiny_patch16``, an embedding method)
and TransMatcher-tiny (ResNet-18 to layer3, a 16-channel neck, 2 decoder layers: a fused matcher).

Every search runs in a fresh child process: ``ReID.load``, then the steps of ``ReID.rank(queries,
folder, index=DIR)`` timed one by one (``ReID.index``: the gallery's files checked and extracted,
cold, or their sizes and times compared with the index, warm; the ``--queries`` query images'
features; ``stream_topk`` over the index's shards). Reported: images/s of extraction (gallery
images / the cold gallery step, image decoding and the up-front readability check included),
queries/s of ranking with the warm index, and the child's peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``; also read just before the search, after imports,
loading and the first call: ``peak_rss_before_search_mb``). The search time is the sum of the three steps,
after the model is loaded and called once on two blank images (interpreter start, imports,
loading and that first call's set-up are reported apart: they are the same for both). The warm search must extract nothing: its extracted count is recorded and checked.
Writes results/bench_search.json and bench_search.png (matplotlib, when installed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HEIGHT, WIDTH = 64, 32
TRAIN = ["-d", "market1501", "--height", str(HEIGHT), "--width", str(WIDTH), "-b", "8", "--num-instances", "4",
         "-j", "0", "--no-progress", "--no-tensorboard", "--log-every", "1", "--epochs", "1",
         "--max-steps-per-epoch", "1", "--overwrite"]
METHODS = {
    "transreid-tiny": ["--method", "transreid", "-a", "vit_tiny_patch16", "--lr", "0.01", "--warmup-epochs", "1"],
    "transmatcher-tiny": ["--method", "transmatcher", "-a", "resnet18", "--ibn", "none", "--neck", "16",
                          "--num-trans-layers", "2", "--dim-feedforward", "32", "--no-freeze-bn"],
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,20000", help="gallery sizes, comma-separated")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each search (the machine is shared)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cache", default=os.path.join(ROOT, "build", "bench_search"))
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--quick", action="store_true", help="write bench_search_quick.json (a smoke run)")
    parser.add_argument("--no-plot", action="store_true")
    # Child mode: one search, one JSON line.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--gallery", help=argparse.SUPPRESS)
    parser.add_argument("--index", help=argparse.SUPPRESS)
    parser.add_argument("--query-dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- data

def write_images(folder: str, count: int, seed: int) -> str:
    """``count`` small JPEGs of random coloured blocks under ``folder`` (1,000 per sub-folder),
    written once: a folder holding a ``done`` marker is reused."""
    from PIL import Image, ImageDraw

    if os.path.exists(os.path.join(folder, "done")):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = random.Random(seed)
    for n in range(count):
        sub = os.path.join(folder, f"part{n // 1000:03d}")
        os.makedirs(sub, exist_ok=True)
        image = Image.new("RGB", (WIDTH, HEIGHT), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = rng.randrange(WIDTH), rng.randrange(HEIGHT)
            draw.rectangle([x, y, x + rng.randrange(4, 16), y + rng.randrange(8, 32)],
                           fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(os.path.join(sub, f"photo {seed}-{n:06d}.jpg"), quality=90)
    open(os.path.join(folder, "done"), "w").close()
    return folder


def checkpoint_of(cache: str, name: str) -> str:
    """The tiny checkpoint of ``name``, trained for one step on a synthetic set the first time."""
    path = os.path.join(cache, "checkpoints", name, "checkpoint.pt")
    if os.path.isfile(path):
        return path
    from transmatcher_fast import cli
    from transmatcher_fast.data import generate_synthetic

    data = os.path.join(cache, "train_data")
    if not os.path.isdir(os.path.join(data, "market1501")):
        generate_synthetic(os.path.join(data, "market1501"), ids=8, cams=2, images_per_cam=3, seed=1,
                           height=HEIGHT, width=WIDTH)
    exp = os.path.dirname(path)
    assert cli.main(["train", *TRAIN, *METHODS[name], "--data-dir", data, "--exp-dir", exp]) == 0
    return path


# ----------------------------------------------------------------------------- child

def child(args) -> None:
    start = time.perf_counter()
    import torch

    from transmatcher_fast import ReID
    from transmatcher_fast.engine import search

    torch.set_num_threads(args.threads)
    imported = time.perf_counter()
    reid = ReID.load(args.checkpoint, device="cpu", batch_size=args.batch_size, workers=0)
    loaded = time.perf_counter()
    # What every process pays on its first call of the model and the matcher (kernel set-up), so
    # that the timed steps measure the work itself.
    one = reid.extract(torch.zeros(2, 3, reid.height, reid.width), desc="warm-up").features
    search.stream_topk(reid.matcher, one, [(one, torch.arange(2))], 1, amp=reid.amp)
    warmed = time.perf_counter()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # The steps of ReID.rank(queries, folder, index=DIR), timed one by one.
    begin = time.perf_counter()
    index, update = reid.index(args.gallery, args.index)
    indexed = time.perf_counter()
    queries = reid.extract(args.query_dir, desc="query")
    extracted = time.perf_counter()
    best = search.stream_topk(reid.matcher, queries.features, index.shards(), min(args.topk, len(index)),
                              amp=reid.amp)
    ranked = time.perf_counter()
    print(json.dumps({
        "search_seconds": ranked - begin, "gallery_seconds": indexed - begin,
        "query_seconds": extracted - indexed, "ranking_seconds": ranked - extracted,
        "import_seconds": imported - start, "load_seconds": loaded - imported, "warmup_seconds": warmed - loaded,
        "extracted": update.extracted, "reused": update.reused, "queries": len(queries),
        "gallery": len(index), "topk": int(best.index.shape[1]),
        "peak_rss_before_search_mb": rss_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_child(args, checkpoint: str, gallery: str, index: str, queries: str) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--child", "--checkpoint", checkpoint, "--gallery", gallery,
            "--index", index, "--query-dir", queries, "--topk", str(args.topk), "--threads", str(args.threads),
            "--batch-size", str(args.batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": ROOT + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"search failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- parent

def plot(result: dict, path: str) -> None:
    from transmatcher_fast import benchmarking

    plt = benchmarking.pyplot()
    if plt is None:
        return
    rows = result["rows"]
    labels = [f"{r['method']}\n{r['gallery']:,} images" for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.6))
    xs = range(len(rows))
    width = 0.38
    cold = [r["cold"]["search_seconds"] for r in rows]
    warm = [r["warm"]["search_seconds"] for r in rows]
    ax_t.bar([x - width / 2 for x in xs], cold, width, label="cold (extract into a new index)", color="tab:red")
    ax_t.bar([x + width / 2 for x in xs], warm, width, label="warm (index reused)", color="tab:blue")
    for x, c, w in zip(xs, cold, warm):
        ax_t.text(x - width / 2, c, f"{c:.1f}", ha="center", va="bottom", fontsize=7)
        ax_t.text(x + width / 2, w, f"{w:.2f}", ha="center", va="bottom", fontsize=7)
    ax_t.set_yscale("log")
    ax_t.set_title(f"search time of {result['queries']} queries (s, log scale)")
    ax_m.bar([x - width / 2 for x in xs], [r["cold"]["peak_rss_mb"] for r in rows], width, color="tab:red",
             label="cold")
    ax_m.bar([x + width / 2 for x in xs], [r["warm"]["peak_rss_mb"] for r in rows], width, color="tab:blue",
             label="warm")
    ax_m.set_title("peak RSS of the search process (MB)")
    for ax in (ax_t, ax_m):
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.legend(fontsize=7)
    env = result["environment"]
    fig.suptitle(f"transmatcher-fast search on the CPU ({env['cpu']}, {result['threads']} threads), "
                 f"{HEIGHT}x{WIDTH} images, top-{result['topk']}", fontsize=9)
    fig.tight_layout()
    benchmarking.save_figure(fig, path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    sys.path.insert(0, ROOT)
    import torch

    from transmatcher_fast import benchmarking

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    methods = [m for m in args.methods.split(",") if m.strip()]
    os.makedirs(args.cache, exist_ok=True)
    queries = write_images(os.path.join(args.cache, f"queries_{args.queries}"), args.queries, seed=1)
    result = {"benchmark": "bench_search", "device": "cpu", "quick": args.quick,
              "environment": {**benchmarking.environment(torch.device("cpu")),
                              "load_average_start": os.getloadavg()},
              "image_size": [HEIGHT, WIDTH], "queries": args.queries, "topk": args.topk,
              "threads": args.threads, "batch_size": args.batch_size, "rows": []}
    for size in sizes:
        begin = time.perf_counter()
        gallery = write_images(os.path.join(args.cache, f"gallery_{size}"), size, seed=2)
        print(f"gallery of {size:,} images ready ({time.perf_counter() - begin:.1f} s)", flush=True)
        for name in methods:
            checkpoint = checkpoint_of(args.cache, name)
            index = os.path.join(args.cache, "index", f"{name}_{size}")
            shutil.rmtree(index, ignore_errors=True)
            cold = run_child(args, checkpoint, gallery, index, queries)
            warm = run_child(args, checkpoint, gallery, index, queries)
            if warm["extracted"]:
                raise RuntimeError(f"{name} {size}: the warm search extracted {warm['extracted']} images")
            extraction = cold["gallery_seconds"]
            row = {"method": name, "gallery": size, "cold": cold, "warm": warm,
                   "extraction_images_per_second": size / extraction,
                   "warm_ranking_queries_per_second": warm["queries"] / warm["ranking_seconds"],
                   "warm_over_cold": warm["search_seconds"] / cold["search_seconds"],
                   "index_mb": sum(os.path.getsize(os.path.join(index, f)) for f in os.listdir(index)) / 2**20}
            result["rows"].append(row)
            print(f"  {name:18s} {size:>6,}: cold {cold['search_seconds']:7.1f} s "
                  f"(extraction {row['extraction_images_per_second']:6.0f} img/s), warm "
                  f"{warm['search_seconds']:6.2f} s ({100 * row['warm_over_cold']:.1f} % of cold; ranking "
                  f"{row['warm_ranking_queries_per_second']:.0f} queries/s), peak RSS cold "
                  f"{cold['peak_rss_mb']:.0f} MB / warm {warm['peak_rss_mb']:.0f} MB, index "
                  f"{row['index_mb']:.0f} MB", flush=True)
    result["environment"]["load_average_end"] = os.getloadavg()
    os.makedirs(args.out, exist_ok=True)
    name = "bench_search" + ("_quick" if args.quick else "")
    path = os.path.join(args.out, name + ".json")
    with open(path, "w") as file:
        json.dump(result, file, indent=1)
    print(f"wrote {path}")
    if not args.no_plot:
        plot(result, os.path.join(args.out, name + ".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
