"""The training losses of the methods.

Matching losses (TransMatcher, QAConv) on the score matrix of a batch against itself.

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

Embedding losses (TransReID, ``loss/make_loss.py``): ``soft_margin_triplet`` (batch-hard,
Euclidean distances of un-normalised features) and ``TransReIDLoss`` (cross-entropy on the BN
features' class scores plus the soft-margin triplet, JPM's 0.5 global + 0.5 mean-of-locals).
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PairwiseMatchingLoss", "TripletLoss", "soft_margin_triplet", "TransReIDLoss"]


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


def soft_margin_triplet(features: Tensor, targets: Tensor) -> Tensor:
    """Upstream's ``TripletLoss(margin=None)`` (``NO_MARGIN: True``): per anchor, the hardest
    positive's distance ``d_ap`` (the largest, self included as upstream) and the hardest
    negative's ``d_an`` (the smallest), ``mean(log(1 + exp(d_ap - d_an)))``, with
    ``d = sqrt(max(|a|^2 + |b|^2 - 2ab, 1e-12))``.

    The distances are computed in float32 whatever the autocast: upstream's fp16
    ``|a|^2 + |b|^2 - 2ab`` cancels catastrophically for 768-d features of norm ~20 and makes
    the hard-example mining noisy. Identities may have different image counts in the batch
    (masked max/min; upstream's reshape needs equal counts and gives the same values then). An
    anchor without a negative is left out; a batch of one identity gives 0.
    """
    if features.dim() != 2 or targets.shape != features.shape[:1]:
        raise ValueError(f"features must be [b, d] and targets [b], got {tuple(features.shape)} "
                         f"and {tuple(targets.shape)}")
    with torch.autocast(features.device.type, enabled=False):
        x = features.float() if features.dtype != torch.float64 else features
        squared = x.pow(2).sum(1)
        dist = (squared[:, None] + squared[None, :] - 2.0 * (x @ x.t())).clamp_min(1e-12).sqrt()
        targets = targets.to(x.device)
        same = targets[:, None] == targets[None, :]
        d_ap = dist.masked_fill(~same, float("-inf")).max(1).values
        d_an = dist.masked_fill(same, float("inf")).min(1).values
        valid = (~same).any(1)
        if not valid.any():
            return dist.sum() * 0.0
        return F.soft_margin_loss(d_an[valid] - d_ap[valid], torch.ones_like(d_an[valid]))


class TransReIDLoss(nn.Module):
    """TransReID's ``softmax_triplet`` loss on the model's training outputs.

    ``forward(scores, features, targets)``, with ``scores`` / ``features`` a tensor (no JPM:
    ``[b, classes]`` / ``[b, d]``) or lists ``[global, local_1..k]`` (JPM), returns
    ``(loss [1], acc [1])``:

        ID  = CE(global)                       or 0.5 CE(global) + 0.5 mean_j CE(local_j)
        TRI = T(f_global)                      or 0.5 T(f_global) + 0.5 mean_j T(f_local_j)
        loss = id_weight * ID + triplet_weight * TRI

    CE is plain cross-entropy (upstream's configs: label smoothing off; ``label_smoothing``
    gives upstream's ``CrossEntropyLabelSmooth``, the same as torch's smoothing), computed in
    float32; T is :func:`soft_margin_triplet`. ``acc`` is the global head's top-1 accuracy.
    """

    def __init__(self, id_weight: float = 1.0, triplet_weight: float = 1.0,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.id_weight, self.triplet_weight = float(id_weight), float(triplet_weight)
        self.label_smoothing = float(label_smoothing)

    @staticmethod
    def _combine(values: Sequence[Tensor]) -> Tensor:
        if len(values) == 1:
            return values[0]
        return 0.5 * values[0] + 0.5 * torch.stack(list(values[1:])).mean()

    def forward(self, scores: Union[Tensor, Sequence[Tensor]], features: Union[Tensor, Sequence[Tensor]],
                targets: Tensor) -> Tuple[Tensor, Tensor]:
        scores = [scores] if isinstance(scores, Tensor) else list(scores)
        features = [features] if isinstance(features, Tensor) else list(features)
        targets = targets.to(scores[0].device)
        ce = [F.cross_entropy(s.float(), targets, label_smoothing=self.label_smoothing) for s in scores]
        tri = [soft_margin_triplet(f, targets) for f in features]
        loss = self.id_weight * self._combine(ce) + self.triplet_weight * self._combine(tri)
        with torch.no_grad():
            acc = (scores[0].argmax(1) == targets).float().mean()
        return loss.reshape(1), acc.reshape(1)

    def extra_repr(self) -> str:
        return (f"id_weight={self.id_weight}, triplet_weight={self.triplet_weight}, "
                f"label_smoothing={self.label_smoothing}")
