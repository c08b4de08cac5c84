"""``extract``: write the features of a split (``eval --query-features`` reads them)."""

from __future__ import annotations

import argparse

from .eval import _add_model_and_data, _add_skip_bad_images, _dataset, _eval_amp, _load_for_eval


def run_extract(args: argparse.Namespace) -> int:
    from ..engine import export, validate
    from ..engine.evaluate import dataset_views, eval_transform, extract

    validate.check_output_file(args.out, "--out")
    model, _, height, width, device = _load_for_eval(args)
    dataset = _dataset(args, (args.split,))
    items = getattr(dataset, args.split)
    features = extract(model, items, height=height, width=width, batch_size=args.batch_size,
                       workers=args.workers, device=device, amp=_eval_amp(args), progress=args.progress,
                       skip_bad_images=args.skip_bad_images,
                       transform=eval_transform(args.model_config, height, width),
                       views=dataset_views(dataset, items))
    record = export.provenance(model_config={**args.model_config, "height": height, "width": width},
                               checkpoint=args.checkpoint,
                               dataset={**export.dataset_info(dataset), "split": args.split})
    export.save_features(args.out, features, items, provenance_record=record)
    print(f"wrote {tuple(features.features.shape)} {features.features.dtype} features of "
          f"{len(features)} {args.split} images to {args.out}")
    return 0


def add_extract_parser(commands) -> None:
    extraction = commands.add_parser("extract", help="write the features of a split",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_and_data(extraction)
    extraction.add_argument("--split", choices=("query", "gallery", "train"), default="query")
    extraction.add_argument("--out", required=True,
                            help="output .pt (features, pids, cams, paths, provenance; eval --query-features reads it)")
    _add_skip_bad_images(extraction)
    extraction.set_defaults(run=run_extract)
