"""Command-line interface: ``transmatcher-fast <command>``.

``demo`` matches random query features against random gallery features with the fused op and with
upstream's materialised reference, and prints shapes, time, peak memory and agreement.

``synth`` writes a procedural synthetic person dataset in Market-1501 layout.

``train`` trains a feature model and matcher with upstream's recipe (``--config file.yaml`` sets
any option; flags given on the command line win). Under ``torchrun`` it trains on every rank.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from . import benchmarking, ops, reference


def _mib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def run_demo(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
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


def run_synth(args: argparse.Namespace) -> int:
    import time

    from .data.datasets import Market1501
    from .data.synthetic import generate_synthetic

    start = time.perf_counter()
    generate_synthetic(args.out, ids=args.ids, cams=args.cams, images_per_cam=args.images_per_cam,
                       seed=args.seed, height=args.height, width=args.width)
    print(f"wrote {args.ids} ids x {args.cams} cameras x {args.images_per_cam} images "
          f"({args.height}x{args.width}) to {args.out} in {time.perf_counter() - start:.1f} s")
    print(Market1501(args.out).summary())
    return 0


def load_config(path: str) -> dict:
    """Training options from a YAML mapping; keys are option names (``batch_size`` or
    ``batch-size``)."""
    import yaml

    try:
        with open(path) as file:
            values = yaml.safe_load(file) or {}
    except OSError as error:
        raise SystemExit(f"--config: cannot read {path}: {error}") from None
    if not isinstance(values, dict):
        raise SystemExit(f"--config: {path} must hold a mapping of option: value, got {type(values).__name__}")
    return {str(key).replace("-", "_"): value for key, value in values.items()}


def run_train(args: argparse.Namespace) -> int:
    from .engine.trainer import Trainer, TrainConfig

    values = {key: value for key, value in vars(args).items() if key not in ("command", "run", "config")}
    Trainer(TrainConfig.from_dict(values)).fit()
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transmatcher-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the fused op on random features against the reference")
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
    demo.set_defaults(run=run_demo)
    synth = commands.add_parser("synth", help="write a synthetic person dataset in Market-1501 layout")
    synth.add_argument("--out", required=True, help="output folder (its split folders must be empty)")
    synth.add_argument("--ids", type=_positive_int, default=100,
                       help="identities; the first half train, the rest query/gallery")
    synth.add_argument("--cams", type=_positive_int, default=6, help="cameras (at most 9)")
    synth.add_argument("--images-per-cam", type=_positive_int, default=8)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--height", type=_positive_int, default=128)
    synth.add_argument("--width", type=_positive_int, default=64)
    synth.set_defaults(run=run_synth)
    add_train_parser(commands)
    parser.commands = commands.choices  # name -> subparser, for --config defaults
    return parser


def _optional_int(text: str):
    return None if text.lower() == "none" else _positive_int(text)


def _optional_str(text: str):
    return None if text.lower() == "none" else text


def add_train_parser(commands) -> argparse.ArgumentParser:
    from .engine.trainer import AMP_CHOICES, LOSSES, SAMPLERS, SCHEDULES, TrainConfig

    d = TrainConfig()
    train = commands.add_parser(
        "train", help="train a TransMatcher / QAConv model (upstream's recipe)",
        description="Train with upstream's recipe: graph sampler, pairwise matching loss, SGD "
                    "Nesterov, AMP, gradient clipping. A checkpoint is written atomically after every "
                    "epoch to EXP_DIR/checkpoint.pt; --resume continues a killed run. Logs: "
                    "EXP_DIR/log.jsonl and EXP_DIR/tensorboard. Multi-GPU: torchrun --nproc_per_node N "
                    "-m transmatcher_fast.cli train ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--config", help="YAML file of options (keys as below, e.g. batch_size: 32); "
                       "command-line flags override it")
    data = train.add_argument_group("data")
    data.add_argument("-d", "--dataset", default=d.dataset, help="dataset name (see the registry)")
    data.add_argument("--data-dir", default=d.data_dir,
                      help="folder of the dataset, or its parent holding a folder named like --dataset")
    data.add_argument("--height", type=_positive_int, default=d.height, help="input height")
    data.add_argument("--width", type=_positive_int, default=d.width, help="input width")
    data.add_argument("-j", "--workers", type=int, default=d.workers, help="data loader workers")
    model = train.add_argument_group("model")
    model.add_argument("-a", "--arch", default=d.arch, help="resnet18/34/50/101/152")
    model.add_argument("--ibn", type=_optional_str, default=d.ibn, help="'b' (IBN-Net-b) or none")
    model.add_argument("--final-layer", "--final_layer", dest="final_layer", default=d.final_layer,
                       help="last backbone stage: layer2, layer3 or layer4")
    model.add_argument("--neck", type=int, default=d.neck,
                       help="neck channels = d_model (default 512 TransMatcher, 128 QAConv)")
    model.add_argument("--nhead", type=_positive_int, default=d.nhead, help="encoder heads")
    model.add_argument("--num-trans-layers", "--num_trans_layers", dest="num_trans_layers",
                       type=_positive_int, default=d.num_trans_layers,
                       help="N: N-1 encoder layers and N decoder layers")
    model.add_argument("--dim-feedforward", "--dim_feedforward", dest="dim_feedforward",
                       type=_positive_int, default=d.dim_feedforward, help="encoder FFN and decoder MLP width")
    model.add_argument("--dropout", type=float, default=d.dropout, help="encoder dropout")
    model.add_argument("--matcher", choices=("transmatcher", "qaconv"), default=d.matcher)
    model.add_argument("--pretrained", type=_optional_str, default=d.pretrained,
                       help="local torchvision / IBN-Net backbone state_dict (nothing is downloaded)")
    batches = train.add_argument_group("batches and loss")
    batches.add_argument("--sampler", choices=SAMPLERS, default=d.sampler,
                         help="graph: upstream GS (nearest ids by the matcher); pk: random ids")
    batches.add_argument("-b", "--batch-size", dest="batch_size", type=_positive_int, default=d.batch_size)
    batches.add_argument("--num-instances", "--num_instance", "--num_instances", dest="num_instances",
                         type=_positive_int, default=d.num_instances, help="images per identity in a batch")
    batches.add_argument("--loss", choices=LOSSES, default=d.loss,
                         help="pairwise: matching BCE (TransMatcher); triplet: batch-hard (QAConv 2.1)")
    batches.add_argument("--margin", type=float, default=d.margin, help="triplet margin")
    optim = train.add_argument_group("optimisation")
    optim.add_argument("--lr", type=float, default=d.lr, help="learning rate of new layers and matcher")
    optim.add_argument("--backbone-lr-factor", dest="backbone_lr_factor", type=float,
                       default=d.backbone_lr_factor, help="backbone lr = lr x this")
    optim.add_argument("--momentum", type=float, default=d.momentum, help="SGD (Nesterov) momentum")
    optim.add_argument("--weight-decay", dest="weight_decay", type=float, default=d.weight_decay)
    optim.add_argument("--epochs", type=_positive_int, default=d.epochs, help="epochs (step schedule)")
    optim.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                       help="step: x gamma every step-size epochs; adaptive: QAConv 2.1's loss-driven decay")
    optim.add_argument("--step-size", "--step_size", dest="step_size", type=_positive_int, default=d.step_size)
    optim.add_argument("--gamma", type=float, default=d.gamma, help="learning-rate decay factor")
    optim.add_argument("--step-factor", dest="step_factor", type=float, default=d.step_factor,
                       help="adaptive: decay when the loss is below this x the second epoch's")
    optim.add_argument("--max-epochs", dest="max_epochs", type=_positive_int, default=d.max_epochs,
                       help="adaptive: the most epochs")
    optim.add_argument("--clip-value", "--clip_value", dest="clip_value", type=float, default=d.clip_value,
                       help="gradient-norm clip of model and matcher (0: off)")
    optim.add_argument("--amp", choices=AMP_CHOICES, default=d.amp,
                       help="autocast: auto = fp16 + GradScaler on CUDA, none on CPU; bf16 needs no scaler")
    optim.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction, default=d.freeze_bn,
                       help="keep the feature model's BatchNorm statistics frozen (upstream)")
    gs = train.add_argument_group("graph sampler matching")
    gs.add_argument("--test-batch", dest="test_batch", type=_positive_int, default=d.test_batch,
                    help="feature extraction batch")
    gs.add_argument("--test-prob-batch", "--test_prob_batch", dest="test_prob_batch", type=_optional_int,
                    default=d.test_prob_batch, help="probe chunk (default 256)")
    gs.add_argument("--test-gal-batch", "--test_gal_batch", dest="test_gal_batch", type=_optional_int,
                    default=d.test_gal_batch, help="gallery chunk (default: from free memory)")
    run = train.add_argument_group("run")
    run.add_argument("--exp-dir", dest="exp_dir", default=d.exp_dir, help="checkpoint and logs folder")
    run.add_argument("--resume", action="store_true", help="continue from EXP_DIR/checkpoint.pt")
    run.add_argument("--seed", type=int, default=d.seed)
    run.add_argument("--device", type=_optional_str, default=d.device, help="default: cuda[:LOCAL_RANK] if available, else cpu")
    run.add_argument("--log-every", dest="log_every", type=_positive_int, default=d.log_every,
                     help="steps between step records in log.jsonl")
    run.add_argument("--max-steps-per-epoch", dest="max_steps_per_epoch", type=_optional_int,
                     default=d.max_steps_per_epoch, help="cut every epoch short (quick runs)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress,
                     help="progress bar")
    run.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=d.tensorboard,
                     help="TensorBoard logs in EXP_DIR/tensorboard")
    train.set_defaults(run=run_train)
    return train


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        # YAML values become the defaults; flags on the command line still win.
        values = load_config(args.config)
        subparser = parser.commands[args.command]
        known = {action.dest for action in subparser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"--config {args.config}: unknown options {unknown}")
        subparser.set_defaults(**values)
        args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
