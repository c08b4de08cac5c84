"""Pure-PyTorch reference of ``max_sim``: the one copy that tests, benchmarks and the ``reference``
backend share.

``max_sim`` is upstream TransMatcher's computation as written there: it materialises the
``[Nq, Ng, Lg, Lq]`` score tensor, gates it with ``sigmoid(E)`` and takes the two maxima.
``max_sim_chunked`` does the same block by block of (query, gallery) images, which bounds memory;
pairs are independent, so its results equal the one-shot ones. ``max_sim_chunked_backward``
is autograd's backward of those blocks written out, and ``max_sim_grads`` is the gradient formula of the
fused kernels (every output element routes its gradient through its saved argmax), written
densely so that backends can be checked against it with their own indices.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor

# Score elements materialised at once by the chunked variants (256 MiB in float32).
DEFAULT_MAX_ELEMENTS = 1 << 26


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    """Outputs are float64 for float64 inputs and float32 otherwise (16-bit inputs included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def max_sim(
    query: Tensor,
    gallery: Tensor,
    score_embed: Optional[Tensor] = None,
    *,
    return_indices: bool = False,
):
    """Upstream's materialised computation.

    ``query [Nq, Lq, D]``, ``gallery [Ng, Lg, D]``, ``score_embed [Lg, Lq]`` (pre-sigmoid logits) or
    None. Returns ``q_best [Nq, Ng, Lq]`` (max over gallery locations) and ``g_best [Nq, Ng, Lg]``
    (max over query locations), plus their int32 argmax when ``return_indices``. Computed in the
    input dtype, as upstream does; outputs follow :func:`output_dtype`.
    """
    # S[i, j, s, t] = <gallery[j, s], query[i, t]> * sigmoid(E[s, t])
    scores = torch.einsum("itd,jsd->ijst", query, gallery)
    if score_embed is not None:
        scores = scores * torch.sigmoid(score_embed)
    q_best, q_index = scores.max(dim=2)
    g_best, g_index = scores.max(dim=3)
    out = output_dtype(query.dtype)
    q_best, g_best = q_best.to(out), g_best.to(out)
    if return_indices:
        return q_best, g_best, q_index.to(torch.int32), g_index.to(torch.int32)
    return q_best, g_best


def iter_blocks(
    nq: int, ng: int, pair_elements: int, max_elements: Optional[int] = None
) -> Iterator[tuple[slice, slice]]:
    """(query slice, gallery slice) blocks whose score tensors hold at most ``max_elements``
    (default ``DEFAULT_MAX_ELEMENTS``; at least one pair per block)."""
    if max_elements is None:
        max_elements = DEFAULT_MAX_ELEMENTS
    if max_elements < 1:
        raise ValueError(f"max_elements must be positive, got {max_elements}")
    if nq == 0 or ng == 0:
        return
    per_pair = max(1, pair_elements)
    if ng * per_pair <= max_elements:
        cq, cg = max(1, max_elements // (ng * per_pair)), ng
    else:
        cq, cg = 1, max(1, max_elements // per_pair)
    for q0 in range(0, nq, cq):
        for g0 in range(0, ng, cg):
            yield slice(q0, min(nq, q0 + cq)), slice(g0, min(ng, g0 + cg))


def max_sim_chunked(
    query: Tensor,
    gallery: Tensor,
    score_embed: Optional[Tensor] = None,
    *,
    return_indices: bool = False,
    max_elements: Optional[int] = None,
):
    """:func:`max_sim` computed in blocks of at most ``max_elements`` score values."""
    nq, lq, _ = query.shape
    ng, lg, _ = gallery.shape
    out = output_dtype(query.dtype)
    q_best = query.new_empty((nq, ng, lq), dtype=out)
    g_best = query.new_empty((nq, ng, lg), dtype=out)
    q_index = query.new_empty((nq, ng, lq), dtype=torch.int32)
    g_index = query.new_empty((nq, ng, lg), dtype=torch.int32)
    for qs, gs in iter_blocks(nq, ng, lq * lg, max_elements):
        block = max_sim(query[qs], gallery[gs], score_embed, return_indices=True)
        q_best[qs, gs], g_best[qs, gs], q_index[qs, gs], g_index[qs, gs] = block
    if return_indices:
        return q_best, g_best, q_index, g_index
    return q_best, g_best


def max_sim_chunked_backward(
    grad_q_best: Optional[Tensor],
    grad_g_best: Optional[Tensor],
    query: Tensor,
    gallery: Tensor,
    score_embed: Optional[Tensor] = None,
    *,
    max_elements: Optional[int] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Gradients of :func:`max_sim_chunked` with respect to query, gallery and score_embed.

    This is the backward that autograd derives for :func:`max_sim`, written out per block (each
    block's scores are recomputed, so the same argmax routes each gradient); written out because
    it also runs inside the custom op, where autograd does not record.
    """
    nq, lq, _ = query.shape
    ng, lg, _ = gallery.shape
    grad_query = torch.zeros_like(query)
    grad_gallery = torch.zeros_like(gallery)
    grad_embed = None if score_embed is None else torch.zeros_like(score_embed)
    gate = None if score_embed is None else torch.sigmoid(score_embed)
    for qs, gs in iter_blocks(nq, ng, lq * lg, max_elements):
        q, g = query[qs], gallery[gs]
        dots = torch.einsum("itd,jsd->ijst", q, g)
        scores = dots if gate is None else dots * gate
        # d scores: max backward puts each output's gradient at its argmax.
        d_scores = torch.zeros_like(scores)
        if grad_q_best is not None:
            index = scores.max(dim=2).indices.unsqueeze(2)
            d_scores.scatter_add_(2, index, grad_q_best[qs, gs].unsqueeze(2).to(scores.dtype))
        if grad_g_best is not None:
            index = scores.max(dim=3).indices.unsqueeze(3)
            d_scores.scatter_add_(3, index, grad_g_best[qs, gs].unsqueeze(3).to(scores.dtype))
        d_dots = d_scores if gate is None else d_scores * gate
        grad_query[qs] += torch.einsum("ijst,jsd->itd", d_dots, g).to(query.dtype)
        grad_gallery[gs] += torch.einsum("ijst,itd->jsd", d_dots, q).to(gallery.dtype)
        if grad_embed is not None:
            # d sigmoid(E) / dE = sig (1 - sig), and dots * sig = scores
            grad_embed += (d_scores * scores * (1 - gate)).sum((0, 1)).to(grad_embed.dtype)
    return grad_query, grad_gallery, grad_embed


def max_sim_grads(
    grad_q_best: Tensor,
    grad_g_best: Tensor,
    query: Tensor,
    gallery: Tensor,
    score_embed: Optional[Tensor],
    q_index: Tensor,
    g_index: Tensor,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The fused kernels' backward formula, densely, for given argmax indices.

    Every output element routes its gradient ``w`` to one location pair ``(s, t)``:
    ``dq[i,t] += w sig[s,t] g[j,s]``, ``dg[j,s] += w sig[s,t] q[i,t]`` and
    ``dE[s,t] += w S[s,t] (1 - sig[s,t])``. Memory is O(Nq*Ng*L*D): for tests on small shapes.
    """
    nq, lq, d = query.shape
    ng, lg, _ = gallery.shape
    sig = (
        torch.sigmoid(score_embed.to(query.dtype))
        if score_embed is not None
        else query.new_ones((lg, lq))
    )
    i = torch.arange(nq, device=query.device).view(nq, 1, 1)
    j = torch.arange(ng, device=query.device).view(1, ng, 1)
    t_of_q = torch.arange(lq, device=query.device).view(1, 1, lq).expand(nq, ng, lq)
    s_of_g = torch.arange(lg, device=query.device).view(1, 1, lg).expand(nq, ng, lg)
    # Both directions as one list of routed elements: (i, j, s, t, w).
    s_all = torch.cat([q_index.long(), s_of_g], dim=2)
    t_all = torch.cat([t_of_q, g_index.long()], dim=2)
    w_all = torch.cat([grad_q_best, grad_g_best], dim=2).to(query.dtype)
    i_all, j_all = i.expand_as(s_all), j.expand_as(s_all)
    q_rows = query[i_all, t_all]  # [nq, ng, lq+lg, d]
    g_rows = gallery[j_all, s_all]
    gate = sig[s_all, t_all]
    coef = (w_all * gate).unsqueeze(-1)
    grad_query = torch.zeros_like(query).view(nq * lq, d)
    grad_query.index_add_(0, (i_all * lq + t_all).flatten(), (coef * g_rows).flatten(0, 2))
    grad_gallery = torch.zeros_like(gallery).view(ng * lg, d)
    grad_gallery.index_add_(0, (j_all * lg + s_all).flatten(), (coef * q_rows).flatten(0, 2))
    grad_embed = None
    if score_embed is not None:
        best = (q_rows * g_rows).sum(-1) * gate  # S at the routed pair
        grad_embed = torch.zeros_like(sig).view(-1)
        grad_embed.index_add_(0, (s_all * lq + t_all).flatten(), (w_all * best * (1 - gate)).flatten())
        grad_embed = grad_embed.view(lg, lq)
    return grad_query.view(nq, lq, d), grad_gallery.view(ng, lg, d), grad_embed


# --------------------------------------------------------------------------------------------
# Upstream's matchers, materialised: the ground truth for transmatcher_fast.models.
# Written from the reference document's equations (TransMatcher §1.3-1.4, QAConv §4); they read
# the parameters and BatchNorm modules of a matcher built with upstream's module tree, and run
# those BatchNorms exactly as upstream does (so running statistics update in training mode).


def pool_both_directions(score: Tensor, indices: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """Upstream's global max pooling of ``score [n, Lg, Lq]`` (gallery locations s, probe
    locations t): ``cat(max over s, max over t)``, ``[n, Lq + Lg]``.

    With ``indices = (q_index [n, Lq], g_index [n, Lg])`` the values are taken at those locations
    instead. Tests route the float64 reference through the argmax a float32 run chose: where two
    maxima are equal within float32 rounding either choice is right, and the gradient (which
    flows to one location) depends on the choice; the values still show a wrong choice."""
    if indices is None:
        return torch.cat((score.max(dim=1)[0], score.max(dim=2)[0]), dim=-1)
    q_index, g_index = (i.reshape(score.shape[0], -1).long() for i in indices)
    q_best = score.gather(1, q_index.unsqueeze(1)).squeeze(1)
    g_best = score.gather(2, g_index.unsqueeze(2)).squeeze(2)
    return torch.cat((q_best, g_best), dim=-1)


def transmatcher_layer_scores(layer, tgt: Tensor, memory: Tensor,
                              indices: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """Upstream's decoder layer: probe ``tgt [q, h, w, d]``, gallery ``memory [k, h, w, d]`` ->
    ``[q, k]``, building the ``[q, k, L, L]`` gated score tensor. ``indices``: see
    :func:`pool_both_directions`."""
    q, k, d = tgt.shape[0], memory.shape[0], tgt.shape[-1]
    length = layer.score_embed.shape[-1]
    query = layer.fc1(tgt.reshape(q, length, d))      # probe locations t
    key = layer.fc1(memory.reshape(k, length, d))     # gallery locations s
    score = torch.einsum("qtd,ksd->qkst", query, key) * layer.score_embed.sigmoid()
    # Per pair: max over gallery locations (one per probe location), then over probe locations.
    score = pool_both_directions(score.reshape(q * k, length, length), indices)
    score = layer.bn1(score.view(-1, 1, length)).view(-1, length)
    score = layer.fc3(layer.relu(layer.bn2(layer.fc2(score))))
    score = layer.bn3(score.view(-1, 2).sum(dim=-1, keepdim=True))
    return score.view(q, k)


def transmatcher_scores(matcher, probe: Tensor, gallery: Tensor,
                        indices: Optional[list[tuple[Tensor, Tensor]]] = None) -> Tensor:
    """Upstream's ``make_kernel(probe); forward(gallery)``: the channel chunk n of both feature
    maps goes through decoder layer n, the layer scores are summed, then the final scalar BN.
    ``indices``: one ``(q_index, g_index)`` per layer (see :func:`pool_both_directions`)."""
    layers = matcher.decoder.layers
    probe_parts = probe.chunk(len(layers), dim=-1)
    gallery_parts = gallery.chunk(len(layers), dim=-1)
    score = None
    for n, (layer, p, g) in enumerate(zip(layers, probe_parts, gallery_parts)):
        s = transmatcher_layer_scores(layer, p, g, None if indices is None else indices[n])
        score = s if score is None else score + s
    q, k = score.shape
    return matcher.decoder.norm(score.view(-1, 1)).view(q, k)


def qaconv_scores(matcher, probe: Tensor, gallery: Tensor,
                  indices: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """Upstream's QAConv: probe ``[p, C, h, w]``, gallery ``[g, C, h, w]`` -> ``[p, g]``.
    ``indices``: see :func:`pool_both_directions`."""
    p, g, c = probe.shape[0], gallery.shape[0], probe.shape[1]
    hw = probe.shape[2] * probe.shape[3]
    score = torch.einsum("pcs,gcr->pgrs", probe.reshape(p, c, hw), gallery.reshape(g, c, hw))
    score = pool_both_directions(score.reshape(p * g, hw, hw), indices)
    score = matcher.bn(score.view(-1, 1, hw)).view(-1, hw)
    score = matcher.fc(score).view(-1, 2).sum(dim=1, keepdim=True)
    return matcher.logit_bn(score).view(p, g)
