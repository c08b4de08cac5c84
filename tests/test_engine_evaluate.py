"""Evaluation engine: features in dataset order, chunked matching equal to one pass, top-k equal
to the full matrix's, gallery sharding across processes, the protocol end to end, loading trained
checkpoints, and the eval / extract / visualize / demo commands."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import transmatcher_fast as tmf
from transmatcher_fast import cli
from transmatcher_fast.data import build_dataset, build_test_transform, generate_synthetic, make_loader
from transmatcher_fast.engine import matching
from transmatcher_fast.engine.evaluate import evaluate, extract, load_trained, results_table
from transmatcher_fast.engine.features import extract_features


def small_matchers():
    torch.manual_seed(0)
    trans = tmf.TransMatcher(seq_len=8, d_model=16, num_decoder_layers=2, dim_feedforward=32)
    qaconv = tmf.QAConv(num_features=16, height=4, width=2)
    for m in (trans, qaconv):  # non-trivial running statistics, as after training
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm1d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
    return {"transmatcher": (trans, lambda n: torch.randn(n, 4, 2, 32)),
            "qaconv": (qaconv, lambda n: torch.nn.functional.normalize(torch.randn(n, 16, 4, 2), dim=1))}


@pytest.mark.parametrize("kind", ["transmatcher", "qaconv"])
def test_chunked_matching_equals_one_pass(kind):
    matcher, features = small_matchers()[kind]
    matcher.eval()
    probe, gallery = features(7), features(13)
    expected = matching.score_to_distance(matcher.match(probe, gallery, chunk=13)).detach()
    for probe_chunk, gallery_chunk in ((1, 1), (3, 5), (7, 13), (None, None)):
        got = matching.match(matcher, probe, gallery, probe_chunk=probe_chunk, gallery_chunk=gallery_chunk)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    same = matching.match(matcher, probe, None, probe_chunk=2, gallery_chunk=3)
    torch.testing.assert_close(same, matching.score_to_distance(matcher.match(probe, probe)).detach(),
                               rtol=0, atol=1e-6)
    assert matcher.training is False


@pytest.mark.parametrize("kind", ["transmatcher", "qaconv"])
def test_topk_equals_the_full_matrix_topk(kind):
    matcher, features = small_matchers()[kind]
    probe, gallery = features(9), features(17)
    # Same blocks as the top-k runs, so the values agree to the bit.
    full = matching.match(matcher, probe, gallery, probe_chunk=4, gallery_chunk=3)
    for k in (1, 4, 17, 30):
        top = matching.match(matcher, probe, gallery, topk=k, probe_chunk=4, gallery_chunk=3)
        values, index = full.topk(min(k, 17), dim=1, largest=False)
        torch.testing.assert_close(top.dist, values, rtol=0, atol=0)
        assert torch.equal(top.index, index)


def test_matching_restores_training_mode_and_checks_chunks():
    matcher, features = small_matchers()["transmatcher"]
    matcher.train()
    matching.match(matcher, features(2), features(3))
    assert matcher.training
    with pytest.raises(ValueError, match="gallery_chunk"):
        matching.match(matcher, features(2), features(3), gallery_chunk=0)
    with pytest.raises(ValueError, match="topk"):
        matching.match(matcher, features(2), features(3), topk=-1)


def _sharded_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    matcher, features = small_matchers()["transmatcher"]
    probe, gallery = features(5), features(11)
    dense = matching.match(matcher, probe, gallery, gallery_chunk=2)
    top = matching.match(matcher, probe, gallery, topk=4)
    torch.save({"dense": dense, "dist": top.dist, "index": top.index}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_gallery_sharded_across_processes_equals_one_process(tmp_path):
    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    matcher, features = small_matchers()["transmatcher"]
    probe, gallery = features(5), features(11)
    expected = matching.match(matcher, probe, gallery, distributed=False)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(got["dense"], expected, rtol=0, atol=1e-6)
        values, index = expected.topk(4, dim=1, largest=False)
        torch.testing.assert_close(got["dist"], values, rtol=0, atol=1e-6)
        assert torch.equal(got["index"], index)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "market1501"
    generate_synthetic(root, ids=8, cams=2, images_per_cam=3, seed=1, height=64, width=32)
    return root


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model, matcher = tmf.build_model("resnet18", None, neck=16, num_trans_layers=2, dim_feedforward=32,
                                     height=64, width=32)
    return model.eval(), matcher.eval()


def test_features_come_back_in_dataset_order(tiny_set, tiny_model):
    model, _ = tiny_model
    items = build_dataset("market1501", tiny_set).gallery
    loader = make_loader(items, build_test_transform(64, 32), batch_size=5, num_workers=0)
    got = extract_features(model, loader, storage_dtype="bf16", progress=False)
    assert got.features.dtype == torch.bfloat16 and len(got) == len(items)
    images = torch.stack([loader.dataset[i][0] for i in (0, len(items) - 1)])
    with torch.no_grad():
        direct = model(images)
    torch.testing.assert_close(got.features[[0, -1]].float(), direct, rtol=1e-2, atol=1e-2)
    assert got.pids.tolist() == [pid for _, pid, _ in items]
    assert got.cams.tolist() == [cam for _, _, cam in items]


def test_evaluate_end_to_end_with_topk_and_rerank(tiny_set, tiny_model):
    model, matcher = tiny_model
    data = build_dataset("market1501", tiny_set)
    args = dict(height=64, width=32, batch_size=8, workers=0, progress=False)
    full = evaluate(model, matcher, data.query, data.gallery, **args)
    assert full.distances.shape == (len(data.query), len(data.gallery))
    m = full.metrics
    assert 0 <= m["mAP"] <= 1 and 0 <= m["rank1"] <= m["rank5"] <= 1 and m["num_queries"] == len(data.query)
    top = evaluate(model, matcher, data.query, data.gallery, topk=5, **args)
    assert top.metrics["rank1"] == m["rank1"] and top.metrics["rank5"] == m["rank5"]
    assert top.metrics["mAP"] <= m["mAP"] + 1e-12
    reranked = evaluate(model, matcher, data.query, data.gallery, rerank=True, k1=4, k2=2, **args)
    assert reranked.metrics["rerank"] and "rerank_seconds" in reranked.metrics
    with pytest.raises(ValueError, match="rerank"):
        evaluate(model, matcher, data.query, data.gallery, rerank=True, topk=3, **args)
    table = results_table({"full": m, "top5": top.metrics})
    assert table.count("\n") == 3 and "| full |" in table


def test_results_table_shows_missing_values():
    assert "n/a" in results_table({"x": {"rank1": 0.5, "rank5": None, "mAP": 0.25}})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert cli.main(["demo", "--out", str(out), "--ids", "8", "--cams", "2", "--images-per-cam", "3",
                     "--epochs", "1", "--batch-size", "8", "--max-steps-per-epoch", "2", "-j", "0",
                     "--no-progress"]) == 0
    return out


def test_short_demo_ends_with_a_results_table_and_pictures(demo_run):
    table = (demo_run / "results.md").read_text()
    assert "| untrained |" in table and "| trained |" in table
    summary = json.loads((demo_run / "results.json").read_text())
    assert set(summary) >= {"before", "after", "train_seconds", "mAP_ratio"}
    curve = Image.open(demo_run / "training_curve.png")
    assert curve.size[0] > 100 and curve.size[1] > 100
    ranked = sorted((demo_run / "ranked_lists").glob("ranked_q*_pid*.png"))
    assert len(ranked) == 6  # the demo draws 6 of the 8 queries
    # query + 10 gallery cells of 64x128 (the default cell) framed, in one row
    assert Image.open(ranked[0]).size[1] < 200
    assert list((demo_run / "correspondences").glob("*.png"))


def test_load_trained_rebuilds_the_trained_model(demo_run):
    model, matcher, config = load_trained(demo_run / "train" / "checkpoint.pt")
    assert config["arch"] == "resnet18" and not model.training and not matcher.training
    state = torch.load(demo_run / "train" / "checkpoint.pt", weights_only=True)
    for key, value in matcher.state_dict().items():
        assert torch.equal(value, state["matcher"][key])


def test_eval_extract_visualize_commands(demo_run, tmp_path, capsys):
    ckpt = str(demo_run / "train" / "checkpoint.pt")
    common = ["--checkpoint", ckpt, "-d", "market1501", "--data-dir", str(demo_run / "data"), "-j", "0",
              "--no-progress"]
    assert cli.main(["eval", *common, "--topk", "5", "--out", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "| market1501 |" in out and "mAP" in out
    assert json.loads((tmp_path / "r.json").read_text())["topk"] == 5
    assert cli.main(["extract", *common, "--split", "gallery", "--out", str(tmp_path / "g.pt")]) == 0
    saved = torch.load(tmp_path / "g.pt", weights_only=True)
    assert saved["features"].shape[0] == len(saved["paths"]) == len(saved["pids"])
    assert cli.main(["visualize", *common, "--out", str(tmp_path / "pics"), "--num-queries", "2",
                     "--log", str(demo_run / "train" / "log.jsonl")]) == 0
    assert (tmp_path / "pics" / "training_curve.png").exists()
    assert len(list((tmp_path / "pics" / "ranked_lists").glob("ranked_*.png"))) == 3  # 2 + overview
    with pytest.raises(SystemExit, match="checkpoint"):
        cli.main(["visualize", "--out", str(tmp_path / "none")])


def test_load_trained_rejects_other_files(tmp_path):
    torch.save({"weights": torch.ones(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="neither"):
        load_trained(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError):
        load_trained(tmp_path / "missing.pt")


def _with_bad_images(tiny_set, tmp_path):
    """The tiny set's query and gallery, with one truncated JPEG in each (a copy cut in half) and
    a missing file in the gallery."""
    data = build_dataset("market1501", tiny_set)
    query, gallery = list(data.query), list(data.gallery)
    bad = []
    for items, at in ((query, 1), (gallery, 2)):
        path, pid, cam = items[at]
        blob = Path(path).read_bytes()
        cut = tmp_path / f"truncated_{Path(path).name}"
        cut.write_bytes(blob[: len(blob) // 2])
        items[at] = (str(cut), pid, cam)
        bad.append(str(cut))
    gallery[4] = (str(tmp_path / "missing.jpg"), gallery[4][1], gallery[4][2])
    return query, gallery, bad + [str(tmp_path / "missing.jpg")]


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_errors_name_the_file(tiny_set, tiny_model, tmp_path, workers):
    from transmatcher_fast.engine.features import ImageReadError, open_image

    model, _ = tiny_model
    query, gallery, bad = _with_bad_images(tiny_set, tmp_path)
    with pytest.raises(OSError, match="truncated_") as info:  # ImageReadError is an OSError
        extract(model, query, height=64, width=32, batch_size=4, workers=workers, progress=False)
    assert bad[0] in str(info.value)
    with pytest.raises(ImageReadError, match=r"missing\.jpg"):
        open_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageReadError, match="truncated_.*cannot read") as info:
        open_image(bad[0])
    assert info.value.path == bad[0]
    from transmatcher_fast.engine import visualize
    with pytest.raises(ImageReadError, match="truncated_"):
        visualize.ranked_list_image(bad[0], [], [])


def test_skip_bad_images_lists_them_and_evaluates_the_rest(tiny_set, tiny_model, tmp_path, capsys):
    from transmatcher_fast.engine.features import skipped_summary

    model, matcher = tiny_model
    query, gallery, bad = _with_bad_images(tiny_set, tmp_path)
    args = dict(height=64, width=32, batch_size=3, workers=0, progress=False)
    g = extract(model, gallery, skip_bad_images=True, **args)
    assert [p for p, _ in g.skipped] == [bad[1], bad[2]]
    assert "truncated" in g.skipped[0][1] or "Truncated" in g.skipped[0][1]
    assert len(g) == len(gallery) - 2 and g.indices.tolist() == [i for i in range(len(gallery)) if i not in (2, 4)]
    assert g.paths == [gallery[i][0] for i in g.indices.tolist()]
    assert g.pids.tolist() == [gallery[i][1] for i in g.indices.tolist()]
    # Rows are the good images' features, as an extraction of only them gives.
    good = [gallery[i] for i in g.indices.tolist()]
    clean = extract(model, good, **args)
    torch.testing.assert_close(g.features, clean.features)
    assert clean.indices is None and clean.skipped == []
    err = capsys.readouterr().err
    assert "skipped 2 unreadable images" in err and bad[1] in err
    result = evaluate(model, matcher, query, gallery, skip_bad_images=True, **args)
    m = result.metrics
    assert m["num_skipped_images"] == 3 and m["skipped_images"] == bad
    assert m["num_query_images"] == len(query) - 1 and m["num_gallery_images"] == len(gallery) - 2
    assert result.distances.shape == (len(query) - 1, len(gallery) - 2)
    assert result.gallery_items == good and len(result.query_items) == len(query) - 1
    # Off by default: the first bad image stops the evaluation.
    with pytest.raises(OSError, match="truncated_"):
        evaluate(model, matcher, query, gallery, **args)
    # A batch of bad images only, and nothing readable at all.
    many = [(bad[0], 1, 0)] * 4 + list(gallery[:2])
    assert len(extract(model, many, skip_bad_images=True, **args)) == 2
    with pytest.raises(ValueError, match="no images.*skipped 4 unreadable"):
        extract(model, many[:4], skip_bad_images=True, **args)
    listed = skipped_summary([(f"{i}.jpg", "e") for i in range(7)], shown=3)
    assert listed == "skipped 7 unreadable images: 0.jpg, 1.jpg, 2.jpg, ..."
    assert skipped_summary([]) == ""
