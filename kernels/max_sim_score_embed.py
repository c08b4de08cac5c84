"""Backward of ``max_sim`` for ``score_embed`` (launched by kernels/max_sim.py): per slice of
query images, a float32 partial ``[Lg, Lq]`` of ``grad * best`` routed to the (s, t) that each
output's saved argmax names (no D dimension: cheap). The launcher sums the partials in a fixed
order and multiplies by ``1 - sig`` (``best = dot * sig`` already carries the rest of the
sigmoid's derivative ``dot * sig * (1 - sig)``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _routed_tile(
    pair, offs_s, offs_t, s_in, t_in, len_q, len_g,
    grad_q_ptr, grad_g_ptr, q_index_ptr, g_index_ptr, q_best_ptr, g_best_ptr,
    HAS_GRAD_Q: tl.constexpr, HAS_GRAD_G: tl.constexpr, NEED_WEIGHTED: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """The routed gradient of one [BLOCK_S, BLOCK_T] tile of S_pair, before the gate, and (when
    NEED_WEIGHTED) the same routing weighted by the saved maxima, for d score_embed (no D
    dimension: cheap)."""
    routed = tl.zeros((BLOCK_S, BLOCK_T), tl.float32)
    weighted = tl.zeros((BLOCK_S, BLOCK_T), tl.float32)
    if HAS_GRAD_Q:
        q_offs = pair * len_q + offs_t
        grad = tl.load(grad_q_ptr + q_offs, mask=t_in, other=0.0)
        arg = tl.load(q_index_ptr + q_offs, mask=t_in, other=-1)
        hit = (arg[None, :] == offs_s[:, None]) & s_in[:, None]
        routed += tl.where(hit, grad[None, :], 0.0)
        if NEED_WEIGHTED:
            best = tl.load(q_best_ptr + q_offs, mask=t_in, other=0.0)
            weighted += tl.where(hit, (grad * best)[None, :], 0.0)
    if HAS_GRAD_G:
        g_offs = pair * len_g + offs_s
        grad = tl.load(grad_g_ptr + g_offs, mask=s_in, other=0.0)
        arg = tl.load(g_index_ptr + g_offs, mask=s_in, other=-1)
        hit = (arg[:, None] == offs_t[None, :]) & t_in[None, :]
        routed += tl.where(hit, grad[:, None], 0.0)
        if NEED_WEIGHTED:
            best = tl.load(g_best_ptr + g_offs, mask=s_in, other=0.0)
            weighted += tl.where(hit, (grad * best)[:, None], 0.0)
    return routed, weighted


@triton.jit
def _max_sim_backward_score_embed_kernel(
    grad_q_ptr, grad_g_ptr, q_index_ptr, g_index_ptr, q_best_ptr, g_best_ptr,
    partial_ptr,
    num_query, num_gallery, len_q, len_g,
    HAS_GRAD_Q: tl.constexpr, HAS_GRAD_G: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # Program (partial p, gallery block, query block): partial_p[s, t] = sum of grad * best over
    # the pairs of query images p, p + P, p + 2P, ... routed to (s, t). No D dimension: cheap.
    p = tl.program_id(0)
    num_partials = tl.num_programs(0)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_in = offs_s < len_g
    offs_t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_in = offs_t < len_q
    acc = tl.zeros((BLOCK_S, BLOCK_T), tl.float32)
    pair = p.to(tl.int64) * num_gallery
    for _ in range(p, num_query, num_partials):
        for _ in range(0, num_gallery):
            _, weighted = _routed_tile(
                pair, offs_s, offs_t, s_in, t_in, len_q, len_g,
                grad_q_ptr, grad_g_ptr, q_index_ptr, g_index_ptr, q_best_ptr, g_best_ptr,
                HAS_GRAD_Q, HAS_GRAD_G, True, BLOCK_S, BLOCK_T,
            )
            acc += weighted
            pair += 1
        pair += (num_partials - 1) * num_gallery
    tl.store(partial_ptr + p.to(tl.int64) * len_g * len_q + offs_s[:, None] * len_q
             + offs_t[None, :], acc, mask=s_in[:, None] & t_in[None, :])
