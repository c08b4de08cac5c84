"""``max_sim`` written out as plain PyTorch in blocks: matmul, gate, max.

This is what an ONNX export records in place of the fused op, so that any ONNX runtime runs the
graph without our kernels. It traces to standard operators only (MatMul, Sigmoid, Mul,
ReduceMax, Concat) and materialises at most ``max_elements`` values of the
``[Nq, Ng, Lg, Lq]`` score tensor at a time. The sizes it blocks over are read when it is
traced, so a traced graph is for fixed ``Nq`` and ``Ng``; ``engine.onnx_export`` wraps such a
fixed-size block in a loop over the images to take any number of them.

When it replaces the fused op: inside ``torch.onnx.export`` (unless :func:`keep_fused` is on,
which keeps the ``transmatcher_fast::max_sim`` node for a runtime with a plugin), and while
tracing or ``torch.export`` under :func:`decompose_while_tracing`. Eager calls always run the fused op.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor

from ..reference import output_dtype

# Score values materialised at once (16 MiB in float32).
DEFAULT_MAX_ELEMENTS = 1 << 22

_state = {"decompose_tracing": False, "keep_fused": False}


def _pair_blocks(nq: int, ng: int, pair_elements: int, max_elements: int):
    """(query slice, gallery slice) blocks of at most ``max_elements`` score values (at least
    one pair each), whole gallery rows first."""
    pairs = max(1, max_elements // max(1, pair_elements))
    if ng <= pairs:
        step_q, step_g = max(1, pairs // ng), ng
    else:
        step_q, step_g = 1, pairs
    for q0 in range(0, nq, step_q):
        for g0 in range(0, ng, step_g):
            yield slice(q0, min(nq, q0 + step_q)), slice(g0, min(ng, g0 + step_g))


def _block_scores(query: Tensor, gallery: Tensor, gate: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    # S[i, j, s, t] = <gallery[j, s], query[i, t]> * gate[s, t]: [bq, bg, Lg, Lq]
    scores = torch.matmul(gallery.unsqueeze(0), query.transpose(1, 2).unsqueeze(1))
    if gate is not None:
        scores = scores * gate
    return scores.amax(dim=2), scores.amax(dim=3)


def max_sim_decomposed(query: Tensor, gallery: Tensor, score_embed: Optional[Tensor] = None, *,
                       max_elements: int = DEFAULT_MAX_ELEMENTS) -> tuple[Tensor, Tensor]:
    """``(q_best [Nq, Ng, Lq], g_best [Nq, Ng, Lg])`` of ``transmatcher_fast.max_sim`` (same
    arguments), computed in blocks of at most ``max_elements`` score values. Computed in the
    input dtype; outputs are float32 (float64 for float64 inputs), as the op's. No indices and
    no custom backward: this is the forward an exported graph runs."""
    if max_elements < 1:
        raise ValueError(f"max_elements must be positive, got {max_elements}")
    nq, lq, _ = query.shape
    ng, lg, _ = gallery.shape
    out = output_dtype(query.dtype)
    if nq == 0 or ng == 0:
        return query.new_empty((nq, ng, lq), dtype=out), query.new_empty((nq, ng, lg), dtype=out)
    gate = None if score_embed is None else torch.sigmoid(score_embed.to(query.dtype))
    q_rows, g_rows = [], []
    for qs, gs in _pair_blocks(int(nq), int(ng), int(lq) * int(lg), max_elements):
        q_best, g_best = _block_scores(query[qs], gallery[gs], gate)
        q_rows.append(q_best)
        g_rows.append(g_best)
    # Blocks are row-major over (query block, gallery block): stitch each query block's columns.
    q_best = _stitch(q_rows, ng)
    g_best = _stitch(g_rows, ng)
    return q_best.to(out), g_best.to(out)


def _stitch(blocks: list, ng: int) -> Tensor:
    rows, row, width = [], [], 0
    for block in blocks:
        row.append(block)
        width += block.shape[1]
        if width == ng:
            rows.append(row[0] if len(row) == 1 else torch.cat(row, dim=1))
            row, width = [], 0
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


def replaces_fused_op() -> bool:
    """Whether a ``max_sim`` call now records :func:`max_sim_decomposed` instead of the op."""
    if _state["keep_fused"]:
        return False
    if torch.onnx.is_in_onnx_export():
        return True
    return _state["decompose_tracing"] and (torch.jit.is_tracing() or torch.compiler.is_exporting())


@contextlib.contextmanager
def decompose_while_tracing(enabled: bool = True) -> Iterator[None]:
    """While on, ``torch.jit.trace`` and ``torch.export`` record ``max_sim`` as
    :func:`max_sim_decomposed`."""
    before = _state["decompose_tracing"]
    _state["decompose_tracing"] = enabled
    try:
        yield
    finally:
        _state["decompose_tracing"] = before


@contextlib.contextmanager
def keep_fused(enabled: bool = True) -> Iterator[None]:
    """While on, exports and traces keep the ``transmatcher_fast::max_sim`` node (a custom op
    for a runtime with a plugin) instead of the decomposed computation."""
    before = _state["keep_fused"]
    _state["keep_fused"] = enabled
    try:
        yield
    finally:
        _state["keep_fused"] = before
