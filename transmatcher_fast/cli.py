"""Command-line interface: ``transmatcher-fast <command>``.

``demo`` is the built-in end-to-end run: synthetic persons, an untrained small model evaluated,
trained on the CPU for a few minutes, evaluated again; results and pictures in ``./demo_out/``.

``op-demo`` matches random query features against random gallery features with the fused op and
with upstream's materialised reference, and prints shapes, time, peak memory and agreement.

``synth`` writes a procedural synthetic person dataset in Market-1501 layout.

``train`` trains a method (``--method transmatcher | qaconv | transreid``) with its upstream
recipe (``--config file.yaml`` sets any option; flags given on the command line win). Under
``torchrun`` it trains on every rank.

``eval`` evaluates a checkpoint with upstream's protocol (CMC, mAP, mINP; top-k and re-ranking
options), ``extract`` writes features, ``visualize`` draws ranked lists, local correspondences
and training curves.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from . import __version__, benchmarking, ops, reference
from .engine.validate import UserError

PROG = "transmatcher-fast"
# Namespace entries that are not options of the command's engine configuration.
_NOT_OPTIONS = ("command", "run", "config", "debug")


def _mib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def run_op_demo(args: argparse.Namespace) -> int:
    from .engine.validate import check_device

    device = check_device(args.device)
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
        raise UserError(f"--config {path}: cannot read it ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        raise UserError(f"--config {path}: not valid YAML"
                        + (f" (line {where.line + 1}, column {where.column + 1})" if where else "")) from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: must hold a mapping of option: value, got {type(values).__name__}")
    from .engine.trainer import upgrade_options

    return upgrade_options({str(key).replace("-", "_"): value for key, value in values.items()})


def run_train(args: argparse.Namespace) -> int:
    from .engine.trainer import Trainer, TrainConfig

    values = {key: value for key, value in vars(args).items() if key not in _NOT_OPTIONS}
    config = TrainConfig.from_dict(values)  # a bad value: ValueError, one line (see main)
    _check_train_paths(config)
    try:
        trainer = Trainer(config)  # RunDirError: the folder is in use or holds a run
        trainer.fit()
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print(f"{PROG} train: interrupted; {_last_checkpoint(config.exp_dir)}", file=sys.stderr)
        raise SystemExit(130) from None
    trainer.close()
    return 0


def _last_checkpoint(exp_dir) -> str:
    """What a run interrupted in ``exp_dir`` can continue from, for the console."""
    from pathlib import Path

    from .engine.rundir import CHECKPOINT_NAME
    from .weights_io import load

    path = Path(exp_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return "no checkpoint written yet"
    try:  # mmap: only the small values are read, not every tensor
        epoch = load(path, mmap=True)["epoch"]
    except Exception:
        return f"{path} cannot be read"
    return f"last complete checkpoint: {path} (epoch {epoch}); continue with --resume"


def _check_train_paths(config) -> None:
    """What train reads and writes, before the Trainer builds anything."""
    from .engine import validate

    validate.check_device(config.device)
    validate.check_data_dir(config.data_dir, config.dataset)
    validate.check_output_dir(config.exp_dir, "--exp-dir")
    if config.pretrained is not None:
        validate.check_input_file(config.pretrained, "--pretrained")
    if config.workers < 0:
        raise validate.UserError(f"-j/--workers {config.workers}: must be 0 (load in the main process) or more")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Plain-text help that shows every option's default once: none is added where the help
    already says it (``default ...``), an option without help gets one; ``code`` markup is
    dropped; a flag pair shows which of its two forms is the default."""

    _NO_HELP = "\0"

    def _format_text(self, text):
        return super()._format_text(text.replace("``", ""))

    def _format_action(self, action):
        if not action.help and action.option_strings and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)
            action.help = self._NO_HELP
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = (action.help or "").replace(self._NO_HELP, "").replace("``", "")
        if (action.default is argparse.SUPPRESS or not action.option_strings or action.required
                or "%(default)" in text or re.search(r"\bdefault\b", text, re.IGNORECASE)):
            return text
        default = action.default
        if isinstance(action, argparse.BooleanOptionalAction):
            shown = next((o for o in action.option_strings if o.startswith("--no-") != bool(default)),
                         str(default))
        elif action.nargs == 0 and isinstance(default, bool):
            shown = "on" if default != isinstance(action, argparse._StoreFalseAction) else "off"
        elif default is None:
            shown = "none"
        elif isinstance(default, (list, tuple)):
            shown = " ".join(map(str, default))
        else:
            shown = str(default)
        return (text + " " if text else "") + f"(default: {shown.replace('%', '%%')})"


class RawDescriptionHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """:class:`HelpFormatter` that keeps the description's line breaks (the top-level help)."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error (also accepted after the command)")
    commands = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(commands)
    demo = commands.add_parser("op-demo", help="run the fused op on random features against the reference")
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
    demo.set_defaults(run=run_op_demo)
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
    add_pretrain_parser(commands)
    add_cfs_parser(commands)
    add_eval_parsers(commands)
    parser.commands = commands.choices  # name -> subparser, for --config defaults
    for sub in parser.commands.values():
        _set_choices(sub)
        sub.formatter_class = HelpFormatter  # every command's help shows its defaults, plainly
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show the traceback of an error")
    return parser


def _rank(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_RANK:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_RANK} (the CMC is measured to rank "
                                         f"{MAX_RANK}), got {value}")
    return value


class _NoneChoices(tuple):
    """Choices where ``none`` stands for None (the parsed value of ``_optional_str``)."""

    def __contains__(self, value):
        return tuple.__contains__(self, "none" if value is None else value)


def _choices() -> dict:
    """dest -> argparse choices of the options that name one of a fixed set (one table for
    every command, so train, eval, extract and visualize agree)."""
    from .data import dataset_names
    from .methods import method_names
    from .models.resnet import DEPTHS, STRIDES
    from .models.vit import ARCHS as VIT_ARCHS

    return {"dataset": tuple(dataset_names()), "method": tuple(method_names()),
            "arch": tuple(f"resnet{d}" for d in DEPTHS) + tuple(VIT_ARCHS),
            "ibn": _NoneChoices(("b", "none")), "final_layer": tuple(STRIDES)[1:]}


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (load in the main process) or more, got {value}")
    return value


def _set_choices(parser: argparse.ArgumentParser) -> None:
    """Gives the options of :func:`_choices` their choices where they have none, and ``-j`` a
    non-negative type, so that bad values fail in argparse (and --help lists them)."""
    table = _choices()
    for action in parser._actions:
        if action.dest in table and action.choices is None and action.nargs is None:
            action.choices = table[action.dest]
        if action.dest == "workers" and action.type is int:
            action.type = _non_negative_int


def _optional_int(text: str):
    return None if text.lower() == "none" else _positive_int(text)


def _optional_str(text: str):
    return None if text.lower() == "none" else text


def _method_default(name: str) -> str:
    """Each method's default of option ``name``, for --help: "default: transmatcher 0.005, ..."."""
    from .methods import get_method, method_names

    values = {}
    for method in method_names():
        values.setdefault(str(get_method(method).defaults[name]), []).append(method)
    return "default: " + ", ".join(f"{'/'.join(ms)} {v}" for v, ms in values.items())


def add_train_parser(commands) -> argparse.ArgumentParser:
    from .engine.trainer import AMP_CHOICES, FROM_METHOD, LOSSES, NECK_FEATS, SAMPLERS, SCHEDULES, TrainConfig

    d = TrainConfig()

    def by_method(name: str, text: str = "") -> dict:
        """The default and help of an option whose default is the method's."""
        return {"default": FROM_METHOD, "help": f"{text} ({_method_default(name)})".strip()}

    def non_negative_int(text: str) -> int:
        value = int(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
        return value

    train = commands.add_parser(
        "train", help="train a TransMatcher / QAConv / TransReID model (upstream's recipe)",
        description="Train a method with its upstream recipe (the options marked 'default: "
                    "<method> <value>' take the method's value unless given): transmatcher / qaconv: "
                    "graph sampler, pairwise matching loss, SGD Nesterov, AMP, gradient clipping; "
                    "transreid: P x K sampler, cross-entropy + soft-margin triplet, SGD, warm-up + "
                    "cosine, AMP. A checkpoint is written atomically after every "
                    "epoch to EXP_DIR/checkpoint.pt; --resume continues a killed run. Logs: "
                    "EXP_DIR/log.jsonl and EXP_DIR/tensorboard. A run locks EXP_DIR (EXP_DIR/train.lock "
                    "holds its pid): a second run there fails at once, and a fresh start refuses a "
                    "folder that holds a run unless --overwrite is given. EXP_DIR/config.yaml records "
                    "the resolved options (--config reads it back); --resume may change only epochs, "
                    "max-epochs, max-steps-per-epoch, workers, logging, progress, tensorboard, "
                    "eval-every, the test batch/chunk sizes, device and the data/exp folders (the "
                    "changes are logged), and refuses other differences. Multi-GPU: torchrun "
                    "--nproc_per_node N -m transmatcher_fast.cli train ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--config", help="YAML file of options (keys as below, e.g. batch_size: 32); "
                       "command-line flags override it")
    data = train.add_argument_group("data")
    data.add_argument("-d", "--dataset", default=d.dataset, help="dataset name (see the registry)")
    data.add_argument("--data-dir", default=d.data_dir,
                      help="folder of the dataset, or its parent holding a folder named like --dataset")
    data.add_argument("--height", type=_positive_int, **by_method("height", "input height"))
    data.add_argument("--width", type=_positive_int, **by_method("width", "input width"))
    data.add_argument("-j", "--workers", type=int, default=d.workers, help="data loader workers")
    data.add_argument("--skip-bad-images", dest="skip_bad_images", action=argparse.BooleanOptionalAction,
                      default=d.skip_bad_images,
                      help="decode every training image first and leave the unreadable ones out "
                           "(listed once, and in EXP_DIR/log.jsonl) instead of stopping at the first")
    model = train.add_argument_group("model")
    model.add_argument("--method", "--matcher", dest="method", default=d.method,
                       help="transmatcher, qaconv (fused matchers of feature maps) or transreid (ViT "
                            "embeddings)")
    model.add_argument("-a", "--arch", **by_method("arch", "resnet18/34/50/101/152 or a ViT (vit_base_patch16, "
                       "vit_small_patch16, deit_small_patch16, ...; a ViT feeds the matchers its token map)"))
    model.add_argument("--ibn", type=_optional_str, **by_method("ibn", "'b' (IBN-Net-b) or none"))
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
    model.add_argument("--pretrained", type=_optional_str, default=d.pretrained,
                       help="local backbone weights: torchvision / IBN-Net state_dict, or an ImageNet ViT / "
                            "DeiT / DINO checkpoint (nothing is downloaded)")
    vit = train.add_argument_group("ViT and TransReID")
    vit.add_argument("--stride", type=_positive_int, default=d.stride,
                     help="patch-embedding stride (16: no overlap; 12: TransReID*)")
    vit.add_argument("--sie-camera", dest="sie_camera", action=argparse.BooleanOptionalAction,
                     default=d.sie_camera, help="side information embedding of the camera")
    vit.add_argument("--sie-view", dest="sie_view", action=argparse.BooleanOptionalAction,
                     default=d.sie_view, help="side information embedding of the viewpoint")
    vit.add_argument("--sie-coe", dest="sie_coe", type=float, default=d.sie_coe, help="SIE weight lambda")
    vit.add_argument("--jpm", action=argparse.BooleanOptionalAction, default=d.jpm,
                     help="jigsaw patch module (transreid)")
    vit.add_argument("--shift-num", dest="shift_num", type=_positive_int, default=d.shift_num,
                     help="JPM shift m (moves m-1 patches; 5 persons, 8 vehicles)")
    vit.add_argument("--shuffle-groups", dest="shuffle_groups", type=_positive_int, default=d.shuffle_groups)
    vit.add_argument("--divide-length", dest="divide_length", type=_positive_int, default=d.divide_length,
                     help="JPM local groups k")
    vit.add_argument("--rearrange", action=argparse.BooleanOptionalAction, default=d.rearrange,
                     help="JPM shift + shuffle (off: contiguous groups)")
    vit.add_argument("--drop-path", dest="drop_path", type=float, default=d.drop_path, help="stochastic depth")
    vit.add_argument("--neck-feat", dest="neck_feat", choices=NECK_FEATS, default=d.neck_feat,
                     help="test feature before or after the BNNeck")
    vit.add_argument("--stem-conv", dest="stem_conv", action=argparse.BooleanOptionalAction,
                     default=d.stem_conv, help="TransReID-SSL's IBN convolution stem (ICS)")
    vit.add_argument("--pretrain-hw-ratio", dest="pretrain_hw_ratio", type=_positive_int,
                     default=d.pretrain_hw_ratio,
                     help="height/width ratio of the pre-trained position grid (2: DINO on LUPerson)")
    vit.add_argument("--gem-pooling", dest="gem_pooling", action=argparse.BooleanOptionalAction,
                     default=d.gem_pooling, help="TransReID-SSL: cls + GeM of the patch tokens")
    batches = train.add_argument_group("batches and loss")
    batches.add_argument("--sampler", choices=SAMPLERS, **by_method(
        "sampler", "graph: upstream GS (nearest ids by the current model); pk: every id once per epoch; pk_all: every image once per epoch (TransReID)"))
    batches.add_argument("-b", "--batch-size", dest="batch_size", type=_positive_int, default=d.batch_size)
    batches.add_argument("--num-instances", "--num_instance", "--num_instances", dest="num_instances",
                         type=_positive_int, default=d.num_instances, help="images per identity in a batch")
    batches.add_argument("--loss", choices=LOSSES, **by_method(
        "loss", "pairwise: matching BCE (TransMatcher); triplet: batch-hard (QAConv 2.1); "
        "softmax_triplet: cross-entropy + soft-margin triplet (TransReID)"))
    batches.add_argument("--margin", type=float, default=d.margin, help="triplet margin (matchers)")
    batches.add_argument("--id-loss-weight", dest="id_loss_weight", type=float, default=d.id_loss_weight)
    batches.add_argument("--triplet-loss-weight", dest="triplet_loss_weight", type=float,
                         default=d.triplet_loss_weight)
    batches.add_argument("--label-smoothing", dest="label_smoothing", type=float, default=d.label_smoothing,
                         help="cross-entropy label smoothing (TransReID's configs: off)")
    batches.add_argument("--erasing-p", dest="erasing_p", type=float, default=d.erasing_p,
                         help="TransReID's random erasing probability")
    optim = train.add_argument_group("optimisation")
    optim.add_argument("--lr", type=float, **by_method("lr", "base learning rate"))
    optim.add_argument("--backbone-lr-factor", dest="backbone_lr_factor", type=float,
                       default=d.backbone_lr_factor, help="matchers: backbone lr = lr x this")
    optim.add_argument("--bias-lr-factor", dest="bias_lr_factor", type=float, default=d.bias_lr_factor,
                       help="transreid: bias lr = lr x this")
    optim.add_argument("--momentum", type=float, default=d.momentum,
                       help="SGD momentum (Nesterov for the matchers)")
    optim.add_argument("--weight-decay", dest="weight_decay", type=float, **by_method("weight_decay"))
    optim.add_argument("--epochs", type=_positive_int, **by_method("epochs", "epochs (step, cosine)"))
    optim.add_argument("--schedule", choices=SCHEDULES, **by_method(
        "schedule", "step: x gamma every step-size epochs; adaptive: QAConv 2.1's loss-driven decay; "
        "cosine: linear warm-up then cosine (TransReID)"))
    optim.add_argument("--step-size", "--step_size", dest="step_size", type=_positive_int, default=d.step_size)
    optim.add_argument("--gamma", type=float, default=d.gamma, help="learning-rate decay factor")
    optim.add_argument("--step-factor", dest="step_factor", type=float, default=d.step_factor,
                       help="adaptive: decay when the loss is below this x the second epoch's")
    optim.add_argument("--max-epochs", dest="max_epochs", type=_positive_int, default=d.max_epochs,
                       help="adaptive: the most epochs")
    optim.add_argument("--warmup-epochs", dest="warmup_epochs", type=_positive_int, default=d.warmup_epochs,
                       help="cosine: linear warm-up epochs")
    optim.add_argument("--warmup-factor", dest="warmup_factor", type=float, default=d.warmup_factor,
                       help="cosine: warm-up starts at lr x this")
    optim.add_argument("--lr-min-factor", dest="lr_min_factor", type=float, default=d.lr_min_factor,
                       help="cosine: ends at lr x this")
    optim.add_argument("--schedule-offset", dest="schedule_offset", type=int, default=d.schedule_offset,
                       help="cosine: epoch e runs at lr(e + offset): 1 TransReID, 0 TransReID-SSL")
    optim.add_argument("--clip-value", "--clip_value", dest="clip_value", type=float,
                       **by_method("clip_value", "gradient-norm clip of each part (0: off)"))
    optim.add_argument("--amp", choices=AMP_CHOICES, default=d.amp,
                       help="autocast: auto = fp16 + GradScaler on CUDA, none on CPU; bf16 needs no scaler")
    optim.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction, **by_method(
        "freeze_bn", "keep the feature model's BatchNorm statistics frozen (upstream TransMatcher)"))
    gs = train.add_argument_group("graph sampler matching")
    gs.add_argument("--test-batch", dest="test_batch", type=_positive_int, default=d.test_batch,
                    help="feature extraction batch")
    gs.add_argument("--test-prob-batch", "--test_prob_batch", dest="test_prob_batch", type=_optional_int,
                    default=d.test_prob_batch, help="probe chunk (default 256)")
    gs.add_argument("--test-gal-batch", "--test_gal_batch", dest="test_gal_batch", type=_optional_int,
                    default=d.test_gal_batch, help="gallery chunk (default: from free memory)")
    run = train.add_argument_group("run")
    run.add_argument("--exp-dir", dest="exp_dir", default=d.exp_dir, help="checkpoint and logs folder")
    start = run.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", default=d.resume,
                       help="continue from EXP_DIR/checkpoint.pt; without one it starts from scratch "
                            "if EXP_DIR holds no run (no config.yaml, log.jsonl or tensorboard/ events; so one "
                            "command can start and restart a job), and refuses otherwise")
    start.add_argument("--overwrite", action="store_true", default=d.overwrite,
                       help="start afresh in an EXP_DIR that holds a run: removes its checkpoint.pt, best.pt, "
                            "config.yaml, log.jsonl and tensorboard/ event files (nothing else). Without --resume or "
                            "--overwrite, training refuses a folder that holds a run")
    run.add_argument("--seed", type=int, default=d.seed)
    run.add_argument("--device", type=_optional_str, default=d.device, help="default: cuda[:LOCAL_RANK] if available, else cpu")
    run.add_argument("--log-every", dest="log_every", type=_positive_int, default=d.log_every,
                     help="steps between step records in log.jsonl")
    run.add_argument("--max-steps-per-epoch", dest="max_steps_per_epoch", type=_optional_int,
                     default=d.max_steps_per_epoch, help="cut every epoch short (quick runs)")
    run.add_argument("--eval-every", dest="eval_every", type=non_negative_int, default=d.eval_every,
                     help="epochs between evaluations on the dataset's query/gallery (upstream's "
                          "protocol; 'eval' records in log.jsonl and TensorBoard, best mAP kept as "
                          "EXP_DIR/best.pt); 0: none")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress,
                     help="progress bar")
    run.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=d.tensorboard,
                     help="TensorBoard logs in EXP_DIR/tensorboard")
    train.set_defaults(run=run_train)
    return train


def run_pretrain(args: argparse.Namespace) -> int:

    from .engine import validate
    from .engine.trainer import Trainer, TrainConfig
    from .methods.dino import TEACHER_NAME

    values = {key: value for key, value in vars(args).items() if key not in _NOT_OPTIONS}
    config = TrainConfig.from_dict(values)  # a bad value: ValueError, one line (see main)
    _check_train_paths(config)
    if config.filter_list is not None:
        validate.check_input_file(config.filter_list, "--filter-list")
    try:
        trainer = Trainer(config)
        trainer.fit()
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print(f"{PROG} pretrain: interrupted; {_last_checkpoint(config.exp_dir)}", file=sys.stderr)
        raise SystemExit(130) from None
    if trainer.is_main:
        path = Path(config.exp_dir) / TEACHER_NAME
        print(f"{path} holds the teacher (DINO's layout, written after every epoch): fine-tune with "
              f"transmatcher-fast train --method transreid --pretrained {path} (or --pretrained its checkpoint.pt)")
    trainer.close()
    return 0




def add_pretrain_parser(commands) -> argparse.ArgumentParser:
    """``pretrain``: every option of ``train`` (a private copy of its parser, so that its defaults
    and help can be DINO's without touching train's), the unlabelled data's and DINO's."""
    from .engine.trainer import TrainConfig

    d = TrainConfig(method="dino")
    scratch = argparse.ArgumentParser(add_help=False).add_subparsers()
    pretrain = commands.add_parser(
        "pretrain", parents=[add_train_parser(scratch)], add_help=False,
        help="self-supervised pre-training of a ViT on unlabelled images (DINO, TransReID-SSL)",
        description="DINO self-supervised pre-training (TransReID-SSL's LUPerson recipe): a student "
                    "ViT + DINO head on 2 global and --local-crops local crops per image, an EMA teacher "
                    "on the global ones, AdamW with lr per 256 images, warm-up + cosine per iteration, "
                    "weight decay 0.04 -> 0.4, each parameter's gradient clipped to 3.0, AMP. Data: "
                    "-d images (default) is any folder tree of images under --data-dir (LUPerson: "
                    "--data-dir LUP reads LUP/images); a labelled --dataset's training images work too "
                    "and keep its query/gallery for --eval-every (kNN mAP of the teacher). --filter-list "
                    "(cfs_list.txt of transmatcher-fast cfs, or upstream's CFS_list.pkl) with --keep N or "
                    "--keep-ratio R pre-trains on the top of the list. Checkpoints, --resume, logs, "
                    "TensorBoard and torchrun as train (its options below apply; those of other methods are "
                    "refused or unused); at the end EXP_DIR/teacher.pth holds the teacher in DINO's layout. "
                    "Fine-tune with train --method transreid --pretrained EXP_DIR/teacher.pth "
                    "--pretrain-hw-ratio 2 (the pre-training size's height/width; "
                    "configs/transreid_ssl_*.yaml).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = {"method": "the self-supervised method", "dataset": "images: any folder tree of unlabelled "
             "images; or a labelled dataset (its training images)",
             "lr": "peak learning rate per 256 images: the run uses lr x batch x GPUs / 256",
             "weight_decay": "weight decay at the start (cosine to --weight-decay-end)",
             "epochs": "epochs", "arch": "the ViT (vit_small_patch16, vit_base_patch16, ...)",
             "drop_path": "student's stochastic depth (the teacher has none)",
             "pretrained": "continue from weights: a DINO checkpoint (teacher), checkpoint.pt / teacher.pth "
                           "of pretrain, TransReID-SSL's released ViT or ImageNet weights",
             "batch_size": "images per GPU (upstream 64 x 8 GPUs)"}
    for action in pretrain._actions:  # the copy's actions: train's stay as they are
        if action.dest in helps:
            action.help = helps[action.dest]
        if action.dest == "method":
            action.choices = ("dino",)
    pretrain.set_defaults(method="dino", dataset="images", exp_dir="runs/pretrain", arch=d.arch,
                          height=d.height, width=d.width, lr=d.lr, weight_decay=d.weight_decay,
                          epochs=d.epochs, sampler=d.sampler, loss=d.loss, clip_value=d.clip_value,
                          freeze_bn=d.freeze_bn, schedule=d.schedule, ibn=d.ibn, run=run_pretrain)

    data = pretrain.add_argument_group("unlabelled images: CFS list")
    data.add_argument("--filter-list", "--filter_path", dest="filter_list", type=_optional_str,
                      default=d.filter_list, help="a CFS-ranked list of the images to keep (cfs_list.txt or "
                      "upstream's CFS_list.pkl; names relative to the dataset's folder)")
    data.add_argument("--keep", "--keep-num", "--keep_num", dest="keep_num", type=_optional_int,
                      default=d.keep_num, help="keep the first N of the list (upstream 2508146: 60 %%)")
    data.add_argument("--keep-ratio", dest="keep_ratio", type=float, default=d.keep_ratio,
                      help="keep this fraction of the list (0.6 or 0.5 upstream)")
    dino = pretrain.add_argument_group("DINO")
    dino.add_argument("--out-dim", "--out_dim", dest="dino_out_dim", type=_positive_int, default=d.dino_out_dim,
                      help="DINO head's output width (prototypes)")
    dino.add_argument("--norm-last-layer", dest="dino_norm_last_layer", action=argparse.BooleanOptionalAction,
                      default=d.dino_norm_last_layer, help="weight-normalised last layer with its norm frozen")
    dino.add_argument("--use-bn-in-head", dest="dino_use_bn_in_head", action=argparse.BooleanOptionalAction,
                      default=d.dino_use_bn_in_head, help="BatchNorm in the head's MLP")
    dino.add_argument("--momentum-teacher", dest="dino_momentum_teacher", type=float,
                      default=d.dino_momentum_teacher, help="teacher EMA momentum at the start (cosine to 1)")
    dino.add_argument("--warmup-teacher-temp", dest="dino_warmup_teacher_temp", type=float,
                      default=d.dino_warmup_teacher_temp)
    dino.add_argument("--teacher-temp", dest="dino_teacher_temp", type=float, default=d.dino_teacher_temp)
    dino.add_argument("--warmup-teacher-temp-epochs", dest="dino_warmup_teacher_temp_epochs",
                      type=_non_negative_int, default=d.dino_warmup_teacher_temp_epochs)
    dino.add_argument("--student-temp", dest="dino_student_temp", type=float, default=d.dino_student_temp)
    dino.add_argument("--center-momentum", dest="dino_center_momentum", type=float,
                      default=d.dino_center_momentum, help="momentum of the teacher's centre")
    dino.add_argument("--local-crops", "--local-crops-number", dest="dino_local_crops", type=_non_negative_int,
                      default=d.dino_local_crops, help="local crops per image (besides the 2 global ones)")
    dino.add_argument("--local-height", "--crop-height", dest="dino_local_height", type=_optional_int,
                      default=d.dino_local_height, help="local crop height (default: half the height)")
    dino.add_argument("--local-width", "--crop-width", dest="dino_local_width", type=_optional_int,
                      default=d.dino_local_width, help="local crop width (default: half the width)")
    dino.add_argument("--global-scale", "--global-crops-scale", dest="dino_global_scale", type=float, nargs=2,
                      metavar=("MIN", "MAX"), default=list(d.dino_global_scale),
                      help="area range of the global crops")
    dino.add_argument("--local-scale", "--local-crops-scale", dest="dino_local_scale", type=float, nargs=2,
                      metavar=("MIN", "MAX"), default=list(d.dino_local_scale), help="area range of the local crops")
    dino.add_argument("--dino-warmup-epochs", dest="dino_warmup_epochs", type=_non_negative_int,
                      default=d.dino_warmup_epochs, help="linear learning-rate warm-up from 0 (per iteration)")
    dino.add_argument("--min-lr", dest="dino_min_lr", type=float, default=d.dino_min_lr,
                      help="the cosine's end")
    dino.add_argument("--weight-decay-end", dest="dino_weight_decay_end", type=float,
                      default=d.dino_weight_decay_end)
    dino.add_argument("--clip-grad", dest="dino_clip_grad", type=float, default=d.dino_clip_grad,
                      help="each parameter's gradient norm, on its own (0: off)")
    dino.add_argument("--freeze-last-layer", dest="dino_freeze_last_layer", type=_non_negative_int,
                      default=d.dino_freeze_last_layer, help="epochs during which the head's last layer stays")
    return pretrain


class _ClsToken(nn.Module):
    """A ViT's cls token after the final LayerNorm, ``[B, 3, H, W] -> [B, D]`` (what CFS compares:
    upstream's NECK_FEAT 'before' without JPM; GeM pooling, if the model has it, left out)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit.forward_levels(x, levels=1)[0][:, 0]


def _cfs_proxy(path: str, flag: str, args: argparse.Namespace, device) -> nn.Module:
    """The proxy model of ``path`` for CFS: a checkpoint of ours (pretrain's DINO teacher, or a
    transreid fine-tune without JPM or SIE), or bare weights (pretrain's teacher.pth, upstream's
    DINO checkpoint, TransReID-SSL's released ViT) into ``--arch`` (or the file's own config)."""
    from .engine import validate
    from .engine.evaluate import load_trained
    from .methods.dino import MultiResolutionViT, _read_any
    from .models.vit import VisionTransformer, build_vit, load_pretrained

    validate.check_input_file(path, flag)
    try:
        state = _read_any(path)
    except ValueError as error:
        raise UserError(f"{flag} {error}") from None
    size = (args.height, args.width)
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    if saved and "model" in state and "matcher" in state:  # a run of transmatcher-fast
        model, _, config = load_trained(path)
        vit = getattr(model, "base", model)
        if not isinstance(vit, VisionTransformer):
            raise UserError(f"{flag} {path}: a {config['method']} model of arch {config['arch']}, not a ViT; "
                            "CFS compares ViT cls tokens")
        if config.get("jpm") or config.get("sie_camera") or config.get("sie_view"):
            raise UserError(f"{flag} {path}: trained with JPM or SIE; a CFS proxy is a plain ViT (upstream: "
                            "TransReID-SSL's fine-tuning has neither)")
        if not isinstance(vit, MultiResolutionViT) and tuple(vit.img_size) != size:
            raise UserError(f"--height {size[0]} --width {size[1]}: {flag} {path} was trained at "
                            f"{vit.img_size[0]}x{vit.img_size[1]}; give that size")
    else:
        arch, stem_conv = saved.get("arch", args.arch), saved.get("stem_conv", args.stem_conv)
        vit = build_vit(arch, img_size=size, stem_conv=stem_conv)
        try:
            load_pretrained(vit, path, args.pretrain_hw_ratio)
        except ValueError as error:
            raise UserError(f"{flag} {path}: {error} (the model: --arch {arch}"
                            f"{' --stem-conv' if stem_conv else ''})") from None
    return _ClsToken(vit).to(device).eval()


def run_cfs(args: argparse.Namespace) -> int:
    import json
    import os

    from .data import list_images
    from .engine import cfs, validate

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
    cfs.add_argument("-j", "--workers", type=_non_negative_int, default=2, help="data loader workers")
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


def run_end_to_end_demo(args: argparse.Namespace) -> int:
    from .engine.demo import DemoConfig, run_demo

    values = {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS}
    run_demo(DemoConfig(**values))
    return 0


def add_demo_parser(commands) -> None:
    from .engine.demo import DemoConfig

    d = DemoConfig()
    demo = commands.add_parser(
        "demo", help="end to end: synthetic data, evaluate, train on CPU, evaluate, pictures",
        description="Generate a synthetic person dataset, evaluate an untrained small model of --method "
                    "(TransMatcher: resnet18, neck 64; TransReID: a tiny ViT from scratch), train it for a few "
                    "minutes, evaluate it again, and write the before/after table, the training curve, ranked "
                    "lists and the method's pictures (correspondences; ViT attention maps).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--method", default=d.method,
                      help="transmatcher (resnet18, neck 64), qaconv, or transreid (a tiny ViT with SIE and JPM)")
    demo.add_argument("--out", default=d.out, help="output folder (data, checkpoint, results, pictures)")
    demo.add_argument("--ids", type=_positive_int, default=d.ids, help="identities (half train, half test)")
    demo.add_argument("--cams", type=_positive_int, default=d.cams)
    demo.add_argument("--images-per-cam", dest="images_per_cam", type=_positive_int, default=d.images_per_cam)
    demo.add_argument("--epochs", type=_positive_int, default=d.epochs)
    demo.add_argument("--step-size", dest="step_size", type=_positive_int, default=d.step_size)
    demo.add_argument("-b", "--batch-size", dest="batch_size", type=_positive_int, default=d.batch_size)
    demo.add_argument("--num-instances", dest="num_instances", type=_positive_int, default=d.num_instances)
    demo.add_argument("--lr", type=float, default=d.lr)
    demo.add_argument("--backbone-lr-factor", dest="backbone_lr_factor", type=float, default=d.backbone_lr_factor)
    demo.add_argument("-j", "--workers", type=int, default=d.workers)
    demo.add_argument("--seed", type=int, default=d.seed)
    demo.add_argument("--max-steps-per-epoch", dest="max_steps_per_epoch", type=_optional_int,
                      default=d.max_steps_per_epoch, help="cut epochs short (quick runs)")
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress)
    demo.set_defaults(run=run_end_to_end_demo)


def _load_for_eval(args, with_data: bool = True):
    """(model, matcher, height, width, device) of ``--checkpoint`` and the size flags; the
    options, the data folder (``with_data``) and the checkpoint file are checked first."""
    from .engine import validate
    from .engine.evaluate import load_trained

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
    from .engine.evaluate import default_eval_amp

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
    from .data import build_dataset
    from .engine import validate
    from .engine.trainer import dataset_root

    dataset = build_dataset(args.dataset, dataset_root(args.data_dir, args.dataset))
    validate.check_splits(dataset, splits)
    return dataset


def run_eval(args: argparse.Namespace) -> int:
    from .engine import export, validate
    from .engine.evaluate import evaluate_saved, parse_testsets

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
        for name in names:
            args.dataset = name
            dataset = _dataset(args)
            validate.check_valid_queries(dataset)
            topk = _clamp_topk(args.topk, dataset)
            print(dataset.summary())
            results[name] = _evaluate_dataset(
                model, matcher, dataset, height=height, width=width, batch_size=args.batch_size,
                workers=args.workers, topk=topk, skip_bad_images=args.skip_bad_images,
                checkpoint=args.checkpoint, model_config=args.model_config,
                **{**options, "device": device})
    for name, result in results.items():
        m = result.metrics
        print(_ranks_table(f"{name}{' (re-ranked)' if args.rerank else ''}", m, args.ranks))
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


def _evaluate_dataset(model, matcher, dataset, **options):
    """The dataset's evaluation with the checkpoint's test transform and the dataset's views;
    a dataset with several random test splits (VehicleID: 10) is evaluated on each and its
    metrics averaged (the last split's distances are kept for exports)."""
    from .engine.evaluate import average_metrics, default_eval_amp, eval_transform, evaluate

    transform = eval_transform(options["model_config"], options["height"], options["width"])
    if options.get("amp") is None:  # --amp auto: the method's choice
        options = {**options, "amp": default_eval_amp(options["model_config"])}
    splits = dataset.test_splits() if hasattr(dataset, "test_splits") else [(dataset.query, dataset.gallery)]
    results = []
    for i, (query, gallery) in enumerate(splits):
        if len(splits) > 1:
            print(f"test split {i + 1}/{len(splits)}")
        results.append(evaluate(model, matcher, query, gallery, dataset=dataset, transform=transform,
                                query_views=_views(dataset, query), gallery_views=_views(dataset, gallery),
                                **options))
    if len(results) > 1:
        results[-1].metrics = average_metrics([r.metrics for r in results])
    return results[-1]


def _views(dataset, items):
    """The viewpoint labels of ``items`` (None for datasets without them)."""
    views_of = getattr(dataset, "views_of", None)
    return views_of(items) if views_of is not None else None


def _export(args, results) -> None:
    """--save-matrix and --save-ranked of each evaluation (one test set: the given path; several:
    the path with the test set's name before the suffix)."""
    from .engine import export

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


EVAL_AMP_CHOICES = ("auto", "bf16", "fp16", "fp32", "none")
# The CMC is measured to this rank (engine.metrics.RankingMetrics' max_rank).
MAX_RANK = 50


def _ranks_table(name: str, m: dict, ranks: Sequence[int]) -> str:
    """A Markdown table of the chosen CMC ranks, mAP and mINP (in %); a rank the evaluation did
    not measure (beyond top-k) is n/a."""
    cmc = m.get("cmc") or []
    values = [cmc[r - 1] if r <= len(cmc) else None for r in ranks] + [m.get("mAP"), m.get("mINP")]
    heads = [f"Rank-{r}" for r in ranks] + ["mAP" if not m.get("topk") else f"mAP (AP@{m['topk']})", "mINP"]
    cells = ["n/a" if v is None else f"{100 * v:.1f}" for v in values]
    return "\n".join(["| model | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads),
                      f"| {name} | " + " | ".join(cells) + " |"])


def _evaluation_notes(m: dict):
    """What the table does not say: queries left out, and what top-k mode measures."""
    skipped, counted = m.get("num_skipped", 0), m.get("num_queries", 0)
    if skipped:
        yield (f"note: {skipped} of {skipped + counted} queries were skipped: no gallery image of "
               "their identity from another camera (the protocol ignores same-camera matches)")
    if m.get("topk"):
        yield (f"note: top-k mode (--topk {m['topk']}): mAP is AP@{m['topk']} and mINP is measured "
               f"within the top {m['topk']}; ranks above {m['topk']} are n/a")


def run_extract(args: argparse.Namespace) -> int:
    from .engine import export
    from .engine.evaluate import extract

    from .engine import validate

    from .engine.evaluate import eval_transform

    validate.check_output_file(args.out, "--out")
    model, _, height, width, device = _load_for_eval(args)
    dataset = _dataset(args, (args.split,))
    items = getattr(dataset, args.split)
    features = extract(model, items, height=height, width=width, batch_size=args.batch_size,
                       workers=args.workers, device=device, amp=_eval_amp(args), progress=args.progress,
                       skip_bad_images=args.skip_bad_images,
                       transform=eval_transform(args.model_config, height, width),
                       views=_views(dataset, items))
    record = export.provenance(model_config={**args.model_config, "height": height, "width": width},
                               checkpoint=args.checkpoint,
                               dataset={**export.dataset_info(dataset), "split": args.split})
    export.save_features(args.out, features, items, provenance_record=record)
    print(f"wrote {tuple(features.features.shape)} {features.features.dtype} features of "
          f"{len(features)} {args.split} images to {args.out}")
    return 0


def run_visualize(args: argparse.Namespace) -> int:

    from .engine import attention_pictures, visualize
    from .engine.demo import save_query_correspondences
    from .engine.evaluate import eval_transform

    from .engine import validate

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
        result = _evaluate_dataset(model, matcher, dataset, height=height, width=width,
                                   batch_size=args.batch_size, workers=args.workers, device=device,
                                   amp=_eval_amp(args), progress=args.progress,
                                   model_config=args.model_config)
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
                views=_views(dataset, items), indices=picked, keep=args.attention_keep,
                camera_base=dataset.camera_base)
            if args.compare_checkpoint:
                written += _attention_comparison(args, model, height, width, items, picked, dataset, out)
    print(f"wrote {len(written)} pictures under {out}")
    return 0


def _attention_comparison(args, model, height, width, items, picked, dataset, out):
    """--checkpoint's and --compare-checkpoint's attention side by side (e.g. DINO pre-trained
    vs fine-tuned), each model with its own test transform, DINO's 60 % view by default."""
    from .engine import attention_pictures, validate
    from .engine.evaluate import eval_transform, load_trained

    validate.read_checkpoint(args.compare_checkpoint)
    other, _, other_config = load_trained(args.compare_checkpoint, next(model.parameters()).device)
    if not attention_pictures.draws_attention(other):
        raise UserError(f"--compare-checkpoint {args.compare_checkpoint}: its model is not a ViT (no attention maps)")
    models = {
        Path(args.checkpoint).parent.name or "checkpoint": (model, eval_transform(args.model_config, height, width)),
        Path(args.compare_checkpoint).parent.name or "compared": (
            other, eval_transform(other_config, other_config.get("height", height), other_config.get("width", width)))}
    return attention_pictures.save_attention_comparison(
        out / "attention", models, items, views=_views(dataset, items), indices=picked,
        keep=args.attention_keep if args.attention_keep is not None else 0.6)


def _add_model_and_data(parser, checkpoint_required: bool = True) -> None:
    parser.add_argument("--checkpoint", required=checkpoint_required,
                        help="checkpoint.pt of transmatcher-fast train, or upstream's checkpoint.pth.tar")
    parser.add_argument("-d", "--dataset", default="market1501")
    parser.add_argument("--data-dir", default="data",
                        help="folder of the dataset, or its parent holding a folder named like --dataset")
    parser.add_argument("--height", type=_optional_int, default=None, help="input height (default: the checkpoint's)")
    parser.add_argument("--width", type=_optional_int, default=None, help="input width (default: the checkpoint's)")
    parser.add_argument("-b", "--batch-size", dest="batch_size", type=_positive_int, default=128,
                        help="feature extraction batch")
    parser.add_argument("-j", "--workers", type=_non_negative_int, default=2, help="data loader workers")
    parser.add_argument("--device", type=_optional_str, default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--amp", choices=EVAL_AMP_CHOICES, default="auto",
                        help="autocast dtype; auto: bf16 on CUDA, none on CPU")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def _add_skip_bad_images(parser) -> None:
    parser.add_argument("--skip-bad-images", dest="skip_bad_images", action="store_true",
                        help="leave unreadable images out (listed) instead of stopping at the first")


def add_eval_parsers(commands) -> None:
    from .engine.metrics import PROTOCOLS

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

    extraction = commands.add_parser("extract", help="write the features of a split", formatter_class=fmt)
    _add_model_and_data(extraction)
    extraction.add_argument("--split", choices=("query", "gallery", "train"), default="query")
    extraction.add_argument("--out", required=True,
                            help="output .pt (features, pids, cams, paths, provenance; eval --query-features reads it)")
    _add_skip_bad_images(extraction)
    extraction.set_defaults(run=run_extract)

    pictures = commands.add_parser("visualize", help="ranked lists, correspondences, ViT attention maps, training curves",
                                   formatter_class=fmt)
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


class _Parser(argparse.ArgumentParser):
    """argparse with a two-line error (what is wrong; where the help is) instead of the whole
    usage; the subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message}\nsee: {self.prog} --help\n")


def _debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv


def _apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  argv: Sequence[str]) -> argparse.Namespace:
    """YAML values of ``--config`` become the defaults; flags on the command line still win."""
    values = load_config(args.config)
    subparser = parser.commands[args.command]
    known = {action.dest for action in subparser._actions}
    if args.command in ("train", "pretrain"):
        values = _drop_other_commands_defaults(values, known, args)
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"--config {args.config}: unknown options {unknown}")
    subparser.set_defaults(**_typed_config(subparser, values, args.config))
    return parser.parse_args(argv)


def _drop_other_commands_defaults(values: dict, known: set, args) -> dict:
    """A run's config.yaml holds every training option; those without a flag in this command
    (DINO's in a ``train`` run) are dropped where they hold their default, and refused where
    they do not (they would be ignored)."""
    import dataclasses

    from .engine.trainer import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    other = {k for k in values if k not in known and k in defaults}
    def plain(v):  # YAML has lists where the defaults have tuples
        return list(v) if isinstance(v, (list, tuple)) else v

    changed = sorted(k for k in other if plain(values[k]) != plain(defaults[k]))
    if changed:
        raise UserError(f"--config {args.config}: {changed} are not options of {args.command} "
                        f"(set them with the command that has them)")
    return {k: v for k, v in values.items() if k not in other}


def _typed_config(parser: argparse.ArgumentParser, values: dict, path: str) -> dict:
    """YAML values through the same type and choices as their flags: ``lr: 1e-3`` is a float,
    ``arch: resnet9`` an error, and a flag like ``--freeze-bn`` takes a real boolean
    (true/false, yes/no, on/off, 1/0, any case); anything else is an error naming the file and
    the key, never a truthy string."""
    from .engine.validate import parse_bool

    actions = {action.dest: action for action in parser._actions}
    typed = {}
    for key, value in values.items():
        action = actions[key]
        where = f"--config {path}: {key}"
        if action.nargs == 0:  # a flag: store_true / store_false / --x/--no-x
            try:
                typed[key] = parse_bool(value, where)
            except ValueError as error:
                raise UserError(str(error)) from None
            continue
        many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
        items = value if many and isinstance(value, list) else [value]
        if not many and isinstance(value, (list, dict)):
            raise UserError(f"{where}: expects one value, got {value!r}")
        converted = []
        for item in items:
            if isinstance(item, bool) or isinstance(item, (list, dict)):
                raise UserError(f"{where}: expects a value like its flag --{key.replace('_', '-')}, got {item!r}")
            if item is None:  # YAML null: unset, as the flag's "none"
                converted.append(None)
                continue
            text = str(item)
            try:
                result = action.type(text) if action.type is not None else text
            except (argparse.ArgumentTypeError, TypeError, ValueError) as error:
                raise UserError(f"{where}: invalid value {item!r} ({error})") from None
            if action.choices is not None and result not in action.choices:
                raise UserError(f"{where}: invalid choice {item!r} (choose from "
                                f"{', '.join(map(str, action.choices))})")
            converted.append(result)
        typed[key] = converted if many else converted[0]
    return typed


def _warnings_as_notes(where: str):
    """A ``warnings.showwarning`` that prints a warning as the command's own one-line note,
    ``transmatcher-fast <command>: note: <first line>``, without the source path and line."""
    def show(message, category, filename, lineno, file=None, line=None):
        text = (str(message).strip().splitlines() or [category.__name__])[0]
        print(f"{where}: note: {text}", file=sys.stderr if file is None else file)
    return show


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line. Bad input ends in one or two lines on stderr, ``transmatcher-fast
    <command>: <message>``, and exit status 1 (2 for a malformed command line); anything
    unexpected in a one-line summary; ``--debug`` shows the traceback instead. Ctrl-C exits 130.
    Warnings print as one-line notes (with their source only under ``--debug``)."""
    from .engine.validate import error_message, is_user_error

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    parser = build_parser()
    command = next((a for a in argv if a in parser.commands), None)
    where = f"{PROG} {command}" if command else PROG
    shown_before = warnings.showwarning
    if not debug:
        warnings.showwarning = _warnings_as_notes(where)
    try:
        args = parser.parse_args(argv)
        where = f"{PROG} {args.command}"
        if getattr(args, "config", None):
            args = _apply_config(parser, args, argv)
        return args.run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{where}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        if debug:
            raise
        if is_user_error(error):
            raise SystemExit(f"{where}: {error_message(error)}") from None
        first = (str(error).strip().splitlines() or [""])[0][:300]
        raise SystemExit(f"{where}: unexpected {type(error).__name__}: {first}\n"
                         "run with --debug for the traceback") from None
    finally:
        warnings.showwarning = shown_before


if __name__ == "__main__":
    sys.exit(main())
