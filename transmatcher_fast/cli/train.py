"""``train``: a method with its upstream recipe; also the training entry that ``pretrain``
shares (checks, the Trainer's run, Ctrl-C with where to continue)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .common import _NOT_OPTIONS, PROG


def train_entry(args: argparse.Namespace, command: str, check=None, finished=None) -> int:
    """The one training entry of ``train`` and ``pretrain``: the options into a TrainConfig, the
    paths checked (``check(config)``: the command's own), the Trainer's run, Ctrl-C answered with
    where to continue; ``finished(trainer, config)`` runs after a complete fit."""
    from ..engine.trainer import Trainer, TrainConfig

    values = {key: value for key, value in vars(args).items() if key not in _NOT_OPTIONS}
    config = TrainConfig.from_dict(values)  # a bad value: ValueError, one line (see main)
    _check_train_paths(config)
    if check is not None:
        check(config)
    try:
        trainer = Trainer(config)  # RunDirError: the folder is in use or holds a run
        trainer.fit()
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print(f"{PROG} {command}: interrupted; {_last_checkpoint(config.exp_dir)}", file=sys.stderr)
        raise SystemExit(130) from None
    if finished is not None:
        finished(trainer, config)
    trainer.close()
    return 0


def run_train(args: argparse.Namespace) -> int:
    return train_entry(args, "train")


def _last_checkpoint(exp_dir) -> str:
    """What a run interrupted in ``exp_dir`` can continue from, for the console."""
    from pathlib import Path

    from ..engine.rundir import CHECKPOINT_NAME
    from ..weights_io import load

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
    from ..engine import validate

    validate.check_device(config.device)
    validate.check_data_dir(config.data_dir, config.dataset)
    validate.check_output_dir(config.exp_dir, "--exp-dir")
    if config.pretrained is not None:
        validate.check_input_file(config.pretrained, "--pretrained")
    if config.init_from and not config.resume:  # (a resumed run continues from its own checkpoint)
        validate.read_checkpoint(config.init_from, "--init-from")
    if config.workers < 0:
        raise validate.UserError(f"-j/--workers {config.workers}: must be 0 (load in the main process) or more")


def _method_default(name: str) -> str:
    """Each method's default of option ``name``, for --help: "default: transmatcher 0.005, ..."."""
    from ..methods import get_method, method_names

    values = {}
    for method in method_names():
        values.setdefault(str(get_method(method).defaults[name]), []).append(method)
    return "default: " + ", ".join(f"{'/'.join(ms)} {v}" for v, ms in values.items())


# The --method help of train (pretrain has its own).
METHOD_HELP = "transmatcher, qaconv (fused matchers of feature maps) or transreid (ViT embeddings)"


def add_training_options(parser: argparse.ArgumentParser, command: str) -> None:
    """The training options' flags, generated from TrainConfig's fields (help, types, choices
    beside each field): the engine's groups, then those of the options of the methods that
    ``command`` trains (``Method.command``); an option whose default is the method's says each
    method's value in its help. ``--config`` (a YAML file of them) comes first."""
    from ..engine.config import TRAIN_GROUPS, TrainConfig
    from ..methods import METHOD_DEFAULTED, get_method, method_names
    from ..options import add_arguments

    parser.add_argument("--config", help="YAML file of options (keys as below, e.g. batch_size: 32); "
                        "command-line flags override it")

    groups = list(TRAIN_GROUPS)
    for name in method_names():
        method = get_method(name)
        if method.command == command and method.options is not None:
            groups += [f.metadata["group"] for f in dataclasses.fields(method.options)]
    groups = list(dict.fromkeys(groups))
    add_arguments(parser, dataclasses.fields(TrainConfig), groups,
                  help_suffix=lambda name: _method_default(name) if name in METHOD_DEFAULTED else None)


def add_train_parser(commands) -> argparse.ArgumentParser:
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
    add_training_options(train, "train")
    for action in train._actions:
        if action.dest == "method":
            action.help = METHOD_HELP
    train.set_defaults(run=run_train)
    return train
