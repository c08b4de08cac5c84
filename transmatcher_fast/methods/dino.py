"""DINO self-supervised pre-training of a ViT on unlabelled person images (TransReID-SSL's LUPerson
recipe, ``dino/main_dino.py``), as a method of the engine.

Parts, saved in every checkpoint under these names (upstream's where upstream has them):

- ``student``: ``MultiCropWrapper(ViT, DINOHead)`` (3-layer MLP, bottleneck 256, weight-normalised
  last layer), drop path ``drop_path`` (0.1), trained by AdamW;
- ``teacher``: the same network without drop path, started as a copy of the student and then
  its EMA after every step (momentum ``dino_momentum_teacher`` 0.996 -> 1, cosine); no gradients;
- ``dino_loss``: :class:`~..models.dino.DINOLoss` and its ``center`` buffer (momentum 0.9);
- ``model``: the teacher's backbone (images ``[B, 3, H, W]`` -> cls token after the final LN,
  ``[B, D]``) and ``matcher``: cosine distance. So ``--eval-every`` on a labelled ``--dataset``
  measures a kNN-style re-ID mAP of the pre-trained features, ``eval`` / ``visualize`` take the
  checkpoint as any other, and ``TransReID(pretrained="checkpoint.pt")`` reads the teacher's
  backbone (``load_pretrained`` takes ``checkpoint["model"]``). ``checkpoint["teacher"]`` holds
  DINO's own layout (``backbone.*``, ``head.*``), which upstream's tools read too.

One step (:class:`DINOStep`): the 2 global crops (``height x width``) through the teacher, all
``2 + dino_local_crops`` crops through the student (one backbone call per resolution: the local
crops' position embedding is resized, :class:`~..models.vit.MultiResolutionViT`), DINOLoss at the
epoch's teacher temperature (warm-up ``dino_warmup_teacher_temp`` -> ``dino_teacher_temp`` over
``dino_warmup_teacher_temp_epochs``), student temperature 0.1. Around the optimizer step (the
method's training hook :class:`DINOStepHook`, after AMP's unscaling): every parameter's gradient
clipped to norm ``dino_clip_grad`` on its own, and the head's last layer's gradient dropped
during the first ``dino_freeze_last_layer`` epochs; after the step, the teacher's EMA (these
utilities are in :mod:`.optim_utils`). The learning rate (``lr`` per 256 images of the global
batch, linear warm-up from 0 over ``dino_warmup_epochs``, cosine to ``dino_min_lr``) and the
weight decay (``weight_decay`` -> ``dino_weight_decay_end``, cosine, on the regularised group
only) are set every iteration by the ``dino`` schedule
(:class:`~.schedules.DINOSchedule`); with the momentum they are functions of (epoch, iteration,
iterations per epoch, configuration), so a resume repeats the interrupted epoch exactly.

Data: ``--dataset images`` is any folder tree of unlabelled images (LUPerson: one folder of
``.jpg``); any labelled dataset's training images serve as unlabelled ones too (and keep its
query/gallery for evaluation). ``filter_list`` + ``keep_num`` / ``keep_ratio`` keep the top of a
CFS list (``transmatcher-fast cfs``, or upstream's ``CFS_list.pkl``). Augmentation:
:class:`~..data.multicrop.MultiCropTransform` (2 global crops, scale 0.4-1, and 8 local crops at
half the size, scale 0.05-0.4; ImageNet mean/std, as DINO), each sample's random steps seeded
from (seed, rank, epoch, position, index).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import weights_io
from ..data import IMAGENET_MEAN, IMAGENET_STD, MultiCropCollate, MultiCropTransform, UnlabelledImages
from ..data.transforms import build_transreid_test_transform, seeded_loader
from ..data.unlabelled import UNLABELLED_DATASETS, restrict_to_list
from ..models.dino import DINOHead, DINOLoss, MultiCropWrapper
from ..models.embedding import EmbeddingDistance
from ..models.vit import ARCHS as VIT_ARCHS, PATCH, MultiResolutionViT, arch_config, load_pretrained
from ..options import (area_range, non_negative, non_negative_int, non_negative_int_arg, option,
                       optional_fraction, optional_positive_int, optional_positive_int_arg,
                       optional_str_arg, positive, positive_int, positive_int_arg, unit_interval)
from .base import Method, Parts, TrainingHook, register_method
from .optim_utils import cancel_gradients_last_layer, clip_gradients, ema_update, get_params_groups
from .schedules import dino_peak_lr, dino_teacher_momentum

__all__ = ["DINOMethod", "DINOStep", "DINOStepHook", "load_dino_weights", "teacher_checkpoint",
           "view_agreement"]


_LIST, _DINO = "unlabelled images: CFS list", "DINO"  # their help groups (pretrain's)


@dataclass
class DINOOptions:
    """The unlabelled data's CFS list (TransReID-SSL's ``--filter_path``) and DINO pre-training's
    options (``main_dino.py``'s, TransReID-SSL's values)."""
    filter_list: Optional[str] = option(
        None, flags=("--filter-list", "--filter_path"), group=_LIST, type=optional_str_arg,
        help="a CFS-ranked list of the images to keep (cfs_list.txt or upstream's CFS_list.pkl; names "
             "relative to the dataset's folder)")
    keep_num: Optional[int] = option(None, flags=("--keep", "--keep-num", "--keep_num"), group=_LIST,
                                     type=optional_positive_int_arg, check=optional_positive_int,
                                     help="keep the first N of the list (upstream 2508146: 60 %%)")
    keep_ratio: Optional[float] = option(None, group=_LIST, type=float, check=optional_fraction,
                                         help="keep this fraction of the list (0.6 or 0.5 upstream)")
    dino_out_dim: int = option(65536, flags=("--out-dim", "--out_dim"), group=_DINO, type=positive_int_arg,
                               check=positive_int, help="DINO head's output width (prototypes)")
    dino_norm_last_layer: bool = option(True, flags=("--norm-last-layer",), group=_DINO, switch="pair",
                                        help="weight-normalised last layer with its norm frozen")
    dino_use_bn_in_head: bool = option(False, flags=("--use-bn-in-head",), group=_DINO, switch="pair",
                                       help="BatchNorm in the head's MLP")
    dino_momentum_teacher: float = option(0.996, flags=("--momentum-teacher",), group=_DINO, type=float,
                                          check=unit_interval,
                                          help="teacher EMA momentum at the start (cosine to 1)")
    dino_warmup_teacher_temp: float = option(0.04, flags=("--warmup-teacher-temp",), group=_DINO,
                                             type=float, check=positive)
    dino_teacher_temp: float = option(0.04, flags=("--teacher-temp",), group=_DINO, type=float, check=positive)
    dino_warmup_teacher_temp_epochs: int = option(0, flags=("--warmup-teacher-temp-epochs",), group=_DINO,
                                                  type=non_negative_int_arg, check=non_negative_int)
    dino_student_temp: float = option(0.1, flags=("--student-temp",), group=_DINO, type=float, check=positive)
    dino_center_momentum: float = option(0.9, flags=("--center-momentum",), group=_DINO, type=float,
                                         check=unit_interval, help="momentum of the teacher's centre")
    dino_local_crops: int = option(8, flags=("--local-crops", "--local-crops-number"), group=_DINO,
                                   type=non_negative_int_arg, check=non_negative_int,
                                   help="local crops per image (besides the 2 global ones)")
    dino_local_height: Optional[int] = option(None, flags=("--local-height", "--crop-height"), group=_DINO,
                                              type=optional_positive_int_arg, check=optional_positive_int,
                                              help="local crop height (default: half the height)")
    dino_local_width: Optional[int] = option(None, flags=("--local-width", "--crop-width"), group=_DINO,
                                             type=optional_positive_int_arg, check=optional_positive_int,
                                             help="local crop width (default: half the width)")
    dino_global_scale: Tuple[float, float] = option(
        (0.4, 1.0), flags=("--global-scale", "--global-crops-scale"), group=_DINO, type=float, nargs=2,
        metavar=("MIN", "MAX"), check=area_range, help="area range of the global crops")
    dino_local_scale: Tuple[float, float] = option(
        (0.05, 0.4), flags=("--local-scale", "--local-crops-scale"), group=_DINO, type=float, nargs=2,
        metavar=("MIN", "MAX"), check=area_range, help="area range of the local crops")
    dino_warmup_epochs: int = option(10, flags=("--dino-warmup-epochs",), group=_DINO, type=non_negative_int_arg,
                                     check=non_negative_int,
                                     help="linear learning-rate warm-up from 0 (per iteration)")
    dino_min_lr: float = option(1e-6, flags=("--min-lr",), group=_DINO, type=float, check=non_negative,
                                help="the cosine's end")
    dino_weight_decay_end: float = option(0.4, flags=("--weight-decay-end",), group=_DINO, type=float,
                                          check=non_negative)
    dino_clip_grad: float = option(3.0, flags=("--clip-grad",), group=_DINO, type=float, check=non_negative,
                                   help="each parameter's gradient norm, on its own (0: off)")
    dino_freeze_last_layer: int = option(1, flags=("--freeze-last-layer",), group=_DINO,
                                         type=non_negative_int_arg, check=non_negative_int,
                                         help="epochs during which the head's last layer stays")

    @staticmethod
    def check_together(config) -> None:
        """What these options must satisfy together, whatever the method."""
        if config.keep_num is not None and config.keep_ratio is not None:
            raise ValueError("keep_num (the first N of filter_list) and keep_ratio (a fraction of it) "
                             "exclude each other: give one")
        if (config.keep_num is not None or config.keep_ratio is not None) and config.filter_list is None:
            raise ValueError("keep_num / keep_ratio keep the top of a CFS list: give filter_list too")


@torch.no_grad()
def view_agreement(student_output: Tensor, teacher_output: Tensor, center: Tensor, ncrops: int) -> Tensor:
    """How often the student's most likely prototype for a view is the (centred) teacher's for
    the other global view, over DINOLoss's pairs (teacher view ``i``, student view ``v != i``):
    the step's "accuracy" in the logs. ``student_output`` ``[ncrops * B, K]``, ``teacher_output``
    ``[2 * B, K]``, ``center`` ``[1, K]`` -> a float32 scalar in [0, 1]."""
    student = student_output.argmax(-1).view(ncrops, -1)
    teacher = (teacher_output.float() - center).argmax(-1).view(2, -1)
    hits = [(student[v] == teacher[i]).float().mean() for i in range(2) for v in range(ncrops) if v != i]
    return torch.stack(hits).mean()


class DINOStep(nn.Module):
    """Student + teacher + loss as one module (for DDP; the teacher has no trainable parameter,
    so DDP leaves it alone and every rank's EMA of the same student keeps the teachers equal).

    ``forward(crops, epoch)``: ``crops`` the ``2 + L`` crop batches ``[B, 3, h_i, w_i]`` (the 2
    global ones first, DINO's layout) -> ``(loss [1], view agreement [1])``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, loss: DINOLoss):
        super().__init__()
        self.student, self.teacher, self.loss = student, teacher, loss

    def forward(self, crops: Sequence[Tensor], epoch: int):
        with torch.no_grad():
            teacher_output = self.teacher(list(crops[:2]))  # only the global views
        student_output = self.student(list(crops))
        agreement = view_agreement(student_output, teacher_output, self.loss.center, self.loss.ncrops)
        loss = self.loss(student_output, teacher_output, epoch)  # (moves the centre)
        return loss.reshape(1), agreement.reshape(1)


def _read_any(path: str) -> Dict[str, Any]:
    """A checkpoint file, ``weights_only`` (DINO's carry their argparse.Namespace: plain data);
    a :class:`~..weights_io.WeightsFileError` (a ValueError naming the file) if it cannot be read."""
    state = weights_io.load(path, safe_globals=weights_io.PLAIN_DATA)
    return state if isinstance(state, dict) else {}


def load_dino_weights(student: MultiCropWrapper, path: str, hw_ratio: int = 1,
                      loss: Optional[DINOLoss] = None) -> Dict[str, List[str]]:
    """Pre-trained weights into a student, to continue pre-training: the backbone from any layout
    :func:`~..models.vit.load_pretrained` reads (DINO's ``teacher`` entry, TransReID-SSL's
    released backbone, ImageNet ViT/DeiT, our ``checkpoint.pt``), ``pos_embed`` resized by the
    ``hw_ratio`` rule; the head, when the file has one (``teacher``'s ``head.*``); the loss's
    centre, when it has ``dino_loss.center`` of the same width. A head that does not fit raises
    a ValueError naming the file and the keys. Returns ``{"loaded": [...], "skipped": [...]}``."""
    report = load_pretrained(student.backbone, path, hw_ratio)
    state = _read_any(path)
    teacher = weights_io.unwrap(state, ("teacher",)) if isinstance(state.get("teacher"), dict) else {}
    head = weights_io.select(teacher, "head.")
    if head:
        weights_io.check_fits(path, student.head.state_dict(), head)
        student.head.load_state_dict(head)
        report["loaded"] += [f"head.{k}" for k in sorted(head)]
    center = state.get("dino_loss", {}).get("center") if isinstance(state.get("dino_loss"), dict) else None
    if loss is not None and isinstance(center, Tensor) and center.shape == loss.center.shape:
        loss.center.copy_(center)
        report["loaded"].append("dino_loss.center")
    return report


def teacher_checkpoint(parts: Parts, epochs_done: int, config: Mapping[str, Any]) -> Dict[str, Any]:
    """DINO's checkpoint layout of the teacher (``{'teacher': {backbone.*, head.*}, ...}``, what
    upstream's ``convert_model_dino.py`` and ``load_pretrained`` read), with our configuration."""
    return {"teacher": parts["teacher"].state_dict(), "dino_loss": parts["dino_loss"].state_dict(),
            "epoch": epochs_done, "config": dict(config)}


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


TEACHER_NAME = "teacher.pth"  # the teacher alone, DINO's layout


class DINOStepHook(TrainingHook):
    """DINO's work around the optimizer step (upstream's ``train_one_epoch``): before it, every
    student parameter's gradient clipped to norm ``dino_clip_grad`` on its own, and the head's
    last layer's gradient dropped during the first ``dino_freeze_last_layer`` epochs; after it,
    the teacher's EMA of the student at the step's momentum (cosine ``dino_momentum_teacher``
    -> 1 over training)."""

    def __init__(self, parts: Parts, config):
        self.student, self.teacher = parts["student"], parts["teacher"]
        self.config = config

    def after_backward(self, epoch: int, progress: float) -> None:
        if self.config.dino_clip_grad > 0:
            clip_gradients(self.student, self.config.dino_clip_grad)
        cancel_gradients_last_layer(epoch, self.student, self.config.dino_freeze_last_layer)

    def after_optimizer_step(self, epoch: int, progress: float) -> None:
        ema_update(self.teacher, self.student, dino_teacher_momentum(self.config.dino_momentum_teacher, progress))


class DINOMethod(Method):
    name = "dino"
    defaults = {"arch": "vit_small_patch16", "ibn": None, "height": 256, "width": 128, "lr": 0.0005,
                "weight_decay": 0.04, "epochs": 100, "sampler": "random", "loss": "dino",
                "clip_value": 0.0, "freeze_bn": False, "schedule": "dino"}
    model_options = ("method", "arch", "height", "width", "stride", "stem_conv", "drop_path",
                     "dino_out_dim", "dino_norm_last_layer", "dino_use_bn_in_head", "pretrained",
                     "pretrain_hw_ratio", "filter_list", "keep_num", "keep_ratio")
    losses = ("dino",)
    options = DINOOptions
    command = "pretrain"
    own_schedules = {"dino": "DINO pre-training's per-iteration schedule"}
    eval_amp = "none"  # upstream's kNN evaluation (eval_knn.py) extracts features in float32
    # A tiny ViT and head (the demo sets lr, batch and epochs).
    demo_options = {"arch": "vit_tiny_patch16", "drop_path": 0.0, "dino_out_dim": 1024,
                    "dino_local_crops": 4, "dino_warmup_epochs": 1}

    def local_size(self, config) -> tuple:
        return (config.dino_local_height or config.height // 2, config.dino_local_width or config.width // 2)

    def check(self, config) -> None:
        super().check(config)
        refuse = []
        if config.arch not in VIT_ARCHS:
            refuse.append(f"arch {config.arch!r} (DINO here trains a ViT: {', '.join(sorted(VIT_ARCHS))})")
        if config.sampler != "random":
            refuse.append(f"sampler {config.sampler!r} (unlabelled images: 'random')")
        if config.schedule != "dino":
            refuse.append(f"schedule {config.schedule!r} (DINO's per-iteration one: 'dino')")
        if config.clip_value:
            refuse.append(f"clip_value {config.clip_value} (DINO clips each parameter's gradient on its "
                          "own: set dino_clip_grad)")
        if config.jpm or config.sie_camera or config.sie_view or config.gem_pooling:
            refuse.append("jpm / sie_camera / sie_view / gem_pooling (fine-tuning options; DINO trains "
                          "the plain cls token)")
        if config.freeze_bn:
            refuse.append("freeze_bn (the ICS stem's BatchNorm trains)")
        if config.dino_warmup_teacher_temp_epochs > config.epochs:
            refuse.append(f"dino_warmup_teacher_temp_epochs {config.dino_warmup_teacher_temp_epochs} "
                          f"(more than the {config.epochs} epochs)")
        if config.dino_warmup_epochs > config.epochs:
            refuse.append(f"dino_warmup_epochs {config.dino_warmup_epochs} (more than the {config.epochs} epochs)")
        if min(self.local_size(config)) < PATCH:
            refuse.append(f"local crops of {self.local_size(config)} (at least {PATCH} x {PATCH}: one patch)")
        if refuse:
            raise ValueError("method 'dino' cannot train with " + "; ".join(refuse))
        if config.eval_every and config.dataset in UNLABELLED_DATASETS:
            raise ValueError(f"eval_every {config.eval_every}: the unlabelled images of dataset "
                             f"{config.dataset!r} have no query/gallery to evaluate on; give a labelled "
                             "--dataset (e.g. market1501: its training images pre-train, its query/gallery "
                             "measure the teacher's kNN mAP) or --eval-every 0")

    def dataset(self, config):
        """The configured dataset; only its training images are used, as unlabelled ones (the
        top of ``filter_list`` when given)."""
        dataset = super().dataset(config)
        if config.filter_list is not None:
            # The CFS list helpers live with the scoring (engine.cfs), which imports nothing of
            # the training engine: a lazy import keeps methods importable before the engine.
            from ..data.cfs_list import read_cfs_list, select_top

            names = read_cfs_list(config.filter_list)
            listed = len(names)
            if config.keep_num is not None and config.keep_num > listed:
                raise ValueError(f"keep_num {config.keep_num}: {config.filter_list} lists only {listed:,} images")
            if config.keep_num is not None or config.keep_ratio is not None:
                names = select_top(names, keep=config.keep_num, keep_ratio=config.keep_ratio)
            note = (f"(the first {len(names):,} of {listed:,}: "
                    + (f"keep_num {config.keep_num})" if config.keep_num is not None else
                       f"keep_ratio {config.keep_ratio})" if config.keep_ratio is not None else "all listed)"))
            restrict_to_list(dataset, names, config.filter_list, note)
        return dataset

    def loader(self, config, items, transform, sampler, *, rank: int = 0):
        """Crop lists of the items' images, DINO's layout: a batch is ``(crops, indices)`` with
        ``crops[i]`` ``[B, 3, h_i, w_i]`` (crop i of every image: the 2 global ones first)."""
        dataset = UnlabelledImages([path for path, _, _ in items], transform, seed=config.seed, stream=rank)
        return seeded_loader(dataset, config.batch_size, sampler=sampler, num_workers=config.workers,
                             seed=config.seed, collate_fn=MultiCropCollate(by_resolution=False))

    def step_inputs(self, batch, epoch: int, train_views: Tensor, device: torch.device):
        crops, indices = batch
        return ([c.to(device, non_blocking=True) for c in crops], epoch), indices.shape[0]

    def _vit(self, config, drop_path: float) -> MultiResolutionViT:
        return MultiResolutionViT(**arch_config(config.arch), img_size=(config.height, config.width),
                                  stride_size=config.stride, drop_path_rate=drop_path,
                                  stem_conv=config.stem_conv)

    def build(self, config, model_args: Mapping[str, Any], *, pretrained: bool = True) -> Parts:
        student_vit, teacher_vit = self._vit(config, config.drop_path), self._vit(config, 0.0)
        dim = student_vit.embed_dim
        student = MultiCropWrapper(student_vit, DINOHead(dim, config.dino_out_dim, config.dino_use_bn_in_head,
                                                         config.dino_norm_last_layer))
        teacher = MultiCropWrapper(teacher_vit, DINOHead(dim, config.dino_out_dim, config.dino_use_bn_in_head))
        loss = DINOLoss(config.dino_out_dim, 2 + config.dino_local_crops, config.dino_warmup_teacher_temp,
                        config.dino_teacher_temp, config.dino_warmup_teacher_temp_epochs, config.epochs,
                        config.dino_student_temp, config.dino_center_momentum)
        if pretrained and config.pretrained is not None:
            load_dino_weights(student, config.pretrained, config.pretrain_hw_ratio, loss)
        # BatchNorm (the ICS stem, a BN head) is synchronised across GPUs, as upstream; gloo on
        # the CPU has no SyncBatchNorm, and DDP's buffer broadcast keeps the ranks equal there.
        if (dist.is_available() and dist.is_initialized() and torch.cuda.is_available()
                and _has_batchnorm(student)):
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        teacher.load_state_dict(student.state_dict())  # teacher and student start equal
        teacher.requires_grad_(False)  # no backpropagation through the teacher
        model = teacher.backbone
        model.side_info = False
        return {"model": model, "matcher": EmbeddingDistance("cosine"), "student": student,
                "teacher": teacher, "dino_loss": loss}

    def step_module(self, parts: Parts, config) -> nn.Module:
        return DINOStep(parts["student"], parts["teacher"], parts["dino_loss"])

    def param_groups(self, parts: Parts, config) -> List[Dict[str, Any]]:
        """DINO's two groups of the student: weights with weight decay (the schedule moves it),
        biases and 1-D parameters without; both at the same rate."""
        regularized, not_regularized = get_params_groups(parts["student"])
        peak = dino_peak_lr(config)
        groups = [{**regularized, "name": "regularized", "lr": peak, "weight_decay": config.weight_decay},
                  {**not_regularized, "name": "not_regularized", "lr": peak}]
        return [g for g in groups if g["params"]]

    def optimizer(self, groups, config) -> torch.optim.Optimizer:
        return torch.optim.AdamW(groups)

    def training_hooks(self, parts: Parts, config) -> List[TrainingHook]:
        return [DINOStepHook(parts, config)]

    def exports(self, parts: Parts, config, epochs_done: int) -> Dict[str, Dict[str, Any]]:
        """``EXP_DIR/teacher.pth``: the teacher alone in DINO's layout, after every epoch (for
        upstream's tools and for fine-tuning; checkpoint.pt loads as pretrained weights too)."""
        from dataclasses import asdict

        return {TEACHER_NAME: teacher_checkpoint(parts, epochs_done, asdict(config))}

    def train_transform(self, config):
        return MultiCropTransform(global_size=(config.height, config.width), local_size=self.local_size(config),
                                  global_scale=tuple(config.dino_global_scale),
                                  local_scale=tuple(config.dino_local_scale),
                                  local_crops=config.dino_local_crops, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def test_transform(self, config, height: int, width: int):
        # DINO's normalisation (ImageNet's), TransReID's resize.
        return build_transreid_test_transform(height, width, mean=IMAGENET_MEAN, std=IMAGENET_STD)


register_method(DINOMethod())
