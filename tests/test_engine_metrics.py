"""CMC / mAP / mINP: hand-computed cases, sklearn's AP (with ties), streaming, top-k, cuhk03."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import transmatcher_fast.engine.metrics as metrics_module
from transmatcher_fast.engine.metrics import (
    PROTOCOLS,
    RankingMetrics,
    evaluate,
    topk_margin,
    valid_gallery_mask,
)

sk_metrics = pytest.importorskip("sklearn.metrics")

# Gallery: pid 0 is a distractor; the query ids below exercise every rule once.
G_PIDS = [1, 2, 1, 0, 1]
G_CAMS = [1, 1, 1, 1, 0]
Q_PIDS = [1, 2, 5, 1]
Q_CAMS = [0, 0, 1, 1]
DIST = np.array([
    # q0 (pid 1, cam 0): g4 is the same shot (excluded) although nearest; matches at ranks 1 and 3
    [0.1, 0.2, 0.3, 0.4, 0.0],
    # q1 (pid 2, cam 0): the one match at rank 1
    [0.5, 0.1, 0.6, 0.7, 0.8],
    # q2 (pid 5): no match in the gallery -> skipped
    [0.1, 0.2, 0.3, 0.4, 0.5],
    # q3 (pid 1, cam 1): g0, g2 excluded; the distractor g3 beats the match g4 -> rank 2
    [0.0, 0.3, 0.0, 0.2, 0.25],
])


def naive(dist, qp, qc, gp, gc, max_rank=50):
    """Per-query loops over a stable argsort: first-match CMC, sklearn AP, INP (Ye et al.), and
    upstream's (open-reid's) AP = auc(recall, precision) of sklearn's precision-recall curve."""
    gp, gc = np.asarray(gp), np.asarray(gc)
    hits, aps, inps, traps, skipped = np.zeros(max_rank), [], [], [], 0
    for i in range(len(qp)):
        valid = (gp != qp[i]) | (gc != qc[i])
        d, m = dist[i][valid], (gp == qp[i])[valid]
        if not m.any():
            skipped += 1
            continue
        ranked = m[np.argsort(d, kind="stable")]
        pos = np.nonzero(ranked)[0]
        if pos[0] < max_rank:
            hits[pos[0]:] += 1
        aps.append(sk_metrics.average_precision_score(m, -d))
        precision, recall, _ = sk_metrics.precision_recall_curve(m, -d)
        traps.append(sk_metrics.auc(recall, precision))
        inps.append(m.sum() / (pos[-1] + 1))
    if not aps:
        return None
    return hits / len(aps), float(np.mean(aps)), float(np.mean(inps)), skipped, float(np.mean(traps))


def random_case(rng, nq, ng, n_ids=6, n_cams=3, ties=False):
    gp, gc = rng.integers(0, n_ids, ng), rng.integers(0, n_cams, ng)
    qp, qc = rng.integers(1, n_ids + 1, nq), rng.integers(0, n_cams, nq)
    dist = rng.integers(0, 4, (nq, ng)).astype(np.float32) if ties else rng.random((nq, ng))
    return dist, qp, qc, gp, gc


def test_hand_computed():
    r = evaluate(DIST, Q_PIDS, Q_CAMS, G_PIDS, G_CAMS, max_rank=4)
    assert r["num_queries"] == 3 and r["num_skipped"] == 1
    # first-match ranks 1, 1, 2
    assert r["cmc"] == pytest.approx([2 / 3, 1, 1, 1])
    assert r["rank1"] == pytest.approx(2 / 3) and r["rank5"] is None  # beyond max_rank
    # AP: q0 (1/1 + 2/3)/2, q1 1, q3 1/2;  INP: q0 2/3, q1 1, q3 1/2
    assert r["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 1 + 1 / 2) / 3)
    assert r["mINP"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    assert r["topk"] is None and r["protocol"] == "market"


def test_hand_computed_trapezoid_ap():
    # q0 alone, matches at ranks 1 and 3 of 4: the PR curve (0, 1) (.5, 1) (.5, .5) (1, 2/3) (1, .5)
    # has trapezoid area .5 * 1 + .5 * (1/2 + 2/3) / 2 = 19/24 (step-wise AP: 5/6).
    r = evaluate(DIST[:1], Q_PIDS[:1], Q_CAMS[:1], G_PIDS, G_CAMS, ap_mode="trapezoid")
    assert r["mAP"] == pytest.approx(19 / 24)


def test_valid_mask_and_margin():
    mask = valid_gallery_mask(Q_PIDS, Q_CAMS, G_PIDS, G_CAMS)
    assert mask.shape == (4, 5) and mask.dtype == bool
    assert mask.tolist() == [
        [True, True, True, True, False],
        [True, True, True, True, True],
        [True, True, True, True, True],
        [False, True, False, True, True],
    ]
    assert topk_margin(Q_PIDS, Q_CAMS, G_PIDS, G_CAMS) == 2
    assert topk_margin([7], [0], G_PIDS, G_CAMS) == 0


def test_ties_follow_sklearn():
    # one threshold {negative, positive} at 0.1, then a positive: AP = 1/2 * 1/2 + 1/2 * 2/3
    r = evaluate([[0.1, 0.1, 0.3]], [1], [0], [2, 1, 1], [1, 1, 1])
    assert r["mAP"] == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert r["rank1"] == 0.0  # CMC breaks ties by gallery order: the negative comes first
    assert r["mINP"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("ties", [False, True])
def test_random_against_naive_and_sklearn(ties):
    rng = np.random.default_rng(1 + ties)
    for _ in range(20):
        nq, ng = int(rng.integers(1, 12)), int(rng.integers(1, 60))
        dist, qp, qc, gp, gc = random_case(rng, nq, ng, ties=ties)
        expected = naive(dist, qp, qc, gp, gc, max_rank=20)
        if expected is None:
            continue
        cmc, m_ap, m_inp, skipped, m_trap = expected
        r = evaluate(dist, qp, qc, gp, gc, max_rank=20)
        assert r["num_skipped"] == skipped
        np.testing.assert_allclose(r["cmc"], cmc, rtol=0, atol=1e-12)
        assert r["mAP"] == pytest.approx(m_ap, abs=1e-12)
        assert r["mINP"] == pytest.approx(m_inp, abs=1e-12)
        trap = evaluate(dist, qp, qc, gp, gc, max_rank=20, ap_mode="trapezoid")
        assert trap["mAP"] == pytest.approx(m_trap, abs=1e-12)
        assert {**trap, "mAP": None} == {**r, "mAP": None}


def test_streaming_equals_one_shot_and_torch_inputs(monkeypatch):
    rng = np.random.default_rng(3)
    dist, qp, qc, gp, gc = random_case(rng, 37, 80, ties=True)
    for protocol in PROTOCOLS:
        full = evaluate(dist, qp, qc, gp, gc, protocol=protocol, seed=5)
        with monkeypatch.context() as patch:  # add() ranks in internal row blocks: 3 rows here
            patch.setattr(metrics_module, "_BLOCK_ENTRIES", 240)
            assert evaluate(dist, qp, qc, gp, gc, protocol=protocol, seed=5) == full
        m = RankingMetrics(torch.as_tensor(gp), list(gc), protocol=protocol, seed=5)
        for a, b in [(0, 0), (0, 5), (5, 6), (6, 30), (30, 37)]:
            m.add(torch.as_tensor(dist[a:b]), torch.as_tensor(qp[a:b]), qc[a:b].tolist())
        assert m.result() == full


def topk_lists(dist, k, rng):
    """The k nearest items per row in shuffled column order (the engine's lists need no order)."""
    idx = np.argsort(dist, axis=1, kind="stable")[:, :k]
    idx = np.take_along_axis(idx, rng.permuted(np.tile(np.arange(k), (len(dist), 1)), axis=1), axis=1)
    return np.take_along_axis(dist, idx, axis=1), idx


@pytest.mark.parametrize("ap_mode", ["sklearn", "trapezoid"])
def test_topk_full_length_equals_full(ap_mode):
    rng = np.random.default_rng(4)
    dist, qp, qc, gp, gc = random_case(rng, 20, 30, ties=True)
    full = evaluate(dist, qp, qc, gp, gc, ap_mode=ap_mode)
    m = RankingMetrics(gp, gc, ap_mode=ap_mode)
    m.add_topk(*topk_lists(dist, 30, rng), qp, qc)
    r = m.result()
    assert r.pop("topk") == 30 and full.pop("topk") is None
    assert r.pop("cmc") == full.pop("cmc")[:30]  # a 30-item gallery: the CMC is flat after rank 30
    assert r == full


def test_topk_small_k():
    rng = np.random.default_rng(5)
    dist, qp, qc, gp, gc = random_case(rng, 40, 60)
    full = evaluate(dist, qp, qc, gp, gc)
    k = 7
    margin = topk_margin(qp, qc, gp, gc)
    assert margin > 0
    m = RankingMetrics(gp, gc)
    m.add_topk(*topk_lists(dist, k + margin, rng), qp, qc, k=k)
    r = m.result()
    assert r["topk"] == k and len(r["cmc"]) == k
    np.testing.assert_allclose(r["cmc"], full["cmc"][:k], atol=1e-12)
    assert r["rank5"] == full["rank5"] and r["rank10"] is None and r["rank20"] is None
    assert r["mAP"] <= full["mAP"] and r["mINP"] <= full["mINP"]
    assert r["num_queries"] == full["num_queries"] and r["num_skipped"] == full["num_skipped"]
    # Without the margin, the lists lose excluded items and are too short for depth k.
    short = RankingMetrics(gp, gc)
    with pytest.raises(ValueError, match="topk_margin"):
        short.add_topk(*topk_lists(dist, k, rng), qp, qc)


def test_topk_equals_full_when_positives_are_within_k():
    rng = np.random.default_rng(6)
    dist, qp, qc, gp, gc = random_case(rng, 25, 50)
    same = np.asarray(gp)[None, :] == np.asarray(qp)[:, None]
    dist = dist + 2.0 * ~same  # every positive (and excluded item) ahead of every negative
    k = int(same.sum(axis=1).max())
    full = evaluate(dist, qp, qc, gp, gc)
    m = RankingMetrics(gp, gc)
    m.add_topk(*topk_lists(dist, k + topk_margin(qp, qc, gp, gc), rng), qp, qc, k=k)
    r = m.result()
    assert r["mAP"] == pytest.approx(full["mAP"], abs=1e-12)
    assert r["mINP"] == pytest.approx(full["mINP"], abs=1e-12)


def test_cuhk03_single_shot():
    rng = np.random.default_rng(7)
    # One image per gallery identity: the single-shot draw is the whole gallery.
    ng = 30
    gp, gc = np.arange(ng), rng.integers(0, 2, ng)
    qp, qc = rng.integers(0, ng, 25), rng.integers(0, 2, 25)
    dist = rng.random((25, ng))
    market = evaluate(dist, qp, qc, gp, gc)
    assert evaluate(dist, qp, qc, gp, gc, protocol="cuhk03") == {**market, "protocol": "cuhk03"}

    # Match at 0.5; identity 2 has one image in front of it (0.1) and one behind it (0.9): the
    # match is rank 1 in the draws that pick 0.9, rank 2 otherwise.
    n = 200
    d = np.tile([0.5, 0.1, 0.9], (n, 1))
    args = (np.ones(n, int), np.zeros(n, int), [1, 2, 2], [1, 1, 1])
    r = evaluate(d, *args, protocol="cuhk03", max_rank=3)
    assert r["cmc"][1] == 1.0 and 0.4 < r["rank1"] < 0.6
    one = evaluate(d[:1], args[0][:1], args[1][:1], args[2], args[3], protocol="cuhk03", max_rank=3)
    assert one["rank1"] * 10 == pytest.approx(round(one["rank1"] * 10))  # mean over 10 repeats
    assert r["mAP"] == pytest.approx(0.5)  # AP on the full gallery: match at rank 2
    assert evaluate(d, *args, protocol="cuhk03", max_rank=3) == r  # deterministic
    other = [evaluate(d, *args, protocol="cuhk03", max_rank=3, seed=s)["rank1"] for s in range(1, 4)]
    assert any(o != r["rank1"] for o in other)


def test_errors():
    with pytest.raises(ValueError, match="protocol"):
        RankingMetrics(G_PIDS, G_CAMS, protocol="duke")
    with pytest.raises(ValueError, match="gallery_cams"):
        RankingMetrics(G_PIDS, G_CAMS[:-1])
    with pytest.raises(ValueError, match="ap_mode"):
        RankingMetrics(G_PIDS, G_CAMS, ap_mode="11point")
    with pytest.raises(ValueError, match="max_rank"):
        RankingMetrics(G_PIDS, G_CAMS, max_rank=0)
    m = RankingMetrics(G_PIDS, G_CAMS)
    with pytest.raises(ValueError, match="dist"):
        m.add(DIST[:, :4], Q_PIDS, Q_CAMS)
    with pytest.raises(ValueError, match="dist"):
        m.add(DIST[0], Q_PIDS[:1], Q_CAMS[:1])
    with pytest.raises(ValueError, match="query_pids"):
        m.add(DIST, Q_PIDS[:3], Q_CAMS)
    with pytest.raises(ValueError, match="query_cams"):
        m.add(DIST, Q_PIDS, Q_CAMS[:3])
    with pytest.raises(ValueError, match="NaN"):
        m.add(np.full((1, 5), np.nan), [1], [0])
    with pytest.raises(RuntimeError, match="no valid query"):
        m.result()
    m.add(DIST, Q_PIDS, Q_CAMS)
    with pytest.raises(ValueError, match="mix"):
        m.add_topk(DIST[:, :2], np.tile([0, 1], (4, 1)), Q_PIDS, Q_CAMS)
    t = RankingMetrics(G_PIDS, G_CAMS)
    with pytest.raises(ValueError, match="topk_index"):
        t.add_topk(DIST[:, :2], np.zeros((4, 3), int), Q_PIDS, Q_CAMS)
    with pytest.raises(ValueError, match="topk_index"):
        t.add_topk(DIST[:, :2], np.full((4, 2), 5), Q_PIDS, Q_CAMS)
    with pytest.raises(ValueError, match="repeats"):
        t.add_topk(DIST[:, :2], np.zeros((4, 2), int), Q_PIDS, Q_CAMS)
    with pytest.raises(ValueError, match="k must"):
        t.add_topk(DIST[:, :2], np.tile([0, 1], (4, 1)), Q_PIDS, Q_CAMS, k=3)
    with pytest.raises(ValueError, match="full rows"):
        RankingMetrics(G_PIDS, G_CAMS, protocol="cuhk03").add_topk(DIST[:, :2], np.tile([0, 1], (4, 1)),
                                                                     Q_PIDS, Q_CAMS)
