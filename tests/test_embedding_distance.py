"""Embeddings through the evaluation engine: ``EmbeddingDistance`` as a comparer gives upstream
TransReID's numbers (``utils/metrics.py``: ``euclidean_distance`` + ``eval_func``), dense and top-k,
in any block size, cosine too, with re-ranking, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from transmatcher_fast.engine import matching
from transmatcher_fast.engine.evaluate import evaluate_features
from transmatcher_fast.engine.features import Features
from transmatcher_fast.engine.rerank import k_reciprocal_rerank
from transmatcher_fast.models.embedding import EmbeddingDistance

HERE = os.path.dirname(os.path.abspath(__file__))
NQ, NG, D, IDS, CAMS = 30, 150, 24, 12, 4
# float32 distances (|d| <= 4, D = 24) are off the float64 ones by ~1e-6 at most: a draw is kept
# only when every positive / negative pair of a query is further apart than this, so rounding
# cannot reorder what the metrics see.
SAFE_GAP = 1e-5


# ----------------------------------------------------------------------------- upstream, in numpy

def upstream_distance(qf: np.ndarray, gf: np.ndarray, normalize: bool = True) -> np.ndarray:
    """``feat_norm`` (always on upstream) + ``euclidean_distance``: |q|^2 + |g|^2 - 2 q.g, float64."""
    if normalize:
        qf = qf / np.linalg.norm(qf, axis=1, keepdims=True)
        gf = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    return (qf ** 2).sum(1)[:, None] + (gf ** 2).sum(1)[None, :] - 2 * qf @ gf.T


def upstream_eval(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=50, ap_depth=None):
    """``eval_func``: full argsort, same-pid-same-camera removed, CMC to ``max_rank``,
    AP = sum_k rel_k * precision@k / #rel. ``ap_depth``: sum only to that rank (AP@k, what the
    engine's top-k mode reports; upstream has no such option). -> (cmc, mAP, #valid queries)."""
    indices = np.argsort(distmat, axis=1)
    matches = (g_pids[indices] == q_pids[:, None]).astype(np.int32)
    cmcs, aps = [], []
    for i in range(len(q_pids)):
        order = indices[i]
        keep = ~((g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i]))
        rel = matches[i][keep]
        if not rel.any():
            continue
        cmcs.append(np.minimum(rel.cumsum(), 1)[:max_rank])
        precision = rel.cumsum() / np.arange(1, len(rel) + 1)
        aps.append((precision * rel)[:ap_depth].sum() / rel.sum())
    return np.mean(np.asarray(cmcs, np.float64), axis=0), float(np.mean(aps)), len(aps)


# ----------------------------------------------------------------------------- data

def _safe(dist, q_pids, g_pids, q_cams, g_cams) -> bool:
    valid = (g_pids[None] != q_pids[:, None]) | (g_cams[None] != q_cams[:, None])
    pos = valid & (g_pids[None] == q_pids[:, None])
    for d, p, v in zip(dist, pos, valid):
        gaps = np.abs(d[p][:, None] - d[v & ~p][None, :])
        if gaps.size and gaps.min() < SAFE_GAP:
            return False
    return True


@pytest.fixture
def data(rng):
    """Query / gallery ``Features`` of ``a * centre[pid] + noise`` at random scales (so that the
    normalisation matters), repeated pids and cameras, gallery-only identities, one query whose
    only same-pid images share its camera (skipped); plus the arrays, redrawn until safe."""
    seed = int(torch.randint(2**31, (1,), generator=rng))
    gen = np.random.default_rng(seed)
    for _ in range(100):
        centres = gen.standard_normal((IDS + 3, D))
        g_pids = np.concatenate([gen.integers(0, IDS + 3, NG - 2), [IDS + 3, IDS + 3]])
        g_cams = np.concatenate([gen.integers(0, CAMS, NG - 2), [0, 0]])
        q_pids = np.concatenate([gen.integers(0, IDS, NQ - 1), [IDS + 3]])
        q_cams = np.concatenate([gen.integers(0, CAMS, NQ - 1), [0]])
        centres = np.concatenate([centres, gen.standard_normal((1, D))])

        def feats(pids, centres=centres):
            x = 0.8 * centres[pids] + gen.standard_normal((len(pids), D))
            return (x * gen.uniform(0.3, 3.0, (len(pids), 1))).astype(np.float32)

        qf, gf = feats(q_pids), feats(g_pids)
        ref = upstream_distance(qf.astype(np.float64), gf.astype(np.float64))
        if _safe(ref, q_pids, g_pids, q_cams, g_cams):
            break
    else:
        pytest.fail("no safe draw in 100 tries")
    ids = lambda a: torch.from_numpy(a.astype(np.int64))
    q = Features(torch.from_numpy(qf), ids(q_pids), ids(q_cams))
    g = Features(torch.from_numpy(gf), ids(g_pids), ids(g_cams))
    return q, g, ref, (q_pids, g_pids, q_cams, g_cams)


# ----------------------------------------------------------------------------- tests

def test_dense_equals_upstream(data):
    q, g, ref, ids = data
    result = evaluate_features(EmbeddingDistance(), q, g, progress=False)
    cmc, mAP, valid = upstream_eval(ref, *ids)
    m = result.metrics
    assert m["num_queries"] == valid and m["num_skipped"] == NQ - valid >= 1
    np.testing.assert_allclose(m["cmc"], cmc, rtol=0, atol=1e-12)
    assert m["mAP"] == pytest.approx(mAP, abs=1e-12)
    assert (m["rank1"], m["rank5"]) == (pytest.approx(cmc[0], abs=1e-12), pytest.approx(cmc[4], abs=1e-12))
    assert result.distances.dtype == torch.float32 and result.distances.shape == (NQ, NG)
    np.testing.assert_allclose(result.distances.numpy(), ref, rtol=0, atol=2e-6)
    assert result.metrics["provenance"]["model"]["matcher_class"] == "EmbeddingDistance"


@pytest.mark.parametrize("k", [1, 7, 60])
def test_topk_exact_up_to_k(data, k):
    q, g, ref, ids = data
    m = evaluate_features(EmbeddingDistance(), q, g, topk=k, progress=False).metrics
    cmc, _, _ = upstream_eval(ref, *ids)
    _, ap_at_k, _ = upstream_eval(ref, *ids, ap_depth=k)
    assert len(m["cmc"]) == min(k, 50) and m["topk"] == k
    np.testing.assert_allclose(m["cmc"], cmc[:min(k, 50)], rtol=0, atol=1e-12)
    assert m["mAP"] == pytest.approx(ap_at_k, abs=1e-12)
    assert (m["rank5"] is None) == (k < 5)


def test_small_blocks_equal_one_block(data):
    q, g, _, _ = data
    comparer = EmbeddingDistance()
    one = evaluate_features(comparer, q, g, probe_chunk=NQ, gallery_chunk=NG, progress=False)
    for probe_chunk, gallery_chunk in ((1, 1), (4, 7), (NQ, 13)):
        tiny = evaluate_features(comparer, q, g, probe_chunk=probe_chunk, gallery_chunk=gallery_chunk,
                                 progress=False)
        torch.testing.assert_close(tiny.distances, one.distances, rtol=0, atol=1e-6)
        assert tiny.metrics["cmc"] == pytest.approx(one.metrics["cmc"], abs=1e-12)
        assert tiny.metrics["mAP"] == pytest.approx(one.metrics["mAP"], abs=1e-12)
        top = evaluate_features(comparer, q, g, topk=9, probe_chunk=probe_chunk,
                                gallery_chunk=gallery_chunk, progress=False)
        values, index = one.distances.topk(top.distances.dist.shape[1], dim=1, largest=False)
        assert torch.equal(top.distances.index, index)
        torch.testing.assert_close(top.distances.dist, values, rtol=0, atol=1e-6)


def test_cosine_ranks_as_upstream(data):
    q, g, ref, ids = data
    result = evaluate_features(EmbeddingDistance("cosine"), q, g, progress=False)
    # 1 - cos = |q - g|^2 / 2 on unit vectors: the same ranking as upstream's.
    np.testing.assert_allclose(result.distances.numpy(), ref / 2, rtol=0, atol=1e-6)
    cmc, mAP, _ = upstream_eval(ref, *ids)
    np.testing.assert_allclose(result.metrics["cmc"], cmc, rtol=0, atol=1e-12)
    assert result.metrics["mAP"] == pytest.approx(mAP, abs=1e-12)
    # Cosine normalises whatever normalize says.
    raw = matching.match(EmbeddingDistance("cosine", normalize=False), q.features, g.features)
    torch.testing.assert_close(raw, result.distances, rtol=0, atol=1e-6)


def test_unnormalised_euclidean_is_the_plain_squared_distance(data):
    q, g, _, _ = data
    got = matching.match(EmbeddingDistance(normalize=False), q.features, g.features, gallery_chunk=11)
    expected = upstream_distance(q.features.double().numpy(), g.features.double().numpy(), normalize=False)
    np.testing.assert_allclose(got.numpy(), np.maximum(expected, 0), rtol=1e-5, atol=1e-4)


def test_rerank_path_runs_on_the_engine_distances(data):
    q, g, _, _ = data
    comparer = EmbeddingDistance()
    result = evaluate_features(comparer, q, g, rerank=True, k1=8, k2=3, lambda_value=0.3, progress=False)
    # TransReID's re_ranking takes the squared Euclidean distances as they are (no squaring).
    q_g = matching.match(comparer, q.features, g.features)
    q_q = matching.match(comparer, q.features, None)
    g_g = matching.match(comparer, g.features, None)
    expected = k_reciprocal_rerank(q_g, q_q, g_g, 8, 3, 0.3)
    np.testing.assert_allclose(result.distances.numpy(), expected, rtol=0, atol=1e-6)
    assert 0 <= result.metrics["mAP"] <= 1 and result.metrics["rerank"] is True


def test_float32_under_autocast_and_without_parameters(data):
    q, g, _, _ = data
    comparer = EmbeddingDistance()
    expected = matching.match(comparer, q.features, g.features)
    # 16-bit autocast would cancel |q|^2 + |g|^2 - 2 q.g; the comparer keeps float32.
    torch.testing.assert_close(matching.match(comparer, q.features, g.features, amp="bfloat16"),
                               expected, rtol=0, atol=0)
    half = matching.match(comparer, q.features.bfloat16(), g.features.bfloat16())
    assert half.dtype == torch.float32
    # A comparer with no parameter or buffer at all runs where match() is told, default CPU.
    bare = EmbeddingDistance()
    del bare.device_anchor
    assert list(bare.parameters()) == [] and matching.comparer_device(bare) == torch.device("cpu")
    torch.testing.assert_close(matching.match(bare, q.features, g.features, topk=5).dist,
                               expected.topk(5, dim=1, largest=False).values, rtol=0, atol=1e-6)


def test_forward_distances_are_non_negative_and_module_is_stateless():
    comparer = EmbeddingDistance()
    x = torch.randn(6, 10) * 100
    d = comparer(x)
    assert d.shape == (6, 6) and (d >= 0).all() and d.diagonal().abs().max() < 1e-5
    torch.testing.assert_close(comparer(x, x[:2]), d[:, :2])
    assert list(comparer.state_dict()) == ["device_anchor"] and comparer.device_anchor.numel() == 0
    assert not any(p.requires_grad for p in comparer.parameters())
    assert comparer.bytes_per_pair() > 0
    assert "metric='euclidean'" in repr(comparer)


def test_errors():
    with pytest.raises(ValueError, match=r"metric must be one of \('euclidean', 'cosine'\), got 'l1'"):
        EmbeddingDistance("l1")
    # Upstream's FEAT_NORM='no' is a truthy string; a string is refused here rather than guessed.
    with pytest.raises(TypeError, match="normalize must be True or False"):
        EmbeddingDistance(normalize="no")
    comparer = EmbeddingDistance()
    with pytest.raises(ValueError, match=r"gallery must be \[n, D\] embeddings, got shape \(3, 4, 5\)"):
        comparer.project(torch.randn(3, 4, 5), "gallery")
    with pytest.raises(ValueError, match="differ in D"):
        comparer.score_projected(comparer.project(torch.randn(2, 4)), comparer.project(torch.randn(3, 5)))
    ids = torch.zeros(3, dtype=torch.int64)
    three = lambda d: Features(torch.randn(3, d), ids, ids)
    with pytest.raises(ValueError, match="differ in shape"):
        evaluate_features(comparer, three(4), three(5))
    with pytest.raises(ValueError, match="rerank needs"):
        evaluate_features(comparer, three(4), three(4), topk=2, rerank=True)


def test_benchmark_quick_mode(tmp_path):
    script = os.path.join(HERE, "..", "benchmarks", "bench_embedding_eval.py")
    subprocess.run([sys.executable, script, "--quick", "--no-plot", "--out", str(tmp_path)], check=True,
                   capture_output=True, timeout=300)
    result = json.loads((tmp_path / "bench_embedding_eval_cpu_quick.json").read_text())
    assert result["device"] == "cpu"
    assert result["dims_run"] == {"32": {"plan": "ours and upstream", "rounds": 1}}
    assert {r["method"] for r in result["rows"]} == {"ours", "upstream"}
    assert all(r["seconds"] > 0 and r["peak_rss_mb"] > 0 for r in result["rows"])
    summary = result["summary"][0]
    assert summary["cmc_equal_to_upstream_up_to_k"] and summary["num_valid_queries_equal"]
