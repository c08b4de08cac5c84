"""``eval``: a checkpoint's CMC, mAP and mINP with upstream's protocol; also the checkpoint and
dataset options and loading that ``extract`` and ``visualize`` share."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from .common import MAX_RANK, UserError, _optional_int, _positive_int, _rank, add_extraction_options


def _load_for_eval(args, with_data: bool = True):
    """(model, matcher, height, width, device) of ``--checkpoint`` and the size flags; the
    options, the data folder (``with_data``) and the checkpoint file are checked first."""
    from ..engine import validate
    from ..engine.evaluate import load_trained

    device = validate.check_device(args.device)
    if args.workers < 0:
        raise UserError(f"-j/--workers {args.workers}: must be 0 (load in the main process) or more")
    if with_data:
        validate.check_data_dir(args.data_dir, args.dataset)
    state = validate.read_checkpoint(args.checkpoint)
    validate.check_input_size(state, args.height, args.width, args.checkpoint)
    del state
    model, matcher, config = load_trained(args.checkpoint, device)
    args.model_config = config  # for the results' provenance
    return model, matcher, args.height or config["height"], args.width or config["width"], device


def _eval_amp(args):
    """--amp, or for auto the checkpoint's method's choice (once it is loaded)."""
    from ..engine.evaluate import default_eval_amp

    if args.amp != "auto":
        return args.amp
    config = getattr(args, "model_config", None)
    return default_eval_amp(config) if config is not None else None


def _clamp_topk(topk, dataset, flag: str = "--topk"):
    """``topk`` at most the gallery size, with a note when it was above."""
    if topk is not None and topk > len(dataset.gallery):
        print(f"note: {flag} {topk} is above the gallery size ({len(dataset.gallery)}): using "
              f"{len(dataset.gallery)}", file=sys.stderr)
        return len(dataset.gallery)
    return topk


def _dataset(args, splits=("query", "gallery")):
    from ..data import build_dataset
    from ..engine import validate
    from ..engine.trainer import dataset_root

    dataset = build_dataset(args.dataset, dataset_root(args.data_dir, args.dataset))
    validate.check_splits(dataset, splits)
    return dataset


def run_eval(args: argparse.Namespace) -> int:
    from ..engine import export, validate
    from ..engine.evaluate import evaluate_saved, evaluate_testsets, parse_testsets, results_table

    if args.rerank and args.topk is not None:
        raise UserError("--rerank needs the full query x gallery distances: use it without --topk")
    from_features = args.query_features is not None or args.gallery_features is not None
    if from_features and (args.query_features is None or args.gallery_features is None):
        raise UserError("--query-features and --gallery-features go together (two files of extract)")
    names = parse_testsets(args.testsets) if args.testsets else [args.dataset]
    if from_features and args.testsets:
        raise UserError("--testsets evaluates datasets' images; with --query-features it has no meaning")
    for flag, path in (("--out", args.out), ("--save-matrix", args.save_matrix),
                       ("--save-ranked", args.save_ranked)):
        if path:
            validate.check_output_file(path, flag)
    options = dict(device=None, amp=_eval_amp(args), probe_chunk=args.probe_chunk,
                   gallery_chunk=args.gallery_chunk, rerank=args.rerank, k1=args.k1, k2=args.k2,
                   lambda_value=args.lambda_value, protocol=args.protocol, progress=args.progress)
    results = {}
    if from_features:
        for flag, path in (("--query-features", args.query_features),
                           ("--gallery-features", args.gallery_features)):
            if not Path(path).is_file():
                raise UserError(f"{flag} {path}: no such file; write it with transmatcher-fast extract")
        _, matcher, _, _, device = _load_for_eval(args, with_data=False)
        results[args.dataset] = evaluate_saved(matcher, args.query_features, args.gallery_features,
                                               **{**options, "device": device, "topk": args.topk})
    else:
        model, matcher, height, width, device = _load_for_eval(args)
        testsets = []
        for name in names:  # every test set's folder and queries checked before the first is evaluated
            args.dataset = name
            dataset = _dataset(args)
            validate.check_valid_queries(dataset)
            testsets.append((name, dataset))

        def before(name, dataset):  # the set's own top-k, and its summary just before its evaluation
            topk = _clamp_topk(args.topk, dataset)
            print(dataset.summary())
            return {"topk": topk}

        results = evaluate_testsets(
            model, matcher, testsets, before=before, batch_size=args.batch_size, workers=args.workers,
            skip_bad_images=args.skip_bad_images, checkpoint=args.checkpoint,
            **_checkpoint_options(args, height, width, {**options, "device": device}))
    for name, result in results.items():
        m = result.metrics
        print(results_table({f"{name}{' (re-ranked)' if args.rerank else ''}": m}, args.ranks))
        for note in _evaluation_notes(m):
            print(note)
        print(f"features {m.get('features_seconds', 0.0):.1f} s, matching {m['matching_seconds']:.1f} s"
              + (f", re-ranking {m['rerank_seconds']:.1f} s" if "rerank_seconds" in m else ""))
    _export(args, results)
    if args.out:
        only = len(results) == 1 and not args.testsets
        metrics = {name: result.metrics for name, result in results.items()}
        export.write_results_json(args.out, next(iter(metrics.values())) if only else metrics)
        print(f"wrote {args.out}")
    return 0


def _checkpoint_options(args, height: int, width: int, options: dict) -> dict:
    """``options`` of the engine's evaluation with the checkpoint's size, test transform and
    configuration, its method's autocast for ``--amp auto``, and the split counter printed for a
    dataset of several random test splits (VehicleID: 10)."""
    from ..engine.evaluate import default_eval_amp, eval_transform

    amp = options.get("amp")
    return {**options, "height": height, "width": width, "model_config": args.model_config,
            "transform": eval_transform(args.model_config, height, width),
            "amp": default_eval_amp(args.model_config) if amp is None else amp,
            "on_split": lambda i, n: print(f"test split {i + 1}/{n}")}


def _export(args, results) -> None:
    """--save-matrix and --save-ranked of each evaluation (one test set: the given path; several:
    the path with the test set's name before the suffix)."""
    from ..engine import export

    for name, result in results.items():
        def path_for(path):
            path = Path(path)
            return path if len(results) == 1 else path.with_name(f"{path.stem}_{name}{path.suffix}")

        q_items, g_items = result.query_items, result.gallery_items
        if args.save_matrix:
            written = export.save_matrix(path_for(args.save_matrix), result.distances, q_items, g_items,
                                         kind=args.matrix_kind, reranked=args.rerank,
                                         to_score=result.score_of_distance,
                                         provenance_record=result.metrics.get("provenance"))
            print(f"wrote {written} ({args.matrix_kind})")
        if args.save_ranked:
            written = export.write_ranked_results(path_for(args.save_ranked), q_items, g_items,
                                                  result.distances, topk=args.ranked_topk,
                                                  camera_base=result.camera_base)
            print(f"wrote {written} (top {args.ranked_topk} per query)")


def _evaluation_notes(m: dict):
    """What the table does not say: queries left out, and what top-k mode measures."""
    skipped, counted = m.get("num_skipped", 0), m.get("num_queries", 0)
    if skipped:
        yield (f"note: {skipped} of {skipped + counted} queries were skipped: no gallery image of "
               "their identity from another camera (the protocol ignores same-camera matches)")
    if m.get("topk"):
        yield (f"note: top-k mode (--topk {m['topk']}): mAP is AP@{m['topk']} and mINP is measured "
               f"within the top {m['topk']}; ranks above {m['topk']} are n/a")


def _add_model_and_data(parser, checkpoint_required: bool = True) -> None:
    parser.add_argument("--checkpoint", required=checkpoint_required,
                        help="checkpoint.pt of transmatcher-fast train, or upstream's checkpoint.pth.tar")
    parser.add_argument("-d", "--dataset", default="market1501")
    parser.add_argument("--data-dir", default="data",
                        help="folder of the dataset, or its parent holding a folder named like --dataset")
    add_extraction_options(parser, batch_size=128)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)



def _add_skip_bad_images(parser) -> None:
    parser.add_argument("--skip-bad-images", dest="skip_bad_images", action="store_true",
                        help="leave unreadable images out (listed) instead of stopping at the first")


def add_eval_parser(commands) -> None:
    from ..engine.metrics import PROTOCOLS

    fmt = argparse.ArgumentDefaultsHelpFormatter
    evaluation = commands.add_parser("eval", help="evaluate a checkpoint (CMC, mAP, mINP)", formatter_class=fmt,
                                     description="Upstream's protocol: same-id-same-camera gallery images "
                                                 "ignored, distance 1 - sigmoid(score/10), memory bounded by the "
                                                 "chunk sizes (default: from free memory).")
    _add_model_and_data(evaluation)
    evaluation.add_argument("--probe-chunk", dest="probe_chunk", type=_optional_int, default=None,
                            help="query images per block (default 256)")
    evaluation.add_argument("--gallery-chunk", dest="gallery_chunk", type=_optional_int, default=None,
                            help="gallery images per block (default: from free memory)")
    evaluation.add_argument("--topk", type=_optional_int, default=None,
                            help="keep only the k nearest gallery images per query (mAP becomes AP@k)")
    evaluation.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking")
    evaluation.add_argument("--k1", type=_positive_int, default=20)
    evaluation.add_argument("--k2", type=_positive_int, default=6)
    evaluation.add_argument("--lambda", dest="lambda_value", type=float, default=0.3)
    evaluation.add_argument("--protocol", choices=PROTOCOLS, default="market",
                            help="market (also CUHK03-NP, as upstream) or cuhk03 (classic single-gallery-shot CMC)")
    evaluation.add_argument("--ranks", type=_rank, nargs="+", default=[1, 5, 10, 20], metavar="R",
                            help=f"CMC ranks to show (1 to {MAX_RANK})")
    evaluation.add_argument("--out", help="write the metrics and their provenance (version, model, checkpoint, "
                                           "dataset, protocol, date) as JSON here")
    evaluation.add_argument("--testsets", default=None, metavar="NAMES",
                            help="several test sets in one run, comma-separated (upstream's --testset); "
                                 "each under --data-dir; default: --dataset")
    evaluation.add_argument("--query-features", dest="query_features", default=None, metavar="FILE",
                            help="evaluate features written by extract (with --gallery-features) instead "
                                 "of reading the images")
    evaluation.add_argument("--gallery-features", dest="gallery_features", default=None, metavar="FILE")
    evaluation.add_argument("--save-matrix", dest="save_matrix", default=None, metavar="FILE.npz",
                            help="write the distance (or score) matrix, or the top-k lists with --topk")
    evaluation.add_argument("--matrix-kind", dest="matrix_kind", choices=("distance", "score"),
                            default="distance", help="what --save-matrix stores")
    evaluation.add_argument("--save-ranked", dest="save_ranked", default=None, metavar="FILE",
                            help="ranked results per query (.csv, else JSON lines)")
    evaluation.add_argument("--ranked-topk", dest="ranked_topk", type=_positive_int, default=10,
                            help="gallery images per query in --save-ranked")
    _add_skip_bad_images(evaluation)
    evaluation.set_defaults(run=run_eval)
