"""The reference itself: upstream's formula, its chunked variant and its gradient helpers."""

import pytest
import torch

from helpers import grads_by_autograd, make_inputs, rel_err
from transmatcher_fast import reference


def naive_max_sim(query, gallery, score_embed):
    """Loops over pairs and locations, straight from the definition."""
    nq, lq, _ = query.shape
    ng, lg, _ = gallery.shape
    q_best = torch.empty(nq, ng, lq, dtype=torch.float64)
    g_best = torch.empty(nq, ng, lg, dtype=torch.float64)
    for i in range(nq):
        for j in range(ng):
            s_mat = torch.empty(lg, lq, dtype=torch.float64)
            for s in range(lg):
                for t in range(lq):
                    gate = 1.0 if score_embed is None else torch.sigmoid(score_embed[s, t].double())
                    s_mat[s, t] = torch.dot(gallery[j, s], query[i, t]) * gate
            q_best[i, j] = s_mat.max(dim=0).values
            g_best[i, j] = s_mat.max(dim=1).values
    return q_best, g_best


@pytest.mark.parametrize("gate", [True, False])
def test_reference_matches_the_definition(rng, gate):
    query, gallery, embed = make_inputs(rng, 2, 3, 4, 5, 3, gate=gate)
    embed = None if embed is None else embed.double()
    expected = naive_max_sim(query, gallery, embed)
    got = reference.max_sim(query, gallery, embed)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("max_elements", [1, 7, 30, 10**9])
def test_chunked_equals_one_shot(rng, max_elements):
    query, gallery, embed = make_inputs(rng, 5, 4, 3, 2, 6)
    full = reference.max_sim(query, gallery, embed, return_indices=True)
    chunked = reference.max_sim_chunked(query, gallery, embed, return_indices=True,
                                        max_elements=max_elements)
    # Blocks change the GEMM shapes, hence the summation order: values agree to rounding.
    for a, b in zip(chunked[:2], full[:2]):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    for a, b in zip(chunked[2:], full[2:]):
        assert torch.equal(a, b)


def test_chunked_backward_equals_autograd(rng):
    query, gallery, embed = make_inputs(rng, 4, 3, 5, 6, 4)
    embed = embed.double()
    grad_q = torch.randn(4, 3, 5, generator=rng, dtype=torch.float64)
    grad_g = torch.randn(4, 3, 6, generator=rng, dtype=torch.float64)
    expected = grads_by_autograd(reference.max_sim, query, gallery, embed, grad_q, grad_g)
    got = reference.max_sim_chunked_backward(grad_q, grad_g, query, gallery, embed, max_elements=40)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gate", [True, False])
def test_index_routed_grads_equal_autograd(rng, gate):
    query, gallery, embed = make_inputs(rng, 3, 4, 7, 5, 6, gate=gate)
    embed = None if embed is None else embed.double()
    grad_q = torch.randn(3, 4, 7, generator=rng, dtype=torch.float64)
    grad_g = torch.randn(3, 4, 5, generator=rng, dtype=torch.float64)
    _, _, q_index, g_index = reference.max_sim(query, gallery, embed, return_indices=True)
    expected = grads_by_autograd(reference.max_sim, query, gallery, embed, grad_q, grad_g)
    got = reference.max_sim_grads(grad_q, grad_g, query, gallery, embed, q_index, g_index)
    for a, b in zip(got, expected):
        if b is None:
            assert a is None
        else:
            assert rel_err(a, b) < 1e-12


def test_16bit_reference_outputs_float32(rng):
    query, gallery, embed = make_inputs(rng, 2, 2, 3, 3, 4, gate=False, dtype=torch.float16)
    q_best, g_best = reference.max_sim(query, gallery)
    assert q_best.dtype == g_best.dtype == torch.float32


def test_iter_blocks_rejects_non_positive_budget():
    with pytest.raises(ValueError, match="max_elements"):
        list(reference.iter_blocks(2, 2, 4, max_elements=0))
