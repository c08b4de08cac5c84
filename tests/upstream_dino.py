"""Upstream DINO's ``utils.cosine_scheduler`` (facebookresearch/dino), written out as the reference
that the per-iteration schedules of ``methods/schedules.py`` are compared with."""

from __future__ import annotations

import numpy as np


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0) -> np.ndarray:
    """One value per iteration, ``[epochs * niter_per_ep]`` float64: a linear warm-up from
    ``start_warmup_value`` to ``base_value`` (both ends included) over ``warmup_epochs`` epochs,
    then ``final + (base - final) * (1 + cos(pi * i / n)) / 2`` for ``i = 0 .. n - 1`` over the
    ``n`` remaining iterations (so it starts at ``base_value`` and never quite reaches
    ``final_value``), as DINO's ``utils.cosine_scheduler``."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup_schedule, schedule))
    if len(schedule) != epochs * niter_per_ep:
        raise ValueError(f"cosine_scheduler: warmup_epochs={warmup_epochs} exceeds epochs={epochs}")
    return schedule
