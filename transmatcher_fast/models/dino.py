"""DINO self-distillation, as facebookresearch/dino writes it (``main_dino.py``,
``vision_transformer.py``, ``utils.py``), for TransReID-SSL's LUPerson pre-training.

The model side of upstream's recipe: a student and an EMA teacher, both a backbone (cls token
``[B, D]``) wrapped with a :class:`DINOHead` by :class:`MultiCropWrapper`; the teacher sees the 2
global crops, the student all crops; :class:`DINOLoss` is the cross-entropy between the centred,
sharpened teacher softmax and the student softmax over every pair of *different* views.
:func:`teacher_stats` tells whether the teacher collapsed. The training side (schedules, gradient
clipping, the frozen last layer, parameter groups, the teacher's EMA) is in
``methods/schedules.py`` and ``methods/optim_utils.py``; the multi-resolution ViT in ``models/vit.py``.

State dicts keep upstream's layout, so released DINO / TransReID-SSL checkpoints load as they are
(``head.mlp.0.weight``, ..., ``head.last_layer.weight_g``, ``head.last_layer.weight_v``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations

__all__ = [
    "DINOHead",
    "MultiCropWrapper",
    "DINOLoss",
    "teacher_stats",
    "TeacherStats",
]


# ------------------------------------------------------------------------------------------------
# Head
# ------------------------------------------------------------------------------------------------

# ``torch.nn.utils.weight_norm`` (what upstream uses) is deprecated (FutureWarning on torch 2.13)
# in favour of ``torch.nn.utils.parametrizations.weight_norm``, whose parameters are named
# ``parametrizations.weight.original0`` (g, [out, 1]) and ``...original1`` (v, [out, in]): the same
# tensors under other names. The last layer saves them under upstream's names; on load, torch's
# weight_norm maps upstream's names to its own (a load pre-hook it registers), so either loads.
_WN_NEW = ("parametrizations.weight.original0", "parametrizations.weight.original1")
_WN_OLD = ("weight_g", "weight_v")


def _save_upstream_names(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for new, old in zip(_WN_NEW, _WN_OLD):
        if prefix + new in state_dict:
            state_dict[prefix + old] = state_dict.pop(prefix + new)


def _weight_normed_linear(in_features: int, out_features: int) -> nn.Module:
    """``Linear(in, out, bias=False)`` with weight ``g * v / ||v||`` (norm per output row), its
    state_dict keys ``weight_g`` [out, 1] and ``weight_v`` [out, in] as upstream's."""
    layer = parametrizations.weight_norm(nn.Linear(in_features, out_features, bias=False))
    # (the public name of the hook registration is newer than some torch releases we support)
    register = getattr(layer, "register_state_dict_post_hook", None) or layer._register_state_dict_hook
    register(_save_upstream_names)
    return layer


class DINOHead(nn.Module):
    """DINO's projection head: ``[B, in_dim] -> [B, out_dim]`` logits.

    ``mlp``: ``nlayers`` Linear layers (in_dim -> hidden_dim -> ... -> bottleneck_dim), GELU (and
    BatchNorm1d with ``use_bn``) between them, trunc-normal(std .02) weights and zero biases; its
    output is L2-normalised, then ``last_layer``: a bias-free weight-normalised Linear
    (bottleneck_dim -> out_dim) whose per-row magnitude ``weight_g`` starts at 1 and, with
    ``norm_last_layer``, stays at 1 (frozen), so the logits are cosines.
    """

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            # Module indices (the state_dict's mlp.0, mlp.2, ...) are upstream's.
            layers: List[nn.Module] = []
            for width_in in [in_dim] + [hidden_dim] * (nlayers - 2):
                layers.append(nn.Linear(width_in, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        # Upstream initialises the MLP before the last layer exists: the last layer keeps
        # nn.Linear's default init for v (its direction), g is then set to 1.
        self.apply(self._init_weights)
        self.last_layer = _weight_normed_linear(bottleneck_dim, out_dim)
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1)
        if norm_last_layer:
            g.requires_grad = False

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [B, in_dim] -> logits [B, out_dim]."""
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


# ------------------------------------------------------------------------------------------------
# Multi-crop wrapper
# ------------------------------------------------------------------------------------------------

class MultiCropWrapper(nn.Module):
    """``backbone`` + ``head`` over a list of crops of several resolutions.

    Consecutive crops of the same size ``(H, W)`` are concatenated and go through the backbone
    together (one call per resolution group: 2 calls for DINO's 2 global + 8 local crops), the
    backbone outputs ``[n_i * B, D]`` are concatenated in crop order and the head runs once on all.
    ``forward(crops)``: a list of ``[B_i, 3, H_i, W_i]`` (or one tensor) -> ``[sum B_i, out_dim]``,
    rows in crop order (crop 0's batch first), as :class:`DINOLoss` expects.

    As upstream, the backbone's classifier attributes ``fc`` / ``head`` are replaced by
    ``nn.Identity`` (no parameters: the classifier drops out of the state_dict; the rest keeps the
    keys ``backbone.*`` and ``head.*``). Upstream groups crops by width alone; here by height and width, which is the
    same for DINO's crops and does not fail on crops of one width and two heights.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        for name in ("fc", "head"):  # disable layers dedicated to classification
            if isinstance(getattr(backbone, name, None), nn.Module):
                setattr(backbone, name, nn.Identity())
        self.backbone = backbone
        self.head = head

    def forward(self, x: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        crops = [x] if isinstance(x, Tensor) else list(x)
        if not crops:
            raise ValueError("MultiCropWrapper: got an empty list of crops")
        sizes = torch.tensor([tuple(c.shape[-2:]) for c in crops])
        counts = torch.unique_consecutive(sizes, dim=0, return_counts=True)[1]
        outputs, start = [], 0
        for end in torch.cumsum(counts, 0).tolist():
            out = self.backbone(torch.cat(crops[start:end]))
            if isinstance(out, tuple):  # e.g. XCiT returns (cls, patches)
                out = out[0]
            if out.dim() != 2:
                raise ValueError(f"MultiCropWrapper: the backbone must return [B, D] (the cls "
                                 f"token), got {tuple(out.shape)} for crops {start}..{end - 1}")
            outputs.append(out)
            start = end
        return self.head(torch.cat(outputs))


# ------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------

class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher softmax and the student softmax.

    ``forward(student_output, teacher_output, epoch)``:

    * ``student_output`` [ncrops * B, out_dim]: the student's logits for all crops, crop-major
      (what :class:`MultiCropWrapper` returns), divided by ``student_temp``;
    * ``teacher_output`` [2 * B, out_dim]: the teacher's logits for the 2 global crops;
      ``softmax((t - center) / T(epoch))``, no gradient;
    * loss = mean over the pairs (teacher view ``i`` in {0, 1}, student view ``v`` != ``i``:
      ``2 * ncrops - 2`` pairs) of the batch mean of ``-sum q_i * log_softmax(s_v)``.

    ``T(epoch)``: ``linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)``
    then ``teacher_temp`` up to ``nepochs`` (``teacher_temp_schedule``). After each call the buffer
    ``center`` [1, out_dim] moves towards the batch mean of ``teacher_output`` (all-reduced over
    processes when torch.distributed is initialised): ``c <- m c + (1 - m) mean``.
    Computed in float32, also under autocast.
    """

    center: Tensor

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        if ncrops < 2:
            raise ValueError(f"DINOLoss: ncrops counts the 2 global crops and the local ones, got {ncrops}")
        if not 0 <= warmup_teacher_temp_epochs <= nepochs:
            raise ValueError(f"DINOLoss: warmup_teacher_temp_epochs must lie in [0, nepochs={nepochs}], "
                             f"got {warmup_teacher_temp_epochs}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        # The teacher temperature warms up because a too high one makes early training unstable.
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        ))

    def forward(self, student_output: Tensor, teacher_output: Tensor, epoch: int) -> Tensor:
        out_dim = self.center.shape[1]
        if student_output.dim() != 2 or student_output.shape[1] != out_dim:
            raise ValueError(f"DINOLoss: student_output must be [ncrops * B, {out_dim}], "
                             f"got {tuple(student_output.shape)}")
        if teacher_output.dim() != 2 or teacher_output.shape[1] != out_dim:
            raise ValueError(f"DINOLoss: teacher_output must be [2 * B, {out_dim}], "
                             f"got {tuple(teacher_output.shape)}")
        batch = teacher_output.shape[0] // 2
        if teacher_output.shape[0] != 2 * batch or student_output.shape[0] != self.ncrops * batch:
            raise ValueError(f"DINOLoss: teacher_output {tuple(teacher_output.shape)} must hold 2 global crops "
                             f"and student_output {tuple(student_output.shape)} ncrops={self.ncrops} crops "
                             f"of the same batch size")
        if not 0 <= epoch < len(self.teacher_temp_schedule):
            raise ValueError(f"DINOLoss: epoch {epoch} is outside the schedule of "
                             f"{len(self.teacher_temp_schedule)} epochs (nepochs)")

        # 16-bit logits at temperature 0.04 overflow / lose the softmax: always float32.
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            student_output, teacher_output = student_output.float(), teacher_output.float()
            student_out = (student_output / self.student_temp).chunk(self.ncrops)
            temp = float(self.teacher_temp_schedule[epoch])
            teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)

            total_loss = student_output.new_zeros(())
            n_loss_terms = 0
            for iq, q in enumerate(teacher_out):
                for v, s in enumerate(student_out):
                    if v == iq:  # the student and the teacher saw the same view
                        continue
                    total_loss = total_loss + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                    n_loss_terms += 1
            total_loss = total_loss / n_loss_terms
            self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        """``center <- m * center + (1 - m) * mean(teacher_output)`` (mean over all processes)."""
        batch_center = torch.sum(teacher_output.float(), dim=0, keepdim=True)
        count = len(teacher_output)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            count *= dist.get_world_size()
        batch_center = batch_center / count
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))


# ------------------------------------------------------------------------------------------------
# Collapse check
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TeacherStats:
    """What :func:`teacher_stats` measures on one batch of teacher logits.

    ``entropy``: entropy (nats) of the batch-mean teacher distribution. Near 0: every image goes
    to the same few dimensions (dominant-dimension collapse). ``sample_entropy``: the mean
    entropy of the per-image distributions; near ``max_entropy = log(out_dim)``: every image gets
    the uniform distribution (uniform collapse). A healthy teacher has a high ``entropy`` and a
    clearly lower ``sample_entropy``. ``feature_std`` [out_dim]: the std over the batch of each
    logit; all near 0 means the teacher gives every image the same output.
    """

    entropy: float
    sample_entropy: float
    max_entropy: float
    feature_std: Tensor

    def as_dict(self) -> Dict[str, float]:
        """Plain floats for a log line (the std summarised by its mean and minimum)."""
        return {"entropy": self.entropy, "sample_entropy": self.sample_entropy,
                "max_entropy": self.max_entropy, "feature_std_mean": float(self.feature_std.mean()),
                "feature_std_min": float(self.feature_std.min())}


@torch.no_grad()
def teacher_stats(teacher_output: Tensor, center: Optional[Tensor], temperature: float) -> TeacherStats:
    """Collapse statistics of teacher logits ``[N, out_dim]`` with the loss's centring ``center``
    ([1, out_dim] or None) and sharpening ``temperature`` (``DINOLoss.teacher_temp_schedule[epoch]``)."""
    if teacher_output.dim() != 2 or teacher_output.shape[0] < 2:
        raise ValueError(f"teacher_stats: teacher_output must be [N >= 2, out_dim], got {tuple(teacher_output.shape)}")
    logits = teacher_output.float()
    if center is not None:
        logits = logits - center.float()
    log_p = F.log_softmax(logits / temperature, dim=-1)
    p = log_p.exp()
    mean_p = p.mean(0)
    entropy = -(mean_p * torch.log(mean_p.clamp_min(1e-30))).sum()
    sample_entropy = -(p * log_p).sum(-1).mean()
    return TeacherStats(entropy=float(entropy), sample_entropy=float(sample_entropy),
                        max_entropy=math.log(teacher_output.shape[1]),
                        feature_std=teacher_output.float().std(dim=0))
