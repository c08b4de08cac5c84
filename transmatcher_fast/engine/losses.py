"""Matching losses on the score matrix of a batch against itself.

Both losses call the matcher with upstream's protocol (``matcher.make_kernel(features)``, then
``scores = matcher(features)``, a ``[b, b]`` matrix of logits, higher = more similar) and return
per-row ``(loss, acc)`` tensors of shape ``[b]``, as upstream does; the trainer averages the rows
whose loss is finite. Scores are cast to float32 first (float64 is kept), so the losses are
computed in float32 under autocast too.

- ``PairwiseMatchingLoss`` (TransMatcher, QAConv 2.0): binary cross-entropy of every pair,
  summed over the row.
- ``TripletLoss`` (QAConv 2.1): batch-hard margin ranking between the hardest positive and the
  hardest negative of each row.

Accuracy (no gradient) is whether the row's hardest positive (self excluded) outscores its
hardest negative. Unlike upstream (which then reports 1 or 0 from its +-1e15 fill values), a
row with no other image of its identity, or with no image of another identity, gets NaN.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PairwiseMatchingLoss", "TripletLoss"]


def _batch_scores(matcher: nn.Module, features: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
    """Scores ``[b, b]`` of the batch against itself (float32, or float64 when the matcher gives
    float64) and the same-identity mask."""
    if targets.dim() != 1:
        raise ValueError(f"targets must be 1-D [b], got shape {tuple(targets.shape)}")
    if features.shape[0] != targets.shape[0]:
        raise ValueError(f"features and targets must have the same batch size, got features "
                         f"{tuple(features.shape)} and targets {tuple(targets.shape)}")
    b = features.shape[0]
    matcher.make_kernel(features)
    score = matcher(features)
    if score.dtype != torch.float64:  # 16-bit (autocast) -> float32; float64 kept for gradcheck
        score = score.float()
    if score.shape != (b, b):
        raise ValueError(f"matcher must return [{b}, {b}] scores, got {tuple(score.shape)}")
    targets = targets.to(score.device)
    same = targets.unsqueeze(1) == targets.unsqueeze(0)
    return score, same


def _hardest(score: Tensor, same: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per row: min positive score (self excluded), max negative score, and whether the row has
    both. Masked, not offset by +-1e15, so it is exact in any dtype; invalid rows get 0."""
    eye = torch.eye(score.shape[0], dtype=torch.bool, device=score.device)
    positive = same & ~eye
    negative = ~same
    valid = positive.any(1) & negative.any(1)
    # min/max over a dim (not amin/amax), as upstream: a tie sends the gradient to one pair.
    min_pos = score.masked_fill(~positive, float("inf")).min(1).values
    max_neg = score.masked_fill(~negative, float("-inf")).max(1).values
    zero = torch.zeros((), dtype=score.dtype, device=score.device)
    return torch.where(valid, min_pos, zero), torch.where(valid, max_neg, zero), valid


def _nan_where_invalid(values: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, values, torch.full_like(values, float("nan")))


class PairwiseMatchingLoss(nn.Module):
    """Upstream's pairwise matching loss: ``loss_i = sum_j BCEWithLogits(score_ij, y_ij)`` with
    ``y_ij = [pid_i == pid_j]`` (the diagonal counts as a positive pair).

    ``forward(features, targets)`` returns ``(loss [b], acc [b])``; ``acc_i`` is 1.0 when the
    lowest positive score of row i (self excluded) is strictly above its highest negative
    score, else 0.0, and NaN for a row with no other positive or no negative.
    """

    def __init__(self, matcher: nn.Module):
        super().__init__()
        self.matcher = matcher

    def forward(self, features: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
        score, same = _batch_scores(self.matcher, features, targets)
        labels = same.to(score.dtype)
        loss = F.binary_cross_entropy_with_logits(score, labels, reduction="none").sum(1)
        with torch.no_grad():
            min_pos, max_neg, valid = _hardest(score, same)
            acc = _nan_where_invalid((min_pos > max_neg).float(), valid)
        return loss, acc


class TripletLoss(nn.Module):
    """QAConv 2.1's batch-hard triplet loss on matcher scores:
    ``loss_i = max(0, margin - (min_pos_i - max_neg_i))`` (MarginRankingLoss with y = 1), where
    ``min_pos_i`` is the lowest score of row i over its other positives and ``max_neg_i`` the
    highest over its negatives.

    ``forward(features, targets)`` returns ``(loss [b], acc [b])`` with
    ``acc_i = [min_pos_i >= max_neg_i]``. A row with no other positive or no negative has loss
    and acc NaN, so a trainer that averages finite rows drops it.
    """

    def __init__(self, matcher: nn.Module, margin: float = 16.0):
        super().__init__()
        self.matcher = matcher
        self.margin = float(margin)

    def forward(self, features: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
        score, same = _batch_scores(self.matcher, features, targets)
        min_pos, max_neg, valid = _hardest(score, same)
        loss = F.margin_ranking_loss(min_pos, max_neg, torch.ones_like(min_pos),
                                     margin=self.margin, reduction="none")
        loss = _nan_where_invalid(loss, valid)
        with torch.no_grad():
            acc = _nan_where_invalid((min_pos >= max_neg).float(), valid)
        return loss, acc

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
