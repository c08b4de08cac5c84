"""PairwiseMatchingLoss and TripletLoss against hand-computed values, their gradients, accuracy,
NaN rows and errors, and one pass through the real TransMatcher."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from transmatcher_fast import TransMatcher
from transmatcher_fast.methods.losses import PairwiseMatchingLoss, TripletLoss

NAN = float("nan")


def sp(x: float) -> float:
    """softplus: BCEWithLogits(x, 1) = sp(-x), BCEWithLogits(x, 0) = sp(x)."""
    return math.log1p(math.exp(x))


class DotMatcher(nn.Module):
    """Stub matcher with upstream's protocol: scores = kernel @ gallery.T."""

    def __init__(self, dtype=None):
        super().__init__()
        self.dtype = dtype

    def make_kernel(self, features):
        self.kernel = features

    def forward(self, features):
        score = self.kernel @ features.t()
        return score if self.dtype is None else score.to(self.dtype)


# f = [1, 2, -1, 0.5] (one channel), ids [0, 0, 1, 1], so the scores S = f f^T are
#   [[ 1,    2,   -1,    0.5 ],
#    [ 2,    4,   -2,    1   ],
#    [-1,   -2,    1,   -0.5 ],
#    [ 0.5,  1,   -0.5,  0.25]]
FEATURES = [[1.0], [2.0], [-1.0], [0.5]]
TARGETS = [0, 0, 1, 1]


def features(dtype=torch.float64):
    return torch.tensor(FEATURES, dtype=dtype, requires_grad=True)


def test_pairwise_loss_and_acc_by_hand():
    loss, acc = PairwiseMatchingLoss(DotMatcher())(features(torch.float32), torch.tensor(TARGETS))
    expected = [sp(-1) + sp(-2) + sp(-1) + sp(0.5),      # row 0: y = 1 1 0 0
                sp(-2) + sp(-4) + sp(-2) + sp(1),        # row 1: y = 1 1 0 0
                sp(-1) + sp(-2) + sp(-1) + sp(0.5),      # row 2: y = 0 0 1 1
                sp(0.5) + sp(1) + sp(0.5) + sp(-0.25)]   # row 3: y = 0 0 1 1
    assert loss.dtype == torch.float32 and loss.shape == (4,)
    torch.testing.assert_close(loss, torch.tensor(expected))
    # min positive (self excluded) vs max negative: 2 > 0.5, 2 > 1, -0.5 > -1, -0.5 < 1
    assert acc.tolist() == [1.0, 1.0, 1.0, 0.0] and not acc.requires_grad


def test_triplet_loss_and_acc_by_hand():
    loss, acc = TripletLoss(DotMatcher(), margin=2.0)(features(torch.float32),
                                                      torch.tensor(TARGETS))
    # max(0, 2 - (min_pos - max_neg)): rows (2, 0.5), (2, 1), (-0.5, -1), (-0.5, 1)
    torch.testing.assert_close(loss, torch.tensor([0.5, 1.0, 1.5, 3.5]))
    assert acc.tolist() == [1.0, 1.0, 1.0, 0.0]
    loss, _ = TripletLoss(DotMatcher(), margin=0.75)(features(torch.float32),
                                                     torch.tensor(TARGETS))
    torch.testing.assert_close(loss, torch.tensor([0.0, 0.0, 0.25, 2.25]))  # hinge at 0
    assert TripletLoss(DotMatcher()).margin == 16.0


def test_gradients_reach_the_features():
    targets = torch.tensor(TARGETS)
    # Triplet row 0 = 2 - f0*f1 + f0*f3, so d/df = [-f1 + f3, -f0, 0, f0] = [-1.5, -1, 0, 1].
    f = features()
    loss, _ = TripletLoss(DotMatcher(), margin=2.0)(f, targets)
    (grad,) = torch.autograd.grad(loss[0], f)
    torch.testing.assert_close(grad, torch.tensor([[-1.5], [-1.0], [0.0], [1.0]],
                                                  dtype=torch.float64))
    # Both losses against finite differences (float64; the triplet is away from its kinks).
    for loss_fn in (PairwiseMatchingLoss(DotMatcher()), TripletLoss(DotMatcher(), margin=2.0)):
        assert torch.autograd.gradcheck(lambda x: loss_fn(x, targets)[0], (features(),))


def test_rows_without_positive_or_negative_are_nan():
    # f = [1, 1, 1], ids [0, 0, 1]: rows 0 and 1 tie (min pos 1 == max neg 1); row 2 has no
    # other positive.
    f = torch.ones(3, 1, requires_grad=True)
    targets = torch.tensor([0, 0, 1])
    loss, acc = PairwiseMatchingLoss(DotMatcher())(f, targets)
    torch.testing.assert_close(loss, torch.tensor([2 * sp(-1) + sp(1)] * 2 + [2 * sp(1) + sp(-1)]))
    torch.testing.assert_close(acc, torch.tensor([0.0, 0.0, NAN]), equal_nan=True)  # strict >

    loss, acc = TripletLoss(DotMatcher(), margin=2.0)(f, targets)
    torch.testing.assert_close(loss, torch.tensor([2.0, 2.0, NAN]), equal_nan=True)
    torch.testing.assert_close(acc, torch.tensor([1.0, 1.0, NAN]), equal_nan=True)  # >=
    # The trainer's finite-row mean gives finite gradients: the NaN row does not leak.
    (grad,) = torch.autograd.grad(loss[loss.isfinite()].mean(), f)
    assert grad.isfinite().all()
    torch.testing.assert_close(grad, torch.tensor([[-0.5], [-0.5], [1.0]]))

    # One identity only: no negatives anywhere.
    loss, acc = TripletLoss(DotMatcher())(torch.ones(2, 1), torch.tensor([4, 4]))
    assert loss.isnan().all() and acc.isnan().all()
    loss, acc = PairwiseMatchingLoss(DotMatcher())(torch.ones(2, 1), torch.tensor([4, 4]))
    assert loss.isfinite().all() and acc.isnan().all()


def test_half_scores_are_computed_in_float32():
    f = features(torch.float32)
    ref, ref_acc = PairwiseMatchingLoss(DotMatcher())(f, torch.tensor(TARGETS))
    loss, acc = PairwiseMatchingLoss(DotMatcher(torch.float16))(f, torch.tensor(TARGETS))
    assert loss.dtype == acc.dtype == torch.float32
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(acc, ref_acc)
    loss, _ = TripletLoss(DotMatcher(torch.float16), margin=2.0)(f, torch.tensor(TARGETS))
    assert loss.dtype == torch.float32


def test_shape_errors():
    for loss_fn in (PairwiseMatchingLoss(DotMatcher()), TripletLoss(DotMatcher())):
        with pytest.raises(ValueError, match=r"features \(3, 1\) and targets \(4,\)"):
            loss_fn(torch.ones(3, 1), torch.tensor([0, 0, 1, 1]))
        with pytest.raises(ValueError, match="targets must be 1-D"):
            loss_fn(torch.ones(2, 1), torch.tensor([[0], [1]]))


def test_with_the_real_transmatcher():
    torch.manual_seed(0)
    for loss_cls in (PairwiseMatchingLoss, TripletLoss):
        matcher = TransMatcher(seq_len=8, d_model=16, num_decoder_layers=2, dim_feedforward=32)
        f = torch.randn(8, 4, 2, 32, requires_grad=True)
        loss, acc = loss_cls(matcher)(f, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
        assert loss.shape == acc.shape == (8,)
        assert loss.isfinite().all() and acc.isfinite().all()
        loss.mean().backward()
        assert f.grad is not None and f.grad.isfinite().all() and f.grad.abs().sum() > 0
        for layer in matcher.decoder.layers:
            for name in ("fc1.weight", "score_embed", "fc2.weight", "fc3.weight"):
                grad = layer.get_parameter(name).grad
                assert grad is not None and grad.isfinite().all() and grad.abs().sum() > 0, name
