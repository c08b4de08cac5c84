"""The seam between the engine and a re-ID method.

A :class:`Method` says how its model is built, which loss, parameter groups and optimizer train
it, which augmentation feeds it, and how its images become comparable. The engine (training
loop, AMP, checkpoints and exact resume, DDP, logging, evaluation protocol, exports, pictures)
calls only what is defined here and never asks which method it runs.

What a method builds is a dict of *parts*, saved in a checkpoint under their names:

- ``"model"``: images -> features, ``model(images)`` in eval mode; with ``model.side_info``
  true it is called ``model(images, cam_label=cams, view_label=views)``;
- ``"matcher"``: the comparer of two sets of features (``project`` / ``score_projected`` /
  ``bytes_per_pair``, optionally ``distance``; see ``engine.matching``): a fused matcher
  (TransMatcher, QAConv) or embedding distances;
- any other trained state the method needs (none of ours yet).

The training step (:meth:`Method.step_module`) is one ``nn.Module`` holding every trained part,
so DistributedDataParallel synchronises all of them: ``forward(images, pids, cams, views)``
returns ``(loss [r], acc [r])`` rows; the engine averages the finite ones. Work of its own around
the optimizer step (DINO: gradient clipping, a frozen layer, a teacher's EMA) is a
:class:`TrainingHook` the method supplies (:meth:`Method.training_hooks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ..data import build_dataset, build_test_transform, build_train_transform, dataset_root, make_loader
from ..models.transreid import NECK_FEATS
from ..options import non_negative, option, optional_str_arg, positive_int, positive_int_arg

Parts = Dict[str, nn.Module]

# The method of a configuration that names none (and the CLI's default).
DEFAULT_METHOD = "transmatcher"

# The options whose default is the method's (TrainConfig fills them from Method.defaults).
METHOD_DEFAULTED = ("arch", "ibn", "height", "width", "lr", "weight_decay", "epochs", "sampler",
                    "loss", "clip_value", "freeze_bn", "schedule")


class TrainingHook:
    """Work at fixed points of the training loop; every point does nothing unless overridden.
    The engine's hooks and the methods' derive from it; ``engine.hooks`` says when each point
    is called and in which order the hooks run. ``epoch`` counts from 0 (the log's "epoch 1" is
    epoch 0 here); ``progress`` in [0, 1) is ``iteration / total_iterations`` of the step
    (0-based: the fraction of training done before it)."""

    def before_train(self) -> None:
        """Once, when training starts (after a resume has restored the state, for every hook
        after the engine's run-folder hook)."""

    def after_backward(self, epoch: int, progress: float) -> None:
        """Every step, after the backward pass (gradients unscaled under AMP), before the
        optimizer step."""

    def after_optimizer_step(self, epoch: int, progress: float) -> None:
        """Every step, after the optimizer step."""

    def after_step(self, iteration: int, record: Dict[str, Any]) -> None:
        """Every step, with its ``"step"`` record; ``iteration`` counts the epoch's steps from 0."""

    def after_epoch(self, epoch: int, record: Dict[str, Any]) -> None:
        """After every epoch, with its ``"epoch"`` record."""

    def after_train(self) -> None:
        """Once, when training ends or raises (the hooks in reverse order)."""

    def state_dict(self) -> Dict[str, Any]:
        """What a method's hook carries from step to step (tensors and plain values): saved in
        every checkpoint and given back on resume, so that a resumed run repeats its epoch
        exactly. Empty for a hook that keeps nothing."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` gave."""


class _FromMethod:
    """The default of an option of :data:`METHOD_DEFAULTED`: the method's value."""

    def __repr__(self) -> str:
        return "the method's"


FROM_METHOD = _FromMethod()

MODEL, VIT = "model", "ViT and TransReID"  # their help groups


@dataclass
class ModelOptions:
    """The feature model's options, shared by the methods (a ResNet with the matchers' neck and
    encoder, or a ViT: TransReID's, or its token map for the matchers); each method uses those
    that concern its model. Upstream TransMatcher's and TransReID's values."""
    arch: Any = option(FROM_METHOD, flags=("-a", "--arch"), group=MODEL,
                       help="resnet18/34/50/101/152 or a ViT (vit_base_patch16, vit_small_patch16, "
                            "deit_small_patch16, ...; a ViT feeds the matchers its token map)")
    ibn: Any = option(FROM_METHOD, group=MODEL, type=optional_str_arg, help="'b' (IBN-Net-b) or none")
    final_layer: str = option("layer3", flags=("--final-layer", "--final_layer"), group=MODEL,
                              help="last backbone stage: layer2, layer3 or layer4")
    neck: Optional[int] = option(None, group=MODEL, type=int,
                                 help="neck channels = d_model (default 512 TransMatcher, 128 QAConv)")
    nhead: int = option(1, group=MODEL, type=positive_int_arg, help="encoder heads")
    num_trans_layers: int = option(3, flags=("--num-trans-layers", "--num_trans_layers"), group=MODEL,
                                   type=positive_int_arg, help="N: N-1 encoder layers and N decoder layers")
    dim_feedforward: int = option(2048, flags=("--dim-feedforward", "--dim_feedforward"), group=MODEL,
                                  type=positive_int_arg, help="encoder FFN and decoder MLP width")
    dropout: float = option(0.0, group=MODEL, type=float, help="encoder dropout")
    pretrained: Optional[str] = option(
        None, group=MODEL, type=optional_str_arg,
        help="local backbone weights: torchvision / IBN-Net state_dict, or an ImageNet ViT / DeiT / DINO "
             "checkpoint (nothing is downloaded)")
    stride: int = option(16, group=VIT, type=positive_int_arg, check=positive_int,
                         help="patch-embedding stride (16: no overlap; 12: TransReID*)")
    sie_camera: bool = option(False, group=VIT, switch="pair", help="side information embedding of the camera")
    sie_view: bool = option(False, group=VIT, switch="pair",
                            help="side information embedding of the viewpoint")
    sie_coe: float = option(3.0, group=VIT, type=float, check=non_negative, help="SIE weight lambda")
    jpm: bool = option(False, group=VIT, switch="pair", help="jigsaw patch module (transreid)")
    shift_num: int = option(5, group=VIT, type=positive_int_arg, check=positive_int,
                            help="JPM shift m (moves m-1 patches; 5 persons, 8 vehicles)")
    shuffle_groups: int = option(2, group=VIT, type=positive_int_arg, check=positive_int)
    divide_length: int = option(4, group=VIT, type=positive_int_arg, check=positive_int,
                                help="JPM local groups k")
    rearrange: bool = option(True, group=VIT, switch="pair", help="JPM shift + shuffle (off: contiguous groups)")
    drop_path: float = option(0.1, group=VIT, type=float, check=non_negative, help="stochastic depth")
    neck_feat: str = option("before", group=VIT, choices=NECK_FEATS,
                            help="test feature before or after the BNNeck")
    stem_conv: bool = option(False, group=VIT, switch="pair", help="TransReID-SSL's IBN convolution stem (ICS)")
    pretrain_hw_ratio: int = option(
        1, group=VIT, type=positive_int_arg, check=positive_int,
        help="height/width ratio of the pre-trained position grid (2: DINO on LUPerson)")
    gem_pooling: bool = option(False, group=VIT, switch="pair", help="TransReID-SSL: cls + GeM of the patch tokens")


class Method:
    """One re-ID method; subclasses override what differs. ``defaults`` must give a value for
    every option of :data:`METHOD_DEFAULTED`."""

    name: str = ""
    # The fused matcher it trains, by the models' name for it (``matcher.matcher_name``), if any.
    matcher: Optional[str] = None
    defaults: Mapping[str, Any] = {}
    # This method's own options (a dataclass of options.option fields), beside ModelOptions and
    # the engine's; None: it has none. TrainConfig holds them all, flat.
    options: Optional[type] = None
    # The command that trains it (transmatcher-fast train / pretrain): its options' flags are there.
    command: str = "train"
    # Schedules only this method can run: {name: what it is}, for the other methods' refusal.
    own_schedules: Mapping[str, str] = {}
    # The options that define the model: recorded in results' provenance.
    model_options: Tuple[str, ...] = ()
    losses: Tuple[str, ...] = ()
    # Evaluation's autocast when the user leaves it to us: None = the engine's (bf16 on CUDA).
    eval_amp: Optional[str] = None
    # The small model of ``transmatcher-fast demo`` (TrainConfig values; the demo sets the rest).
    demo_options: Mapping[str, Any] = {}

    def check(self, config) -> None:
        """Refuse option values this method cannot train with (a ValueError naming them)."""
        for other in _REGISTRY.values():
            if other is not self and config.schedule in other.own_schedules:
                raise ValueError(f"schedule {config.schedule!r} is {other.own_schedules[config.schedule]} "
                                 f"(method {other.name}), not one for method {self.name!r}")
        if self.losses and config.loss not in self.losses:
            raise ValueError(f"loss {config.loss!r} is not a loss of method {self.name!r}: choose "
                             f"from {self.losses}")

    def dataset(self, config):
        """The training data: a ``ReidDataset`` (``train`` items ``(path, pid, camid)``, and the
        ``query`` / ``gallery`` that evaluation during training uses)."""
        return build_dataset(config.dataset, dataset_root(config.data_dir, config.dataset))

    def loader(self, config, items, transform, sampler, *, rank: int = 0):
        """The training DataLoader of ``items`` through ``transform`` in ``sampler``'s batches;
        each sample's augmentation seeded by (seed, rank, epoch, position, index)."""
        return make_loader(items, transform, config.batch_size, sampler=sampler,
                           num_workers=config.workers, seed=config.seed, stream=rank)

    def step_inputs(self, batch, epoch: int, train_views: Tensor, device: torch.device):
        """The training step's arguments from one loader batch, on ``device``, and the number of
        images in it: ``(images, pids, cams, views)``."""
        images, pids, cams, indices = batch
        inputs = (images.to(device, non_blocking=True), pids.to(device, non_blocking=True),
                  cams.to(device, non_blocking=True), train_views[indices].to(device, non_blocking=True))
        return inputs, images.shape[0]

    def training_hooks(self, parts: Parts, config) -> List[TrainingHook]:
        """This method's own work in the training loop (run on every rank, after the engine's
        gradient clipping and before its evaluation and checkpoint; see ``engine.hooks``)."""
        return []

    def exports(self, parts: Parts, config, epochs_done: int) -> Dict[str, Dict[str, Any]]:
        """``{file name: state}`` the engine writes beside the checkpoint after every epoch (rank
        0, atomically, loadable with ``weights_only=True``): a method's own export formats."""
        return {}

    def model_args(self, config, dataset) -> Dict[str, Any]:
        """What the model needs from the training data (class or camera counts); saved in the
        checkpoint so that :meth:`build` can rebuild the model without the data."""
        return {}

    def build(self, config, model_args: Mapping[str, Any], *, pretrained: bool = True) -> Parts:
        raise NotImplementedError

    def step_module(self, parts: Parts, config) -> nn.Module:
        raise NotImplementedError

    def param_groups(self, parts: Parts, config) -> List[Dict[str, Any]]:
        raise NotImplementedError

    def optimizer(self, groups: List[Dict[str, Any]], config) -> torch.optim.Optimizer:
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)

    def train_transform(self, config):
        return build_train_transform(config.height, config.width)

    def test_transform(self, config: Mapping[str, Any], height: int, width: int):
        """The evaluation transform for a model trained with ``config`` (a dict, as checkpoints
        hold it), at ``height`` x ``width``."""
        return build_test_transform(height, width)

    def load(self, config, state: Mapping[str, Any], source: str) -> Parts:
        """The parts of a checkpoint written by the engine (``state[name]`` per part), built
        from its resolved ``config`` without pretrained weights (the checkpoint has them)."""
        parts = self.build(config, state.get("model_args", {}), pretrained=False)
        for name, part in parts.items():
            if name not in state:
                raise ValueError(f"{source}: no {name!r} weights in the checkpoint (keys: {sorted(state)})")
            part.load_state_dict(state[name])
        return parts


_REGISTRY: Dict[str, Method] = {}


def register_method(method: Method) -> Method:
    missing = [k for k in METHOD_DEFAULTED if k not in method.defaults]
    if missing:
        raise ValueError(f"method {method.name!r} gives no default for {missing}")
    _REGISTRY[method.name] = method
    return method


def method_names() -> List[str]:
    return sorted(_REGISTRY)


def method_of_matcher(matcher: nn.Module) -> str:
    """The name of the method that trains ``matcher`` (for a checkpoint that records no method:
    upstream's, which holds a fused matcher)."""
    name = getattr(matcher, "matcher_name", None)
    for method in _REGISTRY.values():
        if name is not None and method.matcher == name:
            return method.name
    raise ValueError(f"no method trains a {type(matcher).__name__} matcher")


def option_classes() -> List[type]:
    """The option dataclasses of the methods: :class:`ModelOptions`, then each registered
    method's own (registration order, each class once)."""
    classes = [ModelOptions]
    for method in _REGISTRY.values():
        if method.options is not None and method.options not in classes:
            classes.append(method.options)
    return classes


def all_losses() -> Tuple[str, ...]:
    """Every registered method's losses (registration order, each once): ``loss``'s choices."""
    return tuple(dict.fromkeys(loss for method in _REGISTRY.values() for loss in method.losses))


def get_method(name: Optional[str]) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"method must be one of {method_names()}, got {name!r}")
    return _REGISTRY[name]
