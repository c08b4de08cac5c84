"""The training configuration: the engine's options, the methods' options, and the resume rule.

:class:`EngineOptions` holds everything about a run that is not a method's (data, batches,
optimisation and schedule, AMP, evaluation during training, the run folder, seed, workers). The
feature model's options (:class:`~..methods.ModelOptions`) and each method's own options dataclass
(``Method.options``) are declared beside their method. :class:`TrainConfig` holds all of them as
flat fields, as ``config.yaml`` and checkpoints record them; its checks are the fields' declared
ones (:mod:`..options`), then what the method refuses (``Method.check``).

The command line's flags, the ``--config`` YAML typing and the resume rule are generated from the
same fields: a resume may change the options marked ``resume_may_change``
(:data:`RESUME_MAY_CHANGE`: how long to train, how the run is watched, how much memory the
matching takes and where things are) and refuses any other difference from the checkpoint's
configuration (:class:`ResumeConfigError`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from .. import options
from ..methods import DEFAULT_METHOD, FROM_METHOD, METHOD_DEFAULTED, all_losses, get_method, option_classes
from ..methods.schedules import SCHEDULES
from ..options import (non_negative, non_negative_int, non_negative_int_arg, option, optional_positive_int_arg,
                       optional_str_arg, positive_int, positive_int_arg)
from . import rundir

SAMPLERS = ("graph", "pk", "pk_all", "random")
AMP_CHOICES = ("auto", "none", "fp16", "bf16")
CONFIG_NAME = rundir.CONFIG_NAME

_DATA, _MODEL, _BATCHES, _OPTIM = "data", "model", "batches and loss", "optimisation"
_MATCHING, _RUN = "graph sampler matching", "run"
# The help groups of the training options, in --help order (DINO's are pretrain's own).
TRAIN_GROUPS = (_DATA, _MODEL, "ViT and TransReID", _BATCHES, _OPTIM, _MATCHING, _RUN)


@dataclass
class EngineOptions:
    """The options of a run that are not a method's. Those of :data:`~..methods.METHOD_DEFAULTED`
    default to the method's recipe (``FROM_METHOD``, resolved by :class:`TrainConfig`); the
    others are upstream TransMatcher's or TransReID's."""
    method: str = option(DEFAULT_METHOD, flags=("--method", "--matcher"), group=_MODEL, renamed_from=("matcher",),
                         help="the method (one of the methods' registry)")
    # data
    dataset: str = option("market1501", flags=("-d", "--dataset"), group=_DATA,
                          help="dataset name (see the registry)")
    data_dir: str = option("data", group=_DATA, resume_may_change=True,
                           help="folder of the dataset, or its parent holding a folder named like --dataset")
    height: Any = option(FROM_METHOD, group=_DATA, type=positive_int_arg, check=positive_int, help="input height")
    width: Any = option(FROM_METHOD, group=_DATA, type=positive_int_arg, check=positive_int, help="input width")
    workers: int = option(4, flags=("-j", "--workers"), group=_DATA, type=int, resume_may_change=True,
                          help="data loader workers")
    skip_bad_images: bool = option(  # check every training image first; leave unreadable ones out
        False, group=_DATA, switch="pair",
        help="decode every training image first and leave the unreadable ones out (listed once, and in "
             "EXP_DIR/log.jsonl) instead of stopping at the first")
    # batches and loss
    sampler: Any = option(
        FROM_METHOD, group=_BATCHES, choices=SAMPLERS,
        help="graph: upstream GS (nearest ids by the current model); pk: every id once per epoch; pk_all: "
             "every image once per epoch (TransReID)")
    batch_size: int = option(64, flags=("-b", "--batch-size"), group=_BATCHES, type=positive_int_arg,
                             check=positive_int)
    num_instances: int = option(4, flags=("--num-instances", "--num_instance", "--num_instances"),
                                group=_BATCHES, type=positive_int_arg, check=positive_int,
                                help="images per identity in a batch")
    loss: Any = option(FROM_METHOD, group=_BATCHES, choices=all_losses(),
                       help="pairwise: matching BCE (TransMatcher); triplet: batch-hard (QAConv 2.1); "
                            "softmax_triplet: cross-entropy + soft-margin triplet (TransReID)")
    # optimisation
    lr: Any = option(FROM_METHOD, group=_OPTIM, type=float, check=non_negative, help="base learning rate")
    momentum: float = option(0.9, group=_OPTIM, type=float, help="SGD momentum (Nesterov for the matchers)")
    weight_decay: Any = option(FROM_METHOD, group=_OPTIM, type=float)
    epochs: Any = option(FROM_METHOD, group=_OPTIM, type=positive_int_arg, check=positive_int,
                         resume_may_change=True, help="epochs (step, cosine)")
    schedule: Any = option(
        FROM_METHOD, group=_OPTIM, choices=SCHEDULES,
        help="step: x gamma every step-size epochs; adaptive: QAConv 2.1's loss-driven decay; cosine: linear "
             "warm-up then cosine (TransReID)")
    step_size: int = option(10, flags=("--step-size", "--step_size"), group=_OPTIM, type=positive_int_arg,
                            check=positive_int)
    gamma: float = option(0.1, group=_OPTIM, type=float, help="learning-rate decay factor")
    step_factor: float = option(0.7, group=_OPTIM, type=float,
                                help="adaptive: decay when the loss is below this x the second epoch's")
    max_epochs: int = option(60, group=_OPTIM, type=positive_int_arg, check=positive_int,
                             resume_may_change=True, help="adaptive: the most epochs")
    warmup_epochs: int = option(5, group=_OPTIM, type=positive_int_arg, check=positive_int,
                                help="cosine: linear warm-up epochs")
    warmup_factor: float = option(0.01, group=_OPTIM, type=float, check=non_negative,
                                  help="cosine: warm-up starts at lr x this")
    lr_min_factor: float = option(0.002, group=_OPTIM, type=float, check=non_negative,
                                  help="cosine: ends at lr x this")
    schedule_offset: int = option(  # cosine: epoch e runs at lr(e + offset) (TransReID 1, SSL 0)
        1, group=_OPTIM, type=int, check=non_negative,
        help="cosine: epoch e runs at lr(e + offset): 1 TransReID, 0 TransReID-SSL")
    clip_value: Any = option(FROM_METHOD, flags=("--clip-value", "--clip_value"), group=_OPTIM, type=float,
                             check=non_negative, help="gradient-norm clip of each part (0: off)")
    amp: str = option("auto", group=_OPTIM, choices=AMP_CHOICES,
                      help="autocast: auto = fp16 + GradScaler on CUDA, none on CPU; bf16 needs no scaler")
    freeze_bn: Any = option(FROM_METHOD, group=_OPTIM, switch="pair",
                            help="keep the feature model's BatchNorm statistics frozen (upstream TransMatcher)")
    # graph sampler matching (upstream's --test_prob_batch / --test_gal_batch)
    test_batch: int = option(64, group=_MATCHING, type=positive_int_arg, check=positive_int,
                             resume_may_change=True, help="feature extraction batch")
    test_prob_batch: Optional[int] = option(None, flags=("--test-prob-batch", "--test_prob_batch"),
                                            group=_MATCHING, type=optional_positive_int_arg,
                                            resume_may_change=True, help="probe chunk (default 256)")
    test_gal_batch: Optional[int] = option(None, flags=("--test-gal-batch", "--test_gal_batch"),
                                           group=_MATCHING, type=optional_positive_int_arg,
                                           resume_may_change=True, help="gallery chunk (default: from free memory)")
    # the run
    exp_dir: str = option("runs/train", group=_RUN, resume_may_change=True, help="checkpoint and logs folder")
    resume: bool = option(
        False, group=_RUN, switch="on", exclusive="start", start=True,
        help="continue from EXP_DIR/checkpoint.pt; without one it starts from scratch if EXP_DIR holds no "
             "run (no config.yaml, log.jsonl or tensorboard/ events; so one command can start and restart "
             "a job), and refuses otherwise")
    overwrite: bool = option(  # start afresh in an exp_dir that holds a run, removing its files
        False, group=_RUN, switch="on", exclusive="start", start=True,
        help="start afresh in an EXP_DIR that holds a run: removes its checkpoint.pt, best.pt, config.yaml, "
             "log.jsonl and tensorboard/ event files (nothing else). Without --resume or --overwrite, "
             "training refuses a folder that holds a run")
    init_from: Optional[str] = option(
        None, flags=("--init-from",), group=_MODEL, type=optional_str_arg, metavar="CKPT",
        resume_may_change=True,  # a resumed run continues from its own checkpoint
        help="start from the weights of a trained model (a checkpoint of train, or upstream's TransMatcher / "
             "QAConv checkpoint.pth.tar): a new classifier when the identity count differs, a new "
             "optimizer and schedule; a model of another architecture is refused")
    seed: int = option(0, group=_RUN, type=int)
    device: Optional[str] = option(None, group=_RUN, type=optional_str_arg, resume_may_change=True,
                                   help="default: cuda[:LOCAL_RANK] if available, else cpu")
    log_every: int = option(10, group=_RUN, type=positive_int_arg, check=positive_int, resume_may_change=True,
                            help="steps between step records in log.jsonl")
    max_steps_per_epoch: Optional[int] = option(None, group=_RUN, type=optional_positive_int_arg,
                                                resume_may_change=True, help="cut every epoch short (quick runs)")
    eval_every: int = option(  # epochs between evaluations on query/gallery (0: none)
        0, group=_RUN, type=non_negative_int_arg, check=non_negative_int, resume_may_change=True,
        help="epochs between evaluations on the dataset's query/gallery (upstream's protocol; 'eval' "
             "records in log.jsonl and TensorBoard, best mAP kept as EXP_DIR/best.pt); 0: none")
    progress: bool = option(True, group=_RUN, switch="pair", resume_may_change=True, help="progress bar")
    tensorboard: bool = option(True, group=_RUN, switch="pair", resume_may_change=True,
                               help="TensorBoard logs in EXP_DIR/tensorboard")


OPTION_CLASSES = (EngineOptions, *option_classes())


def _train_config_fields() -> List[tuple]:
    """The fields of every class of :data:`OPTION_CLASSES`, in order; a name declared twice is
    an error (the flat config.yaml has one value per name)."""
    owner: Dict[str, type] = {}
    fields = []
    for cls in OPTION_CLASSES:
        for field in dataclasses.fields(cls):
            if field.name in owner:
                raise TypeError(f"option {field.name!r} is declared by both {owner[field.name].__name__} "
                                f"and {cls.__name__}")
            owner[field.name] = cls
            fields.append((field.name, field.type, options.copy_field(field)))
    return fields


def _post_init(self) -> None:
    method = get_method(self.method)
    for name in METHOD_DEFAULTED:
        if getattr(self, name) is FROM_METHOD:
            setattr(self, name, method.defaults[name])
    options.check_values(self)
    if self.sampler != "random" and self.batch_size % self.num_instances:
        raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of num_instances "
                         f"({self.num_instances})")
    if self.resume and self.overwrite:
        raise ValueError("resume (continue the run in exp_dir) and overwrite (replace it) exclude each other")
    for cls in OPTION_CLASSES:
        check_together = getattr(cls, "check_together", None)
        if check_together is not None:
            check_together(self)
    method.check(self)


def _from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
    """From a mapping of option: value (unknown names refused; older names upgraded)."""
    return options.from_flat(cls, values, "training options")


# Every training option, flat (``config.method``, ``config.lr``, ``config.dino_out_dim``, ...).
TrainConfig = dataclasses.make_dataclass(
    "TrainConfig", _train_config_fields(),
    namespace={"__post_init__": _post_init, "from_dict": classmethod(_from_dict),
               "__doc__": "Every training option: the fields of :data:`OPTION_CLASSES`, flat. The "
                          "options of METHOD_DEFAULTED take the method's value unless given; the "
                          "fields' checks, then the method's, run at construction (ValueError)."})
TrainConfig.__module__ = __name__

RESUME_MAY_CHANGE = options.resume_may_change(TrainConfig)
# How a run starts, not what it is: never compared, never recorded.
_START_OPTIONS = frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("start"))


def upgrade_options(values: Dict[str, Any]) -> Dict[str, Any]:
    """Options as an older version wrote them, renamed (``matcher`` is now ``method``)."""
    return options.upgrade(TrainConfig, values)


class ResumeConfigError(rundir.RunDirError, ValueError):
    """``--resume`` with options that differ from the checkpoint's where they may not; ``str`` is
    one line naming each differing option with the checkpoint's value and the given one."""


def resume_changes(saved: Dict[str, Any], config: Any) -> Dict[str, List[Any]]:
    """``{option: [checkpoint's value, given value]}`` for every option that differs, the start
    options excepted. An option the checkpoint lacks (written by an older version) counts as
    its default."""
    saved = upgrade_options(saved)
    defaults = TrainConfig(method=saved.get("method", DEFAULT_METHOD))
    return options.changes(saved, config, defaults)


def check_resume(saved: Dict[str, Any], config: Any, folder: Any = "") -> Dict[str, List[Any]]:
    """The changes of :func:`resume_changes`, once all of them are in :data:`RESUME_MAY_CHANGE`;
    raises :class:`ResumeConfigError` otherwise."""
    changes = resume_changes(saved, config)
    refused = {k: v for k, v in changes.items() if k not in RESUME_MAY_CHANGE}
    if refused:
        listed = ", ".join(f"{k.replace('_', '-')} (checkpoint {old!r}, given {new!r})"
                           for k, (old, new) in sorted(refused.items()))
        raise ResumeConfigError(
            f"--resume in {folder}: the checkpoint was trained with other options: {listed}; give "
            f"the checkpoint's values (they are in {Path(str(folder)) / CONFIG_NAME}), or start "
            f"afresh with --overwrite or another --exp-dir (only "
            f"{', '.join(sorted(o.replace('_', '-') for o in RESUME_MAY_CHANGE))} may change)")
    return changes
