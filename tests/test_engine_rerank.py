"""k-reciprocal re-ranking: the bounded version against a dense textbook one, a hand-checked case."""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest
import torch

from transmatcher_fast.engine import rerank as rerank_module
from transmatcher_fast.engine.rerank import k_reciprocal_rerank


def dense_rerank(q_g, q_q, g_g, k1, k2, lam, square=False):
    """Zhong et al.'s re-ranking written out densely (as in the public distance-matrix
    ``re_ranking``), with two choices made explicit: V is float32 (QAConv's copy uses float16,
    torchreid's float32) and neighbours come from a stable argsort (ties by index)."""
    d = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float32)
    if square:
        d = d * d
    o = (d / d.max(axis=0)).T  # row i = column i of the joint matrix over its maximum
    n, nq = len(o), len(q_q)
    rank = np.argsort(o, axis=1, kind="stable")

    def reciprocal(i, k):
        fwd = rank[i, : k + 1]
        return fwd[(rank[fwd, : k + 1] == i).any(axis=1)]

    v = np.zeros((n, n), np.float32)
    half = int(np.around(k1 / 2))
    for i in range(n):
        nb = reciprocal(i, k1)
        grown = nb
        for c in nb:
            cand = reciprocal(c, half)
            if len(np.intersect1d(cand, nb)) > 2 / 3 * len(cand):
                grown = np.append(grown, cand)
        grown = np.unique(grown)
        w = np.exp(-o[i, grown])
        v[i, grown] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    shared = np.minimum(v[:nq, None, :], v[None, :, :]).sum(axis=2)
    jaccard = 1 - shared / (2 - shared)
    return (jaccard * (1 - lam) + o[:nq] * lam)[:, nq:]


def clustered(rng, nq, ng, n_ids=6, dim=8, asymmetric=False):
    """Query / gallery features around identity centres; 1 - sigmoid-like distances in (0, 1)."""
    centres = rng.normal(size=(n_ids, dim))
    q = centres[rng.integers(0, n_ids, nq)] + 0.6 * rng.normal(size=(nq, dim))
    g = centres[rng.integers(0, n_ids, ng)] + 0.6 * rng.normal(size=(ng, dim))

    def dist(a, b):
        e = np.linalg.norm(a[:, None] - b[None], axis=2)
        if asymmetric:  # a matcher scores probe against gallery: no symmetry
            e = e + 0.05 * rng.random(e.shape)
        return (1 - 1 / (1 + np.exp(-(4 - e)))).astype(np.float32)

    return dist(q, g), dist(q, q), dist(g, g)


@pytest.mark.parametrize(
    "nq, ng, k1, k2, lam, chunk, asym",
    [
        (7, 40, 20, 6, 0.3, 256, False),   # paper setting, one chunk
        (25, 60, 20, 6, 0.3, 8, True),     # chunks smaller than Nq, asymmetric matcher
        (12, 50, 5, 1, 0.3, 5, True),      # no query expansion
        (9, 30, 3, 2, 0.0, 4, False),      # pure Jaccard, odd k1 (round(1.5) = 2)
        (5, 20, 1, 3, 1.0, 1, True),       # lambda = 1: the normalised original distance
        (3, 4, 20, 6, 0.3, 2, False),      # k1, k2 larger than the whole set
        (1, 1, 2, 6, 0.5, 3, False),
    ],
)
def test_matches_dense_reference(nq, ng, k1, k2, lam, chunk, asym):
    rng = np.random.default_rng(nq * 1000 + ng)
    q_g, q_q, g_g = clustered(rng, nq, ng, asymmetric=asym)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = k_reciprocal_rerank(q_g, q_q, g_g, k1, k2, lam, chunk=chunk)
    too_big = k1 >= nq + ng or k2 > nq + ng  # clamped to the whole set, with a warning
    assert len([w for w in caught if "re-ranking" in str(w.message)]) == int(too_big)
    assert out.shape == (nq, ng) and out.dtype == np.float32
    np.testing.assert_allclose(out, dense_rerank(q_g, q_q, g_g, k1, k2, lam), rtol=0, atol=1e-5)


def test_square_ties_and_torch_inputs():
    rng = np.random.default_rng(11)
    q_g, q_q, g_g = clustered(rng, 10, 35)
    out = k_reciprocal_rerank(torch.from_numpy(q_g), torch.from_numpy(q_q), torch.from_numpy(g_g),
                              6, 3, 0.3, chunk=7, square=True)
    np.testing.assert_allclose(out, dense_rerank(q_g, q_q, g_g, 6, 3, 0.3, square=True), atol=1e-5)
    # Many ties (integer distances): neighbours are picked by index like a stable argsort.
    q_g, q_q, g_g = (np.round(m * 6) for m in (q_g, q_q, g_g))
    out = k_reciprocal_rerank(q_g, q_q, g_g, 4, 2, 0.3, chunk=3)
    np.testing.assert_allclose(out, dense_rerank(q_g, q_q, g_g, 4, 2, 0.3), atol=1e-5)


def test_hand_checked_fix_of_rank1():
    # 1-D positions. The query q (identity A, at 0) is nearest to the impostor x (B, at 1.0); its
    # true match t (A, at -1.1) is second. x's 2 nearest neighbours are its own identity (b2, b3),
    # so x and q are not reciprocal neighbours, while t's are {a2, q}: with k1=2, k2=1 the Jaccard
    # distance of (q, x) is 1 and that of (q, t) well below it.
    q = np.array([0.0])
    g = np.array([1.0, -1.1, -1.3, 1.5, 1.6])  # x, t, a2, b2, b3
    d = lambda a, b: np.abs(a[:, None] - b[None, :]).astype(np.float32)  # noqa: E731
    q_g, q_q, g_g = d(q, g), d(q, q), d(g, g)
    assert q_g.argmin() == 0
    out = k_reciprocal_rerank(q_g, q_q, g_g, k1=2, k2=1, lambda_value=0.3)
    assert out.argmin() == 1

    # By hand: q's column of the joint matrix has maximum 1.6 (to b3), t's 2.7 (t to b3).
    # V[q] over q's k-reciprocal set {q, t}: softmax(-[0, 1.1/1.6]).
    vq = np.exp(-np.array([0.0, 1.1 / 1.6]))
    vq /= vq.sum()
    # V[t] over {t, a2, q} (each of the half-size sets {t, a2}, {a2, t}, {q} joins): softmax(-[0, .2, 1.1]/2.7).
    vt = np.exp(-np.array([0.0, 0.2, 1.1]) / 2.7)
    vt /= vt.sum()
    shared = min(vq[0], vt[2]) + min(vq[1], vt[0])  # overlap on q and on t
    expect_t = (1 - shared / (2 - shared)) * 0.7 + 0.3 * 1.1 / 1.6
    expect_x = 1.0 * 0.7 + 0.3 * 1.0 / 1.6  # no overlap: Jaccard distance 1
    assert out[0, 1] == pytest.approx(expect_t, abs=1e-6)
    assert out[0, 0] == pytest.approx(expect_x, abs=1e-6)
    np.testing.assert_allclose(out, dense_rerank(q_g, q_q, g_g, 2, 1, 0.3), atol=1e-6)


def test_argument_errors():
    rng = np.random.default_rng(0)
    q_g, q_q, g_g = clustered(rng, 4, 6)
    with pytest.raises(ValueError, match="q_q"):
        k_reciprocal_rerank(q_g, q_q[:3, :3], g_g)
    with pytest.raises(ValueError, match="g_g"):
        k_reciprocal_rerank(q_g, q_q, g_g[:, :5])
    with pytest.raises(ValueError, match="q_g"):
        k_reciprocal_rerank(q_g[0], q_q, g_g)
    with pytest.raises(ValueError, match="k1"):
        k_reciprocal_rerank(q_g, q_q, g_g, k1=0)
    with pytest.raises(ValueError, match="k2"):
        k_reciprocal_rerank(q_g, q_q, g_g, k2=1.5)
    with pytest.raises(ValueError, match="chunk"):
        k_reciprocal_rerank(q_g, q_q, g_g, chunk=0)
    with pytest.raises(ValueError, match="lambda_value"):
        k_reciprocal_rerank(q_g, q_q, g_g, lambda_value=1.5)
    with pytest.raises(ValueError, match="NaN"):
        k_reciprocal_rerank(np.full_like(q_g, np.nan), q_q, g_g)
    with pytest.raises(ValueError, match="non-negative"):
        k_reciprocal_rerank(-q_g, -q_q, -g_g, k1=3, k2=2)


def test_k_larger_than_the_set_is_clamped_with_a_warning():
    rng = np.random.default_rng(5)
    q_g, q_q, g_g = clustered(rng, 4, 6)  # 10 images
    with pytest.warns(RuntimeWarning, match=r"k1=10 .*10 images \(4 queries \+ 6 gallery\)"):
        out = k_reciprocal_rerank(q_g, q_q, g_g, k1=10, k2=3)
    np.testing.assert_allclose(out, dense_rerank(q_g, q_q, g_g, 10, 3, 0.3), atol=1e-5)
    with pytest.warns(RuntimeWarning, match=r"k2=11 .*10 images"):
        k_reciprocal_rerank(q_g, q_q, g_g, k1=3, k2=11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # k1 + 1 = 10 neighbours, k2 = 10: fits exactly, no warning
        out = k_reciprocal_rerank(q_g, q_q, g_g, k1=9, k2=10)
    np.testing.assert_allclose(out, dense_rerank(q_g, q_q, g_g, 9, 10, 0.3), atol=1e-5)


@pytest.mark.parametrize("k1, k2, chunk", [(20, 6, 7), (39, 3, 5), (8, 1, 64)])
def test_row_blocks_of_every_step(monkeypatch, k1, k2, chunk):
    """A budget of one row per block (a row alone is over it): every step runs in many blocks."""
    monkeypatch.setattr(rerank_module, "_MIN_BUDGET", 1)
    rng = np.random.default_rng(k1)
    q_g, q_q, g_g = clustered(rng, 11, 30, asymmetric=True)
    out = k_reciprocal_rerank(q_g, q_q, g_g, k1, k2, 0.3, chunk=chunk)
    np.testing.assert_allclose(out, dense_rerank(q_g, q_q, g_g, k1, k2, 0.3), rtol=0, atol=1e-5)


def test_memory_is_linear_in_k1_not_cubic():
    """k1 close to the set size: the old [chunk, k1+1, k1/2+1, k1+1] comparison tensor alone was
    256 * 181 * 91 * 181 bytes = 763 MiB here. numpy's buffers are traced by tracemalloc."""
    rng = np.random.default_rng(3)
    q_g, q_q, g_g = clustered(rng, 40, 160, n_ids=20)
    n, k1 = 200, 180
    tracemalloc.start()
    try:
        out = k_reciprocal_rerank(q_g, q_q, g_g, k1, 6, 0.3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Bound: 64 bytes per element of a chunk * n block (several int64 temporaries) plus 64 bytes
    # per (row, neighbour) for neighbours and V (~16 bytes an entry, a few k1 entries a row).
    budget = max(256 * n, rerank_module._MIN_BUDGET)
    assert peak < 64 * budget + 64 * n * (k1 + 1) * 6, peak
    np.testing.assert_allclose(out, dense_rerank(q_g, q_q, g_g, k1, 6, 0.3), rtol=0, atol=1e-5)
