"""Exports: distance / score matrices and top-k lists as .npz, ranked results per query (JSON
lines, CSV), feature files that evaluate without the images, several test sets in one run, and
the provenance every result carries."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import transmatcher_fast as tmf
from transmatcher_fast.data import build_dataset, generate_synthetic
from transmatcher_fast.engine import export, matching
from transmatcher_fast.engine.evaluate import (evaluate, evaluate_features, evaluate_saved,
                                               evaluate_testsets, extract, parse_testsets,
                                               metrics_by_testset)
from transmatcher_fast.engine.evaluate import results_table

PROVENANCE_KEYS = {"package", "version", "torch", "model", "checkpoint", "dataset", "protocol", "date"}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    roots = {}
    for name, seed in (("market1501", 1), ("other", 2)):
        root = tmp_path_factory.mktemp(name) / "market1501"
        generate_synthetic(root, ids=6, cams=2, images_per_cam=2, seed=seed, height=64, width=32)
        roots[name] = build_dataset("market1501", root)
    return roots


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model, matcher = tmf.build_model("resnet18", None, neck=16, num_trans_layers=2, dim_feedforward=32,
                                     height=64, width=32)
    return model.eval(), matcher.eval()


ARGS = dict(height=64, width=32, batch_size=8, workers=0, progress=False)


def toy_items():
    query = [("q0.jpg", 1, 0), ("q1.jpg", 2, 1)]
    gallery = [("g0.jpg", 1, 0), ("g1.jpg", 1, 1), ("g2.jpg", 2, 0), ("g3.jpg", 3, 1)]
    dist = torch.tensor([[0.10, 0.30, 0.20, 0.40],
                         [0.50, 0.25, 0.15, 0.35]])
    return query, gallery, dist


def test_save_matrix_dense_topk_and_scores(tmp_path):
    query, gallery, dist = toy_items()
    path = export.save_matrix(tmp_path / "d.npz", dist, query, gallery,
                              provenance_record={"checkpoint": "c.pt"})
    with np.load(path, allow_pickle=False) as data:  # plain numpy reads it, no pickles
        np.testing.assert_array_equal(data["distance"], dist.numpy())
        assert list(data["query_paths"]) == ["q0.jpg", "q1.jpg"] and list(data["gallery_pids"]) == [1, 1, 2, 3]
    got = export.load_matrix(path)
    assert got["kind"] == "distance" and got["layout"] == "dense" and got["provenance"]["checkpoint"] == "c.pt"
    scores = export.load_matrix(export.save_matrix(tmp_path / "s.npz", dist, query, gallery, kind="score"))
    score = scores["score"]
    # score is the matcher logit: 1 - sigmoid(score / 10) gives the distance back
    np.testing.assert_allclose(matching.score_to_distance(torch.from_numpy(score)).numpy(), dist.numpy(),
                               rtol=1e-5)
    assert score[0, 0] > score[0, 1]  # higher = closer
    assert set(scores["provenance"]) >= PROVENANCE_KEYS
    top = matching.TopK(torch.tensor([[0.1, 0.2], [0.15, -1.0]]).clamp_min(0.05),
                        torch.tensor([[0, 2], [2, -1]]))
    t = export.load_matrix(export.save_matrix(tmp_path / "t.npz", top, query, gallery, kind="score"))
    assert t["layout"] == "topk" and t["topk_index"].tolist() == [[0, 2], [2, -1]]
    assert t["topk_score"][1, 1] == -np.inf  # padding
    with pytest.raises(ValueError, match="re-ranked"):
        export.save_matrix(tmp_path / "r.npz", dist, query, gallery, kind="score", reranked=True)
    with pytest.raises(ValueError, match="do not fit"):
        export.save_matrix(tmp_path / "x.npz", dist[:, :3], query, gallery)
    with pytest.raises(ValueError, match="npz"):
        export.save_matrix(tmp_path / "x.npy", dist, query, gallery)
    with pytest.raises(ValueError, match="kind"):
        export.save_matrix(tmp_path / "x.npz", dist, query, gallery, kind="logit")


def test_ranked_results_jsonl_and_csv(tmp_path):
    query, gallery, dist = toy_items()
    records = list(export.ranked_results(query, gallery, dist, topk=2))
    # q0 (pid 1, cam 0): g0 is its own identity and camera, so it is removed
    assert records[0]["query"] == "q0.jpg" and records[0]["pid"] == 1 and records[0]["cam"] == 0
    assert [g["path"] for g in records[0]["ranked"]] == ["g2.jpg", "g1.jpg"]
    assert [g["distance"] for g in records[0]["ranked"]] == pytest.approx([0.2, 0.3])
    assert [g["same_id"] for g in records[0]["ranked"]] == [False, True]
    # q1 (pid 2, cam 1): g2 is pid 2 cam 0, kept (another camera)
    assert [(g["path"], g["pid"], g["cam"], g["rank"]) for g in records[1]["ranked"]] == \
        [("g2.jpg", 2, 0, 1), ("g1.jpg", 1, 1, 2)]
    # the same lists from a top-k result
    values, index = dist.topk(4, dim=1, largest=False)
    assert list(export.ranked_results(query, gallery, matching.TopK(values, index), topk=2)) == records
    lines = export.write_ranked_results(tmp_path / "r.jsonl", query, gallery, dist, topk=2).read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    rows = list(csv.reader(export.write_ranked_results(tmp_path / "r.csv", query, gallery, dist, topk=2,
                                                       kind="score").open()))
    assert rows[0] == ["query_path", "query_pid", "query_cam", "rank", "gallery_path", "gallery_pid",
                       "gallery_cam", "score", "same_id"]
    assert len(rows) == 1 + 2 * 2 and rows[1][:5] == ["q0.jpg", "1", "0", "1", "g2.jpg"]
    assert float(rows[1][7]) == pytest.approx(float(export.distance_to_score(0.2)))


def test_evaluate_from_saved_features_equals_evaluate(sets, tiny_model, tmp_path):
    model, matcher = tiny_model
    data = sets["market1501"]
    direct = evaluate(model, matcher, data.query, data.gallery, topk=3, dataset=data,
                      checkpoint="ckpt.pt", model_config={"arch": "resnet18"}, **ARGS)
    for split in ("query", "gallery"):
        items = getattr(data, split)
        features = extract(model, items, **ARGS)
        export.save_features(tmp_path / f"{split}.pt", features, provenance_record=export.provenance(
            model_config={"arch": "resnet18"}, checkpoint="ckpt.pt", dataset=data, split=split))
        state = torch.load(tmp_path / f"{split}.pt", weights_only=True)
        assert state["paths"] == [p for p, _, _ in items] and state["skipped"] == []
    saved = evaluate_saved(matcher, tmp_path / "query.pt", tmp_path / "gallery.pt", topk=3, progress=False)
    for key in ("rank1", "rank5", "mAP", "mINP", "num_queries"):
        assert saved.metrics[key] == direct.metrics[key], key
    torch.testing.assert_close(saved.distances.dist, direct.distances.dist)
    assert torch.equal(saved.distances.index, direct.distances.index)
    assert saved.query_items == data.query and saved.gallery_items == data.gallery
    prov = saved.metrics["provenance"]
    assert prov["checkpoint"] == str(Path("ckpt.pt").resolve()) and prov["model"]["arch"] == "resnet18"
    assert prov["query_features"].endswith("query.pt") and prov["dataset"]["root"] == str(data.root)
    # The older file of the extract command (features, pids, cams, paths) loads too.
    old = {k: state[k] for k in ("features", "pids", "cams", "paths")}
    torch.save(old, tmp_path / "old.pt")
    loaded = export.load_features(tmp_path / "old.pt")
    assert loaded.provenance is None and loaded.paths == state["paths"]
    # Features of two checkpoints do not compare.
    export.save_features(tmp_path / "other.pt", loaded,
                         provenance_record=export.provenance(checkpoint="other.pt"))
    with pytest.raises(ValueError, match="different"):
        evaluate_saved(matcher, tmp_path / "query.pt", tmp_path / "other.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a feature file"):
        export.load_features(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="differ in shape"):
        evaluate_features(matcher, loaded, type(loaded)(torch.zeros(2, 1), torch.zeros(2), torch.zeros(2)))


def test_several_testsets_in_one_run(sets, tiny_model, tmp_path):
    model, matcher = tiny_model
    assert parse_testsets(" market1501, other ,") == ["market1501", "other"]
    with pytest.raises(ValueError, match="more than once"):
        parse_testsets("a,b,a")
    with pytest.raises(ValueError, match="no test set"):
        parse_testsets(" , ")
    results = evaluate_testsets(model, matcher, sets, checkpoint="ckpt.pt", **ARGS)
    assert list(results) == ["market1501", "other"]
    for name, data in sets.items():
        alone = evaluate(model, matcher, data.query, data.gallery, **ARGS)
        assert results[name].metrics["mAP"] == alone.metrics["mAP"]
        prov = results[name].metrics["provenance"]
        assert prov["testset"] == name and prov["dataset"]["root"] == str(data.root)
        assert prov["dataset"]["query"]["images"] == len(data.query)
    metrics = metrics_by_testset(results)
    assert "| market1501 |" in results_table(metrics) and "| other |" in results_table(metrics)
    path = export.write_results_json(tmp_path / "results.json", metrics)
    written = json.loads(path.read_text())
    assert set(written) == {"market1501", "other", "provenance"}
    assert set(written["other"]["provenance"]) >= PROVENANCE_KEYS
    with pytest.raises(ValueError, match="differ"):
        evaluate_testsets(model, matcher, [("a", sets["other"]), ("a", sets["other"])], **ARGS)


def test_every_evaluation_carries_its_provenance(sets, tiny_model, tmp_path):
    model, matcher = tiny_model
    data = sets["other"]
    result = evaluate(model, matcher, data.query, data.gallery, rerank=True, k1=3, k2=2,
                      checkpoint=tmp_path / "c.pt", model_config={"arch": "resnet18", "matcher": "transmatcher"},
                      dataset=data, **ARGS)
    prov = result.metrics["provenance"]
    assert set(prov) >= PROVENANCE_KEYS and prov["version"] == tmf.__version__
    assert prov["checkpoint"] == str((tmp_path / "c.pt").resolve())
    assert prov["model"] == {"arch": "resnet18", "matcher": "transmatcher", "height": 64, "width": 32,
                             "matcher_class": "TransMatcher"}
    assert prov["dataset"]["name"] == "Market-1501" and prov["dataset"]["root"] == str(data.root)
    assert prov["dataset"]["gallery"] == export.split_counts(data.gallery)
    assert prov["protocol"]["name"] == "market" and prov["protocol"]["rerank"] is True
    assert prov["protocol"]["rerank_params"] == {"k1": 3, "k2": 2, "lambda": 0.3}
    assert prov["date"].startswith("20") and "T" in prov["date"]
    bare = evaluate(model, matcher, data.query, data.gallery, **ARGS).metrics["provenance"]
    assert bare["checkpoint"] is None and bare["dataset"]["query"]["images"] == len(data.query)
    written = json.loads(export.write_results_json(tmp_path / "r.json", result.metrics).read_text())
    assert written["provenance"] == json.loads(json.dumps(prov)) and written["mAP"] == result.metrics["mAP"]
    # torch.save / weights_only round trip (best.pt keeps the metrics)
    torch.save(result.metrics, tmp_path / "m.pt")
    assert torch.load(tmp_path / "m.pt", weights_only=True)["provenance"] == prov
