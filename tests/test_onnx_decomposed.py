"""``ops.decomposed``: max_sim as plain blocked PyTorch equals the fused op, and replaces it only
inside exports."""

from __future__ import annotations

import pytest
import torch

import transmatcher_fast as tmf
from transmatcher_fast.ops import decomposed


def _inputs(nq, ng, lq, lg, d, dtype, gate=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(nq, lq, d, generator=generator, dtype=dtype)
    gallery = torch.randn(ng, lg, d, generator=generator, dtype=dtype)
    score_embed = torch.randn(lg, lq, generator=generator, dtype=dtype) if gate else None
    return query, gallery, score_embed


def _rel(actual, expected) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


# Odd sizes; max_elements from one pair per block to everything at once, through block
# boundaries that fall inside a gallery row, on it, and just past it.
@pytest.mark.parametrize("pairs_per_block", [1, 2, 3, 6, 7, 8, 13, 14, 15, 1000])
@pytest.mark.parametrize("gate", [True, False])
def test_decomposed_equals_the_fused_op_at_block_boundaries(pairs_per_block, gate):
    nq, ng, lq, lg, d = 5, 7, 3, 5, 6
    query, gallery, score_embed = _inputs(nq, ng, lq, lg, d, torch.float64, gate)
    expected = tmf.max_sim(query, gallery, score_embed)
    actual = decomposed.max_sim_decomposed(query, gallery, score_embed,
                                           max_elements=pairs_per_block * lq * lg)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (3, 4, 9, 7, 5), (2, 9, 16, 16, 12)])
def test_decomposed_equals_the_fused_op_in_float32(shape):
    query, gallery, score_embed = _inputs(*shape, torch.float32, seed=1)
    expected = tmf.max_sim(query, gallery, score_embed)
    actual = decomposed.max_sim_decomposed(query, gallery, score_embed, max_elements=37)
    for a, e in zip(actual, expected):
        assert a.dtype == torch.float32
        assert _rel(a, e) < 1e-5


def test_decomposed_empty_and_bad_block():
    query, gallery, score_embed = _inputs(0, 3, 2, 4, 5, torch.float32)
    q_best, g_best = decomposed.max_sim_decomposed(query, gallery, score_embed)
    assert q_best.shape == (0, 3, 2) and g_best.shape == (0, 3, 4)
    with pytest.raises(ValueError, match="max_elements must be positive"):
        decomposed.max_sim_decomposed(*_inputs(1, 1, 1, 1, 1, torch.float32), max_elements=0)


def _fused_nodes(graph) -> list:
    return [n for n in graph.nodes() if n.kind() == "transmatcher_fast::max_sim"]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # sizes are constant by design
def test_max_sim_records_its_decomposition_only_when_asked():
    query, gallery, score_embed = _inputs(2, 3, 4, 5, 6, torch.float32)

    def scores(q, g):
        q_best, g_best = tmf.max_sim(q, g, score_embed)
        return q_best.sum(-1) + g_best.sum(-1)

    assert not decomposed.replaces_fused_op()  # eager calls run the fused op
    fused = torch.jit.trace(scores, (query, gallery), check_trace=False)
    assert _fused_nodes(fused.graph)
    with decomposed.decompose_while_tracing():
        plain = torch.jit.trace(scores, (query, gallery), check_trace=False)
        with decomposed.keep_fused():
            assert not decomposed.replaces_fused_op()
    assert not _fused_nodes(plain.graph)
    torch.testing.assert_close(plain(query, gallery), scores(query, gallery), rtol=1e-5, atol=1e-5)
    assert not decomposed.replaces_fused_op()
