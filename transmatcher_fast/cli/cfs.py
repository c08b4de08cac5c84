"""``cfs``: rank unlabelled images by conditional filtering (TransReID-SSL's CFS)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import PROG, UserError, _optional_int, _optional_str, _positive_int, _workers_count


def _cfs_proxy(path: str, flag: str, args: argparse.Namespace, device):
    """The CFS proxy model of ``path`` (see :mod:`..models.cfs_proxy`): a checkpoint of ours
    is rebuilt by the engine, bare weights go into ``--arch`` (or the file's own config)."""
    from ..engine import validate
    from ..engine.evaluate import load_trained
    from ..models import cfs_proxy

    validate.check_input_file(path, flag)
    try:
        state = cfs_proxy.read_proxy_file(path)
    except ValueError as error:
        raise UserError(f"{flag} {error}") from None
    size, where = (args.height, args.width), f"{flag} {path}"
    trained = load_trained(path) if cfs_proxy.is_trained_run(state) else None
    try:
        if trained is not None:
            proxy = cfs_proxy.proxy_of_trained(trained[0], trained[2], size, where)
        else:
            proxy = cfs_proxy.proxy_of_weights(path, cfs_proxy.saved_config(state), args.arch,
                                               args.stem_conv, size, args.pretrain_hw_ratio, where)
    except cfs_proxy.ProxyError as error:
        raise UserError(str(error)) from None
    return proxy.to(device).eval()


def run_cfs(args: argparse.Namespace) -> int:
    import json
    import os

    from ..data import list_images
    from ..engine import cfs, validate

    device = validate.check_device(args.device)
    images = Path(args.images).expanduser()
    if not images.is_dir():
        raise UserError(f"--images {images}: no such folder of images")
    out = validate.check_output_dir(args.out, "--out")
    if args.workers < 0:
        raise UserError(f"-j/--workers {args.workers}: must be 0 (load in the main process) or more")
    source = _cfs_proxy(args.source_checkpoint, "--source-checkpoint", args, device)
    target = _cfs_proxy(args.target_checkpoint, "--target-checkpoint", args, device)
    # Names relative to --images, as upstream's list (pretrain --data-dir IMAGES --filter-list reads them).
    names = [os.path.relpath(p, images).replace(os.sep, "/") for p in list_images(str(images))]
    print(f"CFS of {len(names):,} images under {images}: cosine of the source proxy's and the target "
          f"proxy's cls tokens at {args.height}x{args.width}")
    try:
        result = cfs.run_cfs(source, target, names, out, root=images,
                             transform=cfs.build_cfs_transform(args.height, args.width),
                             batch_size=args.batch_size, num_workers=args.workers,
                             amp=None if args.amp == "none" else args.amp, save_every=args.save_every,
                             progress=args.progress, max_batches=args.max_batches,
                             skip_bad_images=args.skip_bad_images)
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        done = 0
        try:
            done = json.loads((out / cfs.PROGRESS_FILE).read_text())["done"]
        except (OSError, ValueError, KeyError):
            pass
        print(f"{PROG} cfs: interrupted; the {done:,} of {len(names):,} images scored so far are kept in "
              f"{out}: the same command continues", file=sys.stderr)
        raise SystemExit(130) from None
    if not result.complete:
        print(f"scored {result.done:,} of {len(names):,} images (--max-batches); the same command continues")
        return 0
    ranked = result.ranked()[1]
    print(f"scored {len(ranked):,} images ({len(result.failed)} unreadable, left out); CFS from "
          f"{ranked[-1]:.4f} to {ranked[0]:.4f}")
    for ratio in (0.5, 0.6):
        keep = max(1, min(len(ranked), int(ratio * len(ranked) + 0.5)))
        print(f"  top {ratio:.0%}: {keep:,} images, CFS >= {ranked[keep - 1]:.4f} "
              f"(pretrain --filter-list {result.files['list']} --keep-ratio {ratio})")
    print("wrote " + ", ".join(str(p) for p in result.files.values()))
    return 0


def add_cfs_parser(commands) -> argparse.ArgumentParser:
    cfs = commands.add_parser(
        "cfs", help="rank unlabelled images by conditional filtering (TransReID-SSL's CFS)",
        description="Scores every image under --images by the cosine of two models' features (the cls "
                    "token after the final LayerNorm, TransReID's test transform at --height x --width): "
                    "the source proxy (DINO pre-trained on these images: a pretrain checkpoint.pt or "
                    "teacher.pth) and the target proxy (the source proxy fine-tuned on labelled re-ID data: a "
                    "train --method transreid checkpoint.pt, no JPM/SIE). High = close to the re-ID domain. "
                    "Writes OUT/cfs_list.txt (best first, names relative to --images), cfs_scores.txt, "
                    "cfs_scores.npy (input order), cfs_hist.png and cfs_failed.txt (unreadable images). "
                    "Streams in batches (memory: one batch + 4 bytes per image) and saves its progress "
                    "every --save-every batches and when interrupted: the same command continues.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cfs.add_argument("--source-checkpoint", required=True, help="the source proxy (pre-trained)")
    cfs.add_argument("--target-checkpoint", required=True, help="the target proxy (fine-tuned)")
    cfs.add_argument("--images", required=True, help="folder (tree) of the images to score")
    cfs.add_argument("--out", required=True, help="output folder (also holds the progress of a run)")
    cfs.add_argument("--height", type=_positive_int, default=256)
    cfs.add_argument("--width", type=_positive_int, default=128)
    cfs.add_argument("-a", "--arch", default="vit_small_patch16",
                     help="the ViT of bare weight files (a checkpoint of ours says its own)")
    cfs.add_argument("--stem-conv", dest="stem_conv", action=argparse.BooleanOptionalAction, default=False,
                     help="bare weight files: the ICS stem")
    cfs.add_argument("--pretrain-hw-ratio", dest="pretrain_hw_ratio", type=_positive_int, default=2,
                     help="bare weight files: height/width ratio of their position grid (DINO on LUPerson: 2)")
    cfs.add_argument("-b", "--batch-size", dest="batch_size", type=_positive_int, default=64)
    cfs.add_argument("-j", "--workers", type=_workers_count, default=2, help="data loader workers")
    cfs.add_argument("--skip-bad-images", dest="skip_bad_images", action="store_true",
                     help="score unreadable images NaN and list them in OUT/cfs_failed.txt (ranked "
                          "last) instead of stopping at the first")
    cfs.add_argument("--device", type=_optional_str, default=None, help="default: cuda if available, else cpu")
    cfs.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                     help="autocast of the forwards (none: float32 scores, an order free of rounding)")
    cfs.add_argument("--save-every", dest="save_every", type=_positive_int, default=50,
                     help="batches between two saves of the progress")
    cfs.add_argument("--max-batches", dest="max_batches", type=_optional_int, default=None,
                     help="stop (saved) after this many batches in this call")
    cfs.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    cfs.set_defaults(run=run_cfs)
    return cfs
