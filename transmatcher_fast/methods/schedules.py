"""Learning-rate schedules, stepped once per epoch (DINO's once per iteration); each sets every
parameter group's rate.

- ``step`` (TransMatcher): ``lr0 * gamma ** (epoch // step_size)`` for ``epochs`` epochs.
- ``adaptive`` (QAConv 2.1): the second epoch's loss is the base; the first epoch whose loss falls
  below ``step_factor * base`` multiplies the rate by ``gamma`` once and sets the end to
  ``min(max_epochs, e + e // 2)`` epochs (e = epochs done), else training stops at ``max_epochs``.
- ``cosine`` (TransReID, timm's ``CosineLRScheduler`` as upstream configures it): with
  ``t = epoch + offset`` (upstream TransReID steps the scheduler with the 1-based epoch at the
  start of each epoch: offset 1; TransReID-SSL steps it at the end: offset 0),

      lr(t) = w + t * (lr0 - w) / warmup_epochs                  t < warmup_epochs
      lr(t) = lr_min + (lr0 - lr_min) * (1 + cos(pi * t / epochs)) / 2     t < epochs
      lr(t) = lr_min                                              t >= epochs

  with ``w = warmup_factor * lr``, ``lr_min = lr_min_factor * lr`` taken from the *base* rate
  ``lr`` for every group (a bias group peaks at 2 lr0 but starts and ends where the others do,
  as timm computes it); the cosine is not restarted after the warm-up.

- ``dino`` (DINO pre-training, ``main_dino.py``'s ``cosine_scheduler`` arrays, set per iteration):
  with ``it = epoch * n + i`` (n iterations per epoch), ``N = epochs * n``, ``W = warmup * n``,

      lr(it) = peak * it / (W - 1)                                        it < W
      lr(it) = min_lr + (peak - min_lr) * (1 + cos(pi * (it - W) / (N - W))) / 2
      wd(it) = wd_end + (wd0 - wd_end) * (1 + cos(pi * it / N)) / 2   (the "regularized" group only)

  ``peak = lr * batch_size * world_size / 256`` (the linear scaling rule); every group gets the
  same rate. A pure function of (epoch, iteration, n, configuration): nothing to save for resume.

``lr0`` is each group's ``initial_lr``. ``end`` is the number of epochs to train; ``state_dict``
holds what a resume needs (only the adaptive schedule has state).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

SCHEDULES = ("step", "adaptive", "cosine", "dino")


class Schedule:
    """The per-epoch rate of a group whose rate at epoch 0 of a plain schedule is ``base``."""

    epochs: int

    @property
    def end(self) -> int:
        return self.epochs

    def lr(self, epoch: int, base: float) -> float:
        raise NotImplementedError

    def set_epoch(self, optimizer: torch.optim.Optimizer, epoch: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self.lr(epoch, group["initial_lr"])

    def set_iteration(self, optimizer: torch.optim.Optimizer, epoch: int, iteration: int,
                      iterations_per_epoch: int) -> None:
        """Before each step: per-iteration schedules (DINO's) set the rates here; the per-epoch
        ones do nothing."""

    def after_epoch(self, epoch: int, loss: float) -> None:
        """Told each epoch's mean loss (only the adaptive schedule listens)."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


class StepSchedule(Schedule):
    def __init__(self, epochs: int, step_size: int, gamma: float):
        self.epochs, self.step_size, self.gamma = epochs, step_size, gamma

    def factor(self, epoch: int) -> float:
        return self.gamma ** (epoch // self.step_size)

    def lr(self, epoch: int, base: float) -> float:
        return base * self.factor(epoch)


class AdaptiveSchedule(Schedule):
    def __init__(self, max_epochs: int, step_factor: float, gamma: float):
        self.max_epochs, self.step_factor, self.gamma = max_epochs, step_factor, gamma
        self.base_loss: Optional[float] = None
        self.decay_epoch: Optional[int] = None

    @property
    def end(self) -> int:
        if self.decay_epoch is None:
            return self.max_epochs
        return min(self.max_epochs, self.decay_epoch + self.decay_epoch // 2)

    def factor(self, epoch: int) -> float:
        return 1.0 if self.decay_epoch is None or epoch < self.decay_epoch else self.gamma

    def lr(self, epoch: int, base: float) -> float:
        return base * self.factor(epoch)

    def after_epoch(self, epoch: int, loss: float) -> None:
        if not math.isfinite(loss):
            return
        if epoch == 1:
            self.base_loss = loss
        elif (self.base_loss is not None and self.decay_epoch is None
              and loss < self.step_factor * self.base_loss):
            self.decay_epoch = epoch + 1  # epochs done: the decay applies from the next one

    def state_dict(self) -> Dict[str, Any]:
        return {"base_loss": self.base_loss, "decay_epoch": self.decay_epoch}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.base_loss, self.decay_epoch = state["base_loss"], state["decay_epoch"]


class WarmupCosineSchedule(Schedule):
    def __init__(self, epochs: int, lr: float, warmup_epochs: int = 5, warmup_factor: float = 0.01,
                 lr_min_factor: float = 0.002, offset: int = 1):
        self.epochs, self.warmup_epochs, self.offset = epochs, warmup_epochs, offset
        self.warmup_lr, self.lr_min = warmup_factor * lr, lr_min_factor * lr

    def lr(self, epoch: int, base: float) -> float:
        t = epoch + self.offset
        if t < self.warmup_epochs:
            return self.warmup_lr + t * (base - self.warmup_lr) / self.warmup_epochs
        if t >= self.epochs:
            return self.lr_min
        return self.lr_min + 0.5 * (base - self.lr_min) * (1 + math.cos(math.pi * t / self.epochs))


def _cosine(base: float, final: float, step: int, steps: int) -> float:
    """Step ``step`` of ``steps`` of DINO's cosine from ``base`` towards ``final`` (``final`` from
    ``steps`` on)."""
    if step >= steps:
        return final
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * step / steps))


def dino_peak_lr(config) -> float:
    """DINO's rate after warm-up: ``lr`` is given per 256 images of a (global) batch."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return config.lr * config.batch_size * world / 256.0


class DINOSchedule(Schedule):
    """DINO's learning rate (linear warm-up from 0, then cosine to ``min_lr``) and weight decay
    (cosine from ``weight_decay`` to ``weight_decay_end``), both per iteration (see the module
    docstring). The teacher's momentum follows the same cosine; it is not a rate of the optimizer,
    so the DINO method computes it (:func:`dino_teacher_momentum`)."""

    def __init__(self, epochs: int, peak_lr: float, min_lr: float = 1e-6, warmup_epochs: int = 10,
                 weight_decay: float = 0.04, weight_decay_end: float = 0.4):
        if not 0 <= warmup_epochs <= epochs:
            raise ValueError(f"dino_warmup_epochs must lie in [0, epochs={epochs}], got {warmup_epochs}")
        self.epochs, self.peak_lr, self.min_lr, self.warmup_epochs = epochs, peak_lr, min_lr, warmup_epochs
        self.weight_decay, self.weight_decay_end = weight_decay, weight_decay_end

    def lr_at(self, iteration: int, iterations_per_epoch: int) -> float:
        """The rate of global iteration ``iteration`` (0-based)."""
        warmup = self.warmup_epochs * iterations_per_epoch
        if iteration < warmup:  # np.linspace(0, peak, warmup): both ends included
            return self.peak_lr * iteration / (warmup - 1) if warmup > 1 else 0.0
        return _cosine(self.peak_lr, self.min_lr, iteration - warmup,
                       self.epochs * iterations_per_epoch - warmup)

    def weight_decay_at(self, iteration: int, iterations_per_epoch: int) -> float:
        return _cosine(self.weight_decay, self.weight_decay_end, iteration,
                       self.epochs * iterations_per_epoch)

    def set_epoch(self, optimizer: torch.optim.Optimizer, epoch: int) -> None:
        """Nothing: the rates change every iteration (:meth:`set_iteration`)."""

    def set_iteration(self, optimizer: torch.optim.Optimizer, epoch: int, iteration: int,
                      iterations_per_epoch: int) -> None:
        step = epoch * iterations_per_epoch + iteration
        lr = self.lr_at(step, iterations_per_epoch)
        weight_decay = self.weight_decay_at(step, iterations_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
            if group.get("name") == "regularized":  # upstream: group 0; the others have none
                group["weight_decay"] = weight_decay


def dino_teacher_momentum(momentum: float, progress: float) -> float:
    """The teacher's EMA momentum of the step at ``progress = iteration / total_iterations``
    (0-based): ``1 - (1 - momentum) * (1 + cos(pi * progress)) / 2``, from ``momentum`` towards
    1, upstream's ``cosine_scheduler(momentum, 1, epochs, niter)[iteration]``."""
    return 1.0 - (1.0 - momentum) * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def build_schedule(config) -> Schedule:
    """The schedule named by ``config.schedule`` with the configuration's values."""
    if config.schedule == "step":
        return StepSchedule(config.epochs, config.step_size, config.gamma)
    if config.schedule == "adaptive":
        return AdaptiveSchedule(config.max_epochs, config.step_factor, config.gamma)
    if config.schedule == "cosine":
        return WarmupCosineSchedule(config.epochs, config.lr, config.warmup_epochs,
                                    config.warmup_factor, config.lr_min_factor, config.schedule_offset)
    if config.schedule == "dino":
        return DINOSchedule(config.epochs, dino_peak_lr(config), config.dino_min_lr,
                            config.dino_warmup_epochs, config.weight_decay, config.dino_weight_decay_end)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {config.schedule!r}")
