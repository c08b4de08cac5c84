"""Backward of ``max_sim`` for query and gallery as gathers from the saved argmax.

Every output element of pair (i, j) routes its gradient ``w`` to one location pair:

    q direction: t -> s* = q_index[i,j,t]:  d query[i,t] += w sig[s*,t] g_j[s*],  d gallery[j,s*] += w sig[s*,t] q_i[t]
    g direction: s -> t* = g_index[i,j,s]:  d gallery[j,s] += w sig[s,t*] q_i[t*],  d query[i,t*] += w sig[s,t*] g_j[s]

so each gradient row is a sum of feature rows of the other side: O(Nq*Ng*(Lq+Lg)*D) work in
float32, against the dense one-hot product's 2*Nq*Ng*Lq*Lg*D on tensor cores (twice the
forward). One kernel serves both sides. A program owns one row ``o`` of one "own" image ``a``
(a query image for d query) and a slice of D, and adds, in a fixed order:

1. the direct routes: for every other image ``b`` (in order, ``CHUNK`` at a time), the row its
   own argmax names (``idx_own[a,b,o]``);
2. the scattered routes: the other side's rows whose argmax is ``o``. These are listed ahead of
   the launch with a stable sort of the other side's argmax per own image (``scatter_lists``:
   indices only, no D), so the program reads its list, in the order of the other side's
   (image, location), ``CHUNK`` entries at a time.

No atomics and a fixed summation order: bit-identical from run to run. The gradient never
passes through 16 bits (the old dense product rounded the routed gradient to the operands'
type), so fp16 scaled gradients cannot overflow.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows(other_ptr, row_offsets, d_offs, valid, d_in, weight):
    """Sum over the chunk of weight * (the feature rows at row_offsets)[:, d_offs], in float32
    (masked entries have weight 0 and read nothing)."""
    features = tl.load(other_ptr + row_offsets[:, None] + d_offs[None, :],
                       mask=valid[:, None] & d_in[None, :], other=0.0)
    return tl.sum(weight[:, None] * features.to(tl.float32), 0)


@triton.jit
def _max_sim_backward_gather_kernel(
    other_ptr, sig_ptr, out_ptr,
    g_own_ptr, idx_own_ptr, g_oth_ptr, idx_oth_ptr, order_ptr, start_ptr,
    n_oth, l_own, l_oth, dim,
    pair_so, pair_sx, gate_so, gate_sx,
    HAS_GATE: tl.constexpr, HAS_OWN: tl.constexpr, HAS_OTH: tl.constexpr,
    BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
):
    a = tl.program_id(0).to(tl.int64)
    o = tl.program_id(1)
    d_offs = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d_offs < dim
    arange_c = tl.arange(0, CHUNK)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_OWN:  # direct routes: own location o -> other location idx_own[a, b, o]
        for b0 in range(0, n_oth, CHUNK):
            b = b0 + arange_c
            valid = b < n_oth
            k = (a * pair_so + b.to(tl.int64) * pair_sx) * l_own + o
            x = tl.load(idx_own_ptr + k, mask=valid, other=0)
            w = tl.load(g_own_ptr + k, mask=valid, other=0.0)
            if HAS_GATE:
                w *= tl.load(sig_ptr + o * gate_so + x * gate_sx, mask=valid, other=0.0)
            rows = (b.to(tl.int64) * l_oth + x) * dim
            acc += _gather_rows(other_ptr, rows, d_offs, valid, d_in, w)
    if HAS_OTH:  # scattered routes: other entries m = b * l_oth + x whose argmax is o
        first = tl.load(start_ptr + a * (l_own + 1) + o)
        last = tl.load(start_ptr + a * (l_own + 1) + o + 1)
        for e0 in range(first, last, CHUNK):
            e = e0 + arange_c
            valid = e < last
            m = tl.load(order_ptr + a * n_oth * l_oth + e, mask=valid, other=0).to(tl.int64)
            b = m // l_oth
            x = m - b * l_oth
            w = tl.load(g_oth_ptr + (a * pair_so + b * pair_sx) * l_oth + x, mask=valid,
                        other=0.0)
            if HAS_GATE:
                w *= tl.load(sig_ptr + o * gate_so + x * gate_sx, mask=valid, other=0.0)
            acc += _gather_rows(other_ptr, m * dim, d_offs, valid, d_in, w)
    tl.store(out_ptr + (a * l_own + o) * dim + d_offs, acc, mask=d_in)


def scatter_lists(idx_oth: torch.Tensor) -> tuple:
    """For every own image, its other side's entries grouped by the own location they route
    to: ``idx_oth`` is ``[n_own, n_oth * l_oth]`` (the other side's argmax, entry m = b * l_oth
    + x). Returns ``order`` (int32, the entries sorted stably by target, so by m within a
    target) and the sorted targets (for the bounds of each target's run). A stable sort is
    deterministic."""
    # contiguous: a permuted view keeps its strides through sort and to(), and the kernel
    # reads the lists by flat offset.
    targets, order = torch.sort(idx_oth.contiguous(), dim=1, stable=True)
    return order.to(torch.int32).contiguous(), targets.contiguous()


def launch(other: torch.Tensor, sig: Optional[torch.Tensor], out: torch.Tensor,
           grad_own: Optional[torch.Tensor], idx_own: torch.Tensor,
           grad_oth: Optional[torch.Tensor], idx_oth: torch.Tensor,
           n_own: int, l_own: int, own_is_query: bool, block_d: int, chunk: int,
           num_warps: int) -> None:
    """Fills ``out`` ([n_own, l_own, D] float32): the gradient of the own side (query when
    ``own_is_query``). ``idx_own``/``grad_own`` are the own side's argmax and output gradient
    ([Nq, Ng, l_own]), ``idx_oth``/``grad_oth`` the other side's."""
    n_oth, l_oth, dim = other.shape
    if n_oth * l_oth >= 2**31:  # the lists index one own image's routes in int32
        raise ValueError(f"Triton max_sim backward: {n_oth} x {l_oth} routes per image do not "
                         f"fit the int32 route lists")
    num_gallery = n_oth if own_is_query else n_own
    # pair (i, j) = i * Ng + j; gate sig[s, t] is [Lg, Lq].
    if own_is_query:
        pair_so, pair_sx, gate_so, gate_sx = num_gallery, 1, 1, l_own
        keys = idx_oth.reshape(n_own, n_oth * l_oth)
    else:
        pair_so, pair_sx, gate_so, gate_sx = 1, num_gallery, l_oth, 1
        keys = idx_oth.permute(1, 0, 2).reshape(n_own, n_oth * l_oth)
    if grad_oth is not None:
        order, targets = scatter_lists(keys)
        bounds = torch.arange(l_own + 1, dtype=targets.dtype, device=targets.device)
        start = torch.searchsorted(targets, bounds.expand(n_own, -1).contiguous())
        start = start.to(torch.int32)
    else:
        order = start = idx_oth  # unused
    any_grad = grad_own if grad_own is not None else grad_oth
    grid = (n_own, l_own, triton.cdiv(dim, block_d))
    _max_sim_backward_gather_kernel[grid](
        other, sig if sig is not None else any_grad, out,
        grad_own if grad_own is not None else any_grad, idx_own,
        grad_oth if grad_oth is not None else any_grad, idx_oth, order, start,
        n_oth, l_own, l_oth, dim, pair_so, pair_sx, gate_so, gate_sx,
        HAS_GATE=sig is not None, HAS_OWN=grad_own is not None, HAS_OTH=grad_oth is not None,
        BLOCK_D=block_d, CHUNK=chunk, num_warps=num_warps,
    )
