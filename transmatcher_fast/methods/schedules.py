"""Learning-rate schedules, stepped once per epoch; each sets every parameter group's rate.

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

``lr0`` is each group's ``initial_lr``. ``end`` is the number of epochs to train; ``state_dict``
holds what a resume needs (only the adaptive schedule has state).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

SCHEDULES = ("step", "adaptive", "cosine")


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


def build_schedule(config) -> Schedule:
    """The schedule named by ``config.schedule`` with the configuration's values."""
    if config.schedule == "step":
        return StepSchedule(config.epochs, config.step_size, config.gamma)
    if config.schedule == "adaptive":
        return AdaptiveSchedule(config.max_epochs, config.step_factor, config.gamma)
    if config.schedule == "cosine":
        return WarmupCosineSchedule(config.epochs, config.lr, config.warmup_epochs,
                                    config.warmup_factor, config.lr_min_factor, config.schedule_offset)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {config.schedule!r}")
