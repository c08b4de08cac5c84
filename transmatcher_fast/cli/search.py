"""``search``: rank a folder of your own images (any file names) for query images, with a trained
checkpoint of any method; a thin layer over ``tmf.ReID`` (``engine.reid``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import UserError, _positive_int, add_extraction_options


def _check_inputs(args):
    """Every path given is checked before the model is loaded: (query files, gallery files)."""
    from ..engine import validate
    from ..engine.reid import image_files

    # The checked paths (``~`` expanded) are the ones used from here on.
    args.checkpoint = str(Path(args.checkpoint).expanduser())
    args.out = str(validate.check_output_file(args.out, "--out"))
    for flag in ("index", "pictures"):
        if getattr(args, flag):
            setattr(args, flag, str(validate.check_output_dir(getattr(args, flag), f"--{flag}")))
    gallery = Path(args.gallery).expanduser()
    if not gallery.exists():
        raise UserError(f"--gallery {gallery}: no such folder")
    if not gallery.is_dir():
        raise UserError(f"--gallery {gallery}: is a file, not a folder of images")
    args.gallery = str(gallery)
    for flag in ("index", "pictures"):  # what is written there would be ranked by the next search
        folder = getattr(args, flag)
        if folder and Path(folder).resolve().is_relative_to(gallery.resolve()):
            raise UserError(f"--{flag} {folder}: is inside --gallery {gallery}; choose a folder outside it")
    if Path(args.out).resolve() == Path(args.checkpoint).resolve():
        raise UserError(f"--out {args.out}: is the checkpoint; choose another file")
    queries = image_files(args.query, "--query")
    gallery_files = image_files(str(gallery), "--gallery")
    validate.check_device(args.device)
    validate.read_checkpoint(args.checkpoint)
    return queries, gallery_files


def _unreadable_queries(queries, args):
    """The queries that cannot be read: an error naming the first, or with --skip-bad-images a
    note and the readable ones."""
    from ..data.images import find_unreadable

    bad = find_unreadable(queries, workers=0, progress=False)
    if not bad:
        return queries
    if not args.skip_bad_images:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"--query {bad[0][1]}{more}; fix or remove it, or pass --skip-bad-images")
    if len(bad) == len(queries):
        raise UserError(f"--query: none of the {len(queries)} query images can be read")
    print(f"note: --skip-bad-images: left out {len(bad)} unreadable query images: "
          + ", ".join(path for path, _ in bad[:5]) + (", ..." if len(bad) > 5 else ""), file=sys.stderr)
    skipped = {path for path, _ in bad}
    return [path for path in queries if path not in skipped]


def run_search(args: argparse.Namespace) -> int:
    from ..engine.reid import ReID
    from ..engine.search import write_ranking
    from ..engine.search_pictures import save_search_pictures

    queries, gallery_files = _check_inputs(args)
    queries = _unreadable_queries(queries, args)
    reid = ReID.load(args.checkpoint, device=args.device, height=args.height, width=args.width,
                     amp=args.amp, batch_size=args.batch_size, workers=args.workers, progress=args.progress)
    ranking = reid.rank(queries, args.gallery, topk=args.topk, index=args.index,
                        skip_bad_images=args.skip_bad_images)
    update = ranking.index_update
    if args.index:
        print(f"--index {args.index}: {update.summary()}")
    else:
        print(f"extracted the features of {update.extracted} gallery images (give --index DIR to keep "
              "them for the next search)")
    if ranking.topk < args.topk:
        print(f"note: --topk {args.topk} is above the gallery size ({len(ranking.gallery_paths)}): "
              f"using {ranking.topk}", file=sys.stderr)
    written = write_ranking(args.out, ranking)
    print(f"wrote the {ranking.topk} nearest of {len(ranking.gallery_paths)} gallery images for each of "
          f"{len(ranking)} queries to {written} (distance: {ranking.distance_name}; lower = closer)")
    if args.pictures:
        pictures = save_search_pictures(args.pictures, reid, ranking)
        print(f"wrote {len(pictures)} pictures under {args.pictures}")
    return 0


def add_search_parser(commands) -> None:
    search = commands.add_parser(
        "search", help="rank a folder of your own images for query images",
        description="Rank the images of --gallery (any folder tree, any file names) for each query "
                    "image with a trained checkpoint of any method; write the top --topk per query.")
    search.add_argument("--checkpoint", required=True,
                        help="checkpoint.pt of transmatcher-fast train, or upstream's checkpoint.pth.tar")
    search.add_argument("--query", nargs="+", required=True, metavar="PATH",
                        help="query image files or folders of them")
    search.add_argument("--gallery", required=True, metavar="DIR", help="folder tree of gallery images")
    search.add_argument("--out", required=True, metavar="FILE",
                        help="ranked results: .csv (columns query,rank,gallery,distance) or .jsonl")
    search.add_argument("--topk", type=_positive_int, default=10,
                        help="gallery images per query (clamped to the gallery size)")
    search.add_argument("--index", default=None, metavar="DIR",
                        help="keep the gallery's features here; a later search extracts only new or "
                             "changed images (default: a temporary folder, removed afterwards)")
    search.add_argument("--pictures", default=None, metavar="DIR",
                        help="draw each query's ranked list (and correspondences for fused matchers) here")
    add_extraction_options(search, batch_size=64,
                           amp_help="autocast dtype; auto: the method's choice (bf16 on CUDA, none on CPU)")
    search.add_argument("--skip-bad-images", dest="skip_bad_images", action="store_true",
                        help="leave unreadable images out (listed) instead of stopping at the first")
    search.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    search.set_defaults(run=run_search)
