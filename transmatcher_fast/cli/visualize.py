"""``visualize``: ranked lists, correspondences, ViT attention maps and training curves."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import UserError, _positive_int
from .eval import _add_model_and_data, _checkpoint_options, _clamp_topk, _dataset, _eval_amp, _load_for_eval


def run_visualize(args: argparse.Namespace) -> int:
    from ..engine import attention_pictures, validate, visualize
    from ..engine.demo import save_query_correspondences
    from ..engine.evaluate import dataset_views, eval_transform, evaluate_dataset

    if not (args.log or args.checkpoint):
        raise UserError("give --checkpoint (ranked lists, correspondences) and/or --log (curves)")
    if args.compare_checkpoint and not args.checkpoint:
        raise UserError("--compare-checkpoint compares the attention of --checkpoint with another's: give --checkpoint")
    if args.compare_checkpoint:
        validate.check_input_file(args.compare_checkpoint, "--compare-checkpoint")
    out = validate.check_output_dir(args.out, "--out")
    if args.log:
        validate.check_input_file(args.log, "--log")
    if args.checkpoint:
        model, matcher, height, width, device = _load_for_eval(args)
        if args.compare_checkpoint and not attention_pictures.draws_attention(model):
            raise UserError(f"--compare-checkpoint: the model of --checkpoint {args.checkpoint} is a "
                            f"{type(model).__name__}, which has no attention maps to compare; give "
                            "two ViT checkpoints (TransReID, DINO), or leave --compare-checkpoint out")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if args.log:
        written.append(visualize.plot_training_curves(args.log, out / "training_curve.png"))
    if args.checkpoint:
        dataset = _dataset(args)
        validate.check_valid_queries(dataset)
        args.topk = _clamp_topk(args.topk, dataset)
        result = evaluate_dataset(model, matcher, dataset, batch_size=args.batch_size, workers=args.workers,
                                  progress=args.progress, **_checkpoint_options(
                                      args, height, width, {"device": device, "amp": _eval_amp(args)}))
        written += visualize.save_ranked_lists(out / "ranked_lists", result.query_items, result.gallery_items,
                                               result.distances.numpy(), num_queries=args.num_queries,
                                               topk=args.topk, seed=args.seed,
                                               rows_per_page=args.rows_per_page,
                                               camera_base=dataset.camera_base)
        if visualize.draws_correspondences(matcher):
            written += save_query_correspondences(model, matcher, dataset, result, out / "correspondences",
                                                  pairs=args.pairs)
        if attention_pictures.draws_attention(model):  # ViT models: beside the ranked lists
            picked = visualize.picked_queries(len(result.query_items), args.num_queries, args.seed)
            items = [result.query_items[i] for i in picked]
            written += attention_pictures.save_attention_pictures(
                out / "attention", model, items, eval_transform(args.model_config, height, width),
                views=dataset_views(dataset, items), indices=picked, keep=args.attention_keep,
                camera_base=dataset.camera_base)
            if args.compare_checkpoint:
                written += _attention_comparison(args, model, height, width, items, picked, dataset, out)
    print(f"wrote {len(written)} pictures under {out}")
    return 0


def _attention_comparison(args, model, height, width, items, picked, dataset, out):
    """--checkpoint's and --compare-checkpoint's attention side by side (e.g. DINO pre-trained
    vs fine-tuned), each model with its own test transform, DINO's 60 % view by default."""
    from ..engine import attention_pictures, validate
    from ..engine.evaluate import dataset_views, eval_transform, load_trained

    validate.read_checkpoint(args.compare_checkpoint)
    other, _, other_config = load_trained(args.compare_checkpoint, next(model.parameters()).device)
    if not attention_pictures.draws_attention(other):
        raise UserError(f"--compare-checkpoint {args.compare_checkpoint}: its model is not a ViT (no attention maps)")
    models = {
        Path(args.checkpoint).parent.name or "checkpoint": (model, eval_transform(args.model_config, height, width)),
        Path(args.compare_checkpoint).parent.name or "compared": (
            other, eval_transform(other_config, other_config.get("height", height), other_config.get("width", width)))}
    return attention_pictures.save_attention_comparison(
        out / "attention", models, items, views=dataset_views(dataset, items), indices=picked,
        keep=args.attention_keep if args.attention_keep is not None else 0.6)


def add_visualize_parser(commands) -> None:
    pictures = commands.add_parser("visualize", help="ranked lists, correspondences, ViT attention maps, training curves",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_and_data(pictures, checkpoint_required=False)
    pictures.add_argument("--out", default="pictures", help="output folder")
    pictures.add_argument("--log", help="a training log.jsonl to plot")
    pictures.add_argument("--num-queries", dest="num_queries", type=_positive_int, default=8)
    pictures.add_argument("--rows-per-page", dest="rows_per_page", type=_positive_int, default=50,
                          help="queries per page of the ranked-list overview")
    pictures.add_argument("--topk", type=_positive_int, default=10)
    pictures.add_argument("--pairs", type=_positive_int, default=3, help="correspondence pictures")
    pictures.add_argument("--compare-checkpoint", dest="compare_checkpoint", default=None,
                          help="another ViT checkpoint (e.g. pretrain's) whose attention is drawn beside "
                               "--checkpoint's for the same queries (attention_compare_q<i>_pid<p>.png)")
    pictures.add_argument("--attention-keep", dest="attention_keep", type=float, default=None,
                          help="ViT attention: show per head only the patches holding this fraction of "
                               "its mass (DINO's view: 0.6); default: the whole map")
    pictures.add_argument("--seed", type=int, default=0)
    pictures.set_defaults(run=run_visualize)
