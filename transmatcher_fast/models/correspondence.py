"""What a matcher tells a picture of local correspondences: for one probe / gallery pair, where
each location found its best match, as the matcher scores the pair (``max_sim``'s argmax indices).

The fused matchers (:class:`~.transmatcher.TransMatcher`, :class:`~.qaconv.QAConv`) give one
:class:`Correspondence` per decoder layer from ``matcher.correspondences(probe, gallery)``; they
also declare their ``label`` and ``feature_layout``, so pictures ask the matcher, not its class.
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional

import torch
from torch import Tensor, nn

# How a matcher takes one image's features (its ``feature_layout``).
CHANNELS_LAST = "channels_last"    # [n, h, w, C]: TransMatcher
CHANNELS_FIRST = "channels_first"  # [n, C, h, w]: QAConv
EMBEDDING = "embedding"            # [n, D]: EmbeddingDistance (no locations, nothing to draw)


class Correspondence(NamedTuple):
    """One layer's best matches of a pair: ``q_index`` / ``q_best`` ``[L]`` (best gallery location
    and its score per probe location), ``g_index`` / ``g_best`` ``[L]`` (best probe location per
    gallery location), the ``height`` x ``width`` grid (location ``l`` is row ``l // width``,
    column ``l % width``), the decoder ``layer`` (from 1; None for a one-layer matcher) and
    ``label``, the panel title."""
    q_index: Tensor
    q_best: Tensor
    g_index: Tensor
    g_best: Tensor
    height: int
    width: int
    layer: Optional[int]
    label: str


def check_pair(probe: Tensor, gallery: Tensor, expected: str) -> None:
    """Both are one image's features of the same 4-D shape (``expected`` describes it)."""
    for name, t in (("probe_features", probe), ("gallery_features", gallery)):
        if not isinstance(t, Tensor) or t.dim() != 4 or t.shape[0] != 1:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be one image's features {expected}, got {shape}")
    if probe.shape != gallery.shape:
        raise ValueError(f"probe_features and gallery_features must have the same shape "
                         f"{expected}, got {tuple(probe.shape)} and {tuple(gallery.shape)}")


def in_eval_mode(module: nn.Module, compute: Callable[[], List[Correspondence]]) -> List[Correspondence]:
    """``compute()`` with ``module`` in eval mode under ``no_grad``; every submodule's mode is
    restored afterwards (a matcher in training keeps training)."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            return compute()
    finally:
        for m, mode in modes.items():
            m.training = mode


def one_pair(q_best: Tensor, g_best: Tensor, q_index: Tensor, g_index: Tensor, height: int, width: int,
             layer: Optional[int], label: str) -> Correspondence:
    """The ``[1, 1, L]`` outputs of ``max_sim(..., return_indices=True)`` for one pair."""
    return Correspondence(q_index[0, 0], q_best[0, 0], g_index[0, 0], g_best[0, 0], int(height), int(width),
                          layer, label)
