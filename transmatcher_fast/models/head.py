"""TransMatcher's MLP head ``fc3(relu(bn2(fc2(x))))`` without keeping its activations.

Upstream's head turns the ``[2*q*k, L]`` max-pooled scores into ``[2*q*k, D]`` hidden values
(D = 2048): once the fused op removed the ``q*k*L*L`` score tensor, those hidden activations (three
of them per decoder layer, 64 MiB each for a 64-image batch) were what remained of the training
memory. This autograd function computes the same values in row blocks and recomputes the hidden
block in backward, so it keeps only its input. BN2 keeps its exact semantics: batch statistics
over all rows in training (gathered block by block), running statistics in eval, and the running
statistics updated once per call with momentum and the unbiased variance, as
``torch.nn.BatchNorm1d`` does.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Hidden values per row block: 2**21 floats = 8 MiB in float32.
_BLOCK_ELEMENTS = 1 << 21


def _row_blocks(rows: int, hidden: int):
    step = max(1, _BLOCK_ELEMENTS // max(1, hidden))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # 16-bit inputs (a .half() model) are computed in float32, as BatchNorm does on the GPU.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _batch_stats(x: Tensor, w2: Tensor, b2: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of ``fc2(x)`` over rows, merging per-block statistics (Chan et
    al.), so each hidden block is computed once and never stored."""
    mean = var_sum = None
    count = 0
    for rows in _row_blocks(x.shape[0], w2.shape[0]):
        h = F.linear(x[rows], w2, b2)
        n = h.shape[0]
        block_mean = h.mean(0)
        block_var_sum = (h - block_mean).square().sum(0)
        if mean is None:
            mean, var_sum = block_mean, block_var_sum
        else:
            delta = block_mean - mean
            total = count + n
            mean = mean + delta * (n / total)
            var_sum = var_sum + block_var_sum + delta.square() * (count * n / total)
        count += n
    return mean, var_sum / count


class _MLPHead(torch.autograd.Function):
    """z = fc3(relu(bn(fc2(x)))) with ``bn`` given as (mean, var, gamma, beta, eps)."""

    @staticmethod
    def forward(ctx, x, w2, b2, gamma, beta, w3, b3, running_mean, running_var,
                use_batch_stats: bool, eps: float):
        if use_batch_stats:
            mean, var = _batch_stats(x, w2, b2)
        else:
            mean, var = running_mean.to(x.dtype), running_var.to(x.dtype)
        invstd = torch.rsqrt(var + eps)
        z = x.new_empty((x.shape[0], w3.shape[0]))
        for rows in _row_blocks(x.shape[0], w2.shape[0]):
            xhat = (F.linear(x[rows], w2, b2) - mean) * invstd
            z[rows] = F.linear(torch.relu(xhat * gamma + beta), w3, b3)
        ctx.save_for_backward(x, w2, b2, gamma, beta, w3, mean, invstd)
        ctx.use_batch_stats = use_batch_stats
        ctx.has_b2, ctx.has_b3 = b2 is not None, b3 is not None
        ctx.mark_non_differentiable(mean, var)
        return z, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_z, _grad_mean, _grad_var):
        x, w2, b2, gamma, beta, w3, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        rows_total = x.shape[0]
        grad_z = grad_z.to(x.dtype)

        def recompute(rows):
            xhat = (F.linear(x[rows], w2, b2) - mean) * invstd
            y = xhat * gamma + beta
            dy = (grad_z[rows] @ w3) * (y > 0)  # relu backward masks on its output, as torch's does
            return xhat, y, dy

        # Pass 1: the sums over rows that BN's backward and the small parameters need.
        sum_dy = torch.zeros_like(mean)
        sum_dy_xhat = torch.zeros_like(mean)
        grad_w3 = torch.zeros_like(w3) if need[5] else None
        for rows in _row_blocks(rows_total, w2.shape[0]):
            xhat, y, dy = recompute(rows)
            sum_dy += dy.sum(0)
            sum_dy_xhat += (dy * xhat).sum(0)
            if grad_w3 is not None:
                grad_w3 += grad_z[rows].T @ torch.relu(y)
        grad_b3 = grad_z.sum(0) if need[6] and ctx.has_b3 else None

        # Pass 2: the gradient of the hidden pre-activations, hence of x, fc2.weight and fc2.bias.
        grad_x = torch.empty_like(x) if need[0] else None
        grad_w2 = torch.zeros_like(w2) if need[1] else None
        grad_b2 = torch.zeros_like(mean) if need[2] and ctx.has_b2 else None
        if grad_x is not None or grad_w2 is not None or grad_b2 is not None:
            scale = gamma * invstd
            for rows in _row_blocks(rows_total, w2.shape[0]):
                xhat, _, dy = recompute(rows)
                if ctx.use_batch_stats:
                    dh = (dy - sum_dy / rows_total - xhat * (sum_dy_xhat / rows_total)) * scale
                else:
                    dh = dy * scale
                if grad_x is not None:
                    grad_x[rows] = dh @ w2
                if grad_w2 is not None:
                    grad_w2 += dh.T @ x[rows]
                if grad_b2 is not None:
                    grad_b2 += dh.sum(0)
        return (grad_x, grad_w2, grad_b2, sum_dy_xhat if need[3] else None,
                sum_dy if need[4] else None, grad_w3, grad_b3, None, None, None, None)


def _update_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor,
                          rows: int) -> None:
    """BatchNorm's training-mode update: momentum (or the cumulative average when momentum is
    None) and the unbiased variance."""
    bn.num_batches_tracked.add_(1)
    factor = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
    with torch.no_grad():
        bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
        unbiased = var * (rows / (rows - 1))
        bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


def mlp_head(x: Tensor, fc2: nn.Linear, bn2: nn.BatchNorm1d, fc3: nn.Linear) -> Tensor:
    """``fc3(relu(bn2(fc2(x))))`` for ``x [N, L]``: the same values, gradients and BatchNorm
    behaviour as the modules applied in turn, in memory independent of the hidden size."""
    if x.dim() != 2 or x.shape[1] != fc2.in_features:
        raise ValueError(f"mlp_head: x must be [N, {fc2.in_features}], got shape {tuple(x.shape)}")
    use_batch_stats = bn2.training or bn2.running_mean is None
    rows = x.shape[0]
    if use_batch_stats and rows < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{tuple(x.shape)} (bn2 needs at least two rows: one probe-gallery pair)")
    dtype = _compute_dtype(x.dtype)
    # Parameters take part in the computation dtype; autograd casts their gradients back.
    no_autocast = (torch.autocast(x.device.type, enabled=False)
                   if x.device.type in ("cpu", "cuda") else contextlib.nullcontext())
    with no_autocast:
        cast = [None if p is None else p.to(dtype) for p in
                (fc2.weight, fc2.bias, bn2.weight, bn2.bias, fc3.weight, fc3.bias)]
        w2, b2, gamma, beta, w3, b3 = cast
        if gamma is None:  # affine=False
            gamma = torch.ones(fc2.out_features, dtype=dtype, device=x.device)
            beta = torch.zeros(fc2.out_features, dtype=dtype, device=x.device)
        z, mean, var = _MLPHead.apply(x.to(dtype), w2, b2, gamma, beta, w3, b3,
                                      bn2.running_mean, bn2.running_var, use_batch_stats, bn2.eps)
    if bn2.training and bn2.track_running_stats:
        _update_running_stats(bn2, mean, var, rows)
    return z.to(x.dtype)
