"""The optimizer-step utilities of DINO's training (facebookresearch/dino ``utils.py``), as the
methods use them around the engine's optimizer step: parameter groups without weight decay on
biases and norms, per-parameter gradient clipping, the head's frozen last layer, and the teacher's
exponential moving average of the student.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

__all__ = ["ema_update", "cancel_gradients_last_layer", "clip_gradients", "get_params_groups"]


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (its parameters are the same, ``module.`` aside)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``t <- m * t + (1 - m) * s`` for every parameter pair, in ``parameters()`` order (as
    upstream; buffers such as BatchNorm statistics are not averaged). DDP wrappers are unwrapped."""
    t_params, s_params = list(_unwrap(teacher).parameters()), list(_unwrap(student).parameters())
    if len(t_params) != len(s_params) or any(t.shape != s.shape for t, s in zip(t_params, s_params)):
        raise ValueError("ema_update: teacher and student must have the same parameters "
                         f"({len(t_params)} vs {len(s_params)} tensors, or different shapes)")
    if not t_params:
        return
    # One fused kernel per group instead of two per tensor (a ViT has ~150 parameter tensors).
    s_data = [s.detach() for s in s_params]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_data, alpha=1 - momentum)


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """Drop the gradients of the head's ``last_layer`` while ``epoch < freeze_last_layer``
    (upstream freezes it during epoch 0: training is more stable)."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> List[float]:
    """Clip each parameter's gradient to L2 norm ``clip`` on its own (not a global norm): scaled by
    ``clip / (norm + 1e-6)`` when that is below 1. Returns the norms before clipping, in
    ``named_parameters()`` order of the parameters that have a gradient, as DINO's ``utils``."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return []
    # Upstream syncs with the device once per parameter (.item()); the norms are the same
    # computed together and read back once.
    norms = torch.stack([g.detach().norm(2).to(grads[0].device) for g in grads]).tolist()
    for g, norm in zip(grads, norms):
        clip_coef = clip / (norm + 1e-6)
        if clip_coef < 1:
            g.mul_(clip_coef)
    return norms


def get_params_groups(model: nn.Module) -> List[Dict]:
    """``[{'params': regularized}, {'params': not_regularized, 'weight_decay': 0.}]``: biases and
    1-D parameters (norm weights) get no weight decay; frozen parameters are left out. Group 0 is
    the one whose weight decay the schedule sets."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.}]
