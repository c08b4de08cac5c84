"""TransMatcher's per-layer scoring head, without keeping its activations.

After the max pooling, upstream computes for every probe-gallery pair

    rows = cat(q_best, g_best).view(2*q*k, L)        # the two directions of each pair
    z = fc3(relu(bn2(fc2(bn1(rows)))))               # bn1: BatchNorm1d(1), one scalar mean/var
    logit = z.view(q*k, 2).sum(-1)                   # the two directions added

Once the fused op removed the ``q*k*L*L`` score tensor, this head was what remained of the
training memory: the ``cat``, bn1's output and three ``[2qk, dim_feedforward]`` activations per
decoder layer (64 MiB each for a 64-image batch). ``matching_head`` computes the same values and
gradients in row blocks: it keeps only its inputs, ``q_best`` and ``g_best`` (which the op keeps
anyway), and recomputes each hidden block in backward. The BatchNorms keep their exact
semantics: batch statistics over all rows (or all values, for bn1) in training, running
statistics in eval, and the running statistics updated once per call with momentum and the
unbiased variance, as ``torch.nn.BatchNorm1d`` does.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Hidden values per row block: 2**19 = 2 MiB in float32. Smaller blocks do not lower the peak
# further (the op's backward sets it), larger ones raise it.
_BLOCK_ELEMENTS = 1 << 19


def _blocks(sources: tuple[Tensor, ...], hidden: int):
    """(source index, row slice) blocks over the rows of all sources."""
    step = max(1, _BLOCK_ELEMENTS // max(1, hidden))
    for index, source in enumerate(sources):
        for start in range(0, source.shape[0], step):
            yield index, slice(start, min(source.shape[0], start + step))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # 16-bit values (a .half() model) are computed in float32, as BatchNorm does on the GPU.
    return torch.float64 if dtype == torch.float64 else torch.float32


class _MatchingHead(torch.autograd.Function):
    """logit[r] = head(a[r]) + head(b[r]); head = fc3 . relu . bn2 . fc2 . bn1."""

    @staticmethod
    def forward(ctx, a, b, g1, be1, rm1, rv1, batch1: bool, eps1: float,
                w2, b2, g2, be2, rm2, rv2, batch2: bool, eps2: float, w3, b3):
        sources = (a, b)
        if batch1:  # bn1: one mean and variance over every pooled value
            count1 = a.numel() + b.numel()
            m1 = (a.sum() + b.sum()) / count1
            v1 = ((a - m1).square().sum() + (b - m1).square().sum()) / count1
            m1, v1 = m1.view(1), v1.view(1)
        else:
            m1, v1 = rm1.to(a.dtype), rv1.to(a.dtype)
        inv1 = torch.rsqrt(v1 + eps1)

        def hidden(src, rows):
            return F.linear((sources[src][rows] - m1) * inv1 * g1 + be1, w2, b2)

        if batch2:  # bn2: per-channel statistics over all rows, merged block by block (Chan)
            m2 = var_sum = None
            count = 0
            for src, rows in _blocks(sources, w2.shape[0]):
                h = hidden(src, rows)
                n, block_mean = h.shape[0], h.mean(0)
                block_var_sum = (h - block_mean).square().sum(0)
                if m2 is None:
                    m2, var_sum = block_mean, block_var_sum
                else:
                    delta, total = block_mean - m2, count + n
                    m2 = m2 + delta * (n / total)
                    var_sum = var_sum + block_var_sum + delta.square() * (count * n / total)
                count += n
            v2 = var_sum / count
        else:
            m2, v2 = rm2.to(a.dtype), rv2.to(a.dtype)
        inv2 = torch.rsqrt(v2 + eps2)

        logit = a.new_zeros((a.shape[0], 1))
        for src, rows in _blocks(sources, w2.shape[0]):
            y2 = (hidden(src, rows) - m2) * inv2 * g2 + be2
            logit[rows] += F.linear(torch.relu(y2), w3, b3)
        ctx.save_for_backward(a, b, g1, be1, m1, inv1, w2, b2, g2, be2, m2, inv2, w3)
        ctx.batch1, ctx.batch2 = batch1, batch2
        ctx.has_b2, ctx.has_b3 = b2 is not None, b3 is not None
        ctx.mark_non_differentiable(m1, v1, m2, v2)
        return logit, m1, v1, m2, v2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logit, *_grad_stats):
        a, b, g1, be1, m1, inv1, w2, b2, g2, be2, m2, inv2, w3 = ctx.saved_tensors
        need = ctx.needs_input_grad
        sources = (a, b)
        grad_logit = grad_logit.to(a.dtype)
        rows2 = a.shape[0] + b.shape[0]

        def recompute(src, rows):
            """bn1 output, bn2's normalised values and output, and d(logit)/d(bn2 output)."""
            y1 = (sources[src][rows] - m1) * inv1 * g1 + be1
            xhat2 = (F.linear(y1, w2, b2) - m2) * inv2
            y2 = xhat2 * g2 + be2
            dy2 = (grad_logit[rows] @ w3) * (y2 > 0)  # relu's backward masks on its output
            return y1, xhat2, y2, dy2

        # Pass 1: the sums over rows that bn2's backward needs, and fc3's gradients.
        sum_dy2 = torch.zeros_like(m2)
        sum_dy2_xhat2 = torch.zeros_like(m2)
        grad_w3 = torch.zeros_like(w3) if need[16] else None
        for src, rows in _blocks(sources, w2.shape[0]):
            _, xhat2, y2, dy2 = recompute(src, rows)
            sum_dy2 += dy2.sum(0)
            sum_dy2_xhat2 += (dy2 * xhat2).sum(0)
            if grad_w3 is not None:
                grad_w3 += grad_logit[rows].T @ torch.relu(y2)
        # fc3's bias enters both directions of every pair.
        grad_b3 = 2 * grad_logit.sum(0) if need[17] and ctx.has_b3 else None

        # Pass 2: bn2 and fc2 backward, block by block, into d(bn1 output) for every value.
        grad_w2 = torch.zeros_like(w2) if need[8] else None
        grad_b2 = torch.zeros_like(m2) if need[9] and ctx.has_b2 else None
        grad_sources = (torch.empty_like(a), torch.empty_like(b))
        scale2 = g2 * inv2
        for src, rows in _blocks(sources, w2.shape[0]):
            y1, xhat2, _, dy2 = recompute(src, rows)
            if ctx.batch2:
                dh = (dy2 - sum_dy2 / rows2 - xhat2 * (sum_dy2_xhat2 / rows2)) * scale2
            else:
                dh = dy2 * scale2
            if grad_w2 is not None:
                grad_w2 += dh.T @ y1
            if grad_b2 is not None:
                grad_b2 += dh.sum(0)
            grad_sources[src][rows] = dh @ w2

        # bn1 backward over all values, in place.
        count1 = a.numel() + b.numel()
        sum_dy1 = sum(g.sum() for g in grad_sources).view(1)
        sum_dy1_xhat1 = sum((g * (s - m1) * inv1).sum()
                            for g, s in zip(grad_sources, sources)).view(1)
        scale1 = g1 * inv1
        for g, s in zip(grad_sources, sources):
            if ctx.batch1:
                g.sub_(sum_dy1 / count1).sub_((s - m1) * inv1 * (sum_dy1_xhat1 / count1))
            g.mul_(scale1)
        return (grad_sources[0] if need[0] else None, grad_sources[1] if need[1] else None,
                sum_dy1_xhat1 if need[2] else None, sum_dy1 if need[3] else None,
                None, None, None, None,
                grad_w2, grad_b2, sum_dy2_xhat2 if need[10] else None,
                sum_dy2 if need[11] else None, None, None, None, None,
                grad_w3, grad_b3)


def _uses_batch_stats(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    # torch's rule: batch statistics in training, or when there are no running statistics.
    return bn.training or bn.running_mean is None


def _update_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor,
                          count: int) -> None:
    """BatchNorm's training-mode update: momentum (the cumulative average when momentum is
    None) and the unbiased variance."""
    if not (bn.training and bn.track_running_stats):
        return
    bn.num_batches_tracked.add_(1)
    factor = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
    with torch.no_grad():
        bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
        unbiased = var * (count / (count - 1))
        bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


def _affine(bn: nn.modules.batchnorm._BatchNorm, dtype, device) -> tuple[Tensor, Tensor]:
    if bn.weight is None:  # affine=False
        n = bn.num_features
        return (torch.ones(n, dtype=dtype, device=device), torch.zeros(n, dtype=dtype, device=device))
    return bn.weight.to(dtype), bn.bias.to(dtype)


def matching_head(q_best: Tensor, g_best: Tensor, bn1: nn.BatchNorm1d, fc2: nn.Linear,
                  bn2: nn.BatchNorm1d, fc3: nn.Linear) -> Tensor:
    """``[P, 1]`` logits of P pairs from their max-pooled rows ``q_best [P, L]`` and
    ``g_best [P, L]``: ``fc3(relu(bn2(fc2(bn1(row)))))`` summed over the two rows of each pair,
    with the values, gradients and BatchNorm behaviour of those modules, in memory that does not
    grow with ``dim_feedforward``."""
    length = fc2.in_features
    if q_best.dim() != 2 or q_best.shape[1] != length or g_best.shape != q_best.shape:
        raise ValueError(f"matching_head: q_best and g_best must both be [P, {length}], got shapes "
                         f"{tuple(q_best.shape)} and {tuple(g_best.shape)}")
    if bn1.num_features != 1 or fc3.out_features != 1 or bn2.num_features != fc2.out_features:
        raise ValueError("matching_head: expected bn1 = BatchNorm1d(1), bn2 = BatchNorm1d(fc2 "
                         "out_features) and fc3 with one output")
    batch1, batch2 = _uses_batch_stats(bn1), _uses_batch_stats(bn2)
    rows = 2 * q_best.shape[0]
    if (batch1 or batch2) and rows < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got "
                         f"{q_best.shape[0]} pair(s) (BatchNorm in training mode needs a pair)")
    dtype = _compute_dtype(q_best.dtype)
    device = q_best.device
    no_autocast = (torch.autocast(device.type, enabled=False)
                   if device.type in ("cpu", "cuda") else contextlib.nullcontext())
    with no_autocast:
        g1, be1 = _affine(bn1, dtype, device)
        g2, be2 = _affine(bn2, dtype, device)
        cast: list[Optional[Tensor]] = [None if p is None else p.to(dtype)
                                        for p in (fc2.weight, fc2.bias, fc3.weight, fc3.bias)]
        w2, b2, w3, b3 = cast
        logit, m1, v1, m2, v2 = _MatchingHead.apply(
            q_best.to(dtype), g_best.to(dtype), g1, be1, bn1.running_mean, bn1.running_var,
            batch1, bn1.eps, w2, b2, g2, be2, bn2.running_mean, bn2.running_var, batch2, bn2.eps,
            w3, b3)
    if batch1:
        _update_running_stats(bn1, m1, v1, rows * length)
    if batch2:
        _update_running_stats(bn2, m2, v2, rows)
    return logit.to(q_best.dtype)
