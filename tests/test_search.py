"""``transmatcher-fast search`` and ``tmf.ReID``: ranking a folder of your own images.

Tiny models of a fused matcher (TransMatcher) and an embedding method (TransReID) are trained for
one step here; galleries are small synthetic images copied under arbitrary names. What is checked:
the command end to end (CSV / JSON lines, --topk clamped, pictures), the index reused without any
extraction, only changed images re-extracted, streaming over shards equal to the dense ranking,
one-line errors for bad input before any extraction, and the API on paths, PIL images and tensors.
"""

import csv
import json
import os
import shutil

import pytest
import torch
from PIL import Image

import transmatcher_fast as tmf
from transmatcher_fast import cli
from transmatcher_fast.engine import evaluate, validate
from transmatcher_fast.engine.matching import TopK, match
from transmatcher_fast.engine.features import Features
from transmatcher_fast.engine.search import GalleryIndex, merge_topk, stream_topk, write_ranking

from helpers import one_line_error

COMMON = ["-d", "market1501", "--height", "64", "--width", "32", "-b", "8", "--num-instances", "4",
          "-j", "0", "--no-progress", "--no-tensorboard", "--log-every", "1", "--epochs", "1",
          "--max-steps-per-epoch", "1", "--overwrite"]
METHODS = {
    "transmatcher": ["--method", "transmatcher", "-a", "resnet18", "--ibn", "none", "--neck", "16",
                     "--num-trans-layers", "2", "--dim-feedforward", "32", "--no-freeze-bn"],
    "transreid": ["--method", "transreid", "-a", "vit_tiny_patch16", "--jpm", "--sie-camera",
                  "--divide-length", "2", "--lr", "0.01", "--warmup-epochs", "1"],
}
QUIET = ["-j", "0", "--no-progress"]


@pytest.fixture(scope="module")
def data_dir(market_root):
    return market_root


@pytest.fixture(scope="module")
def checkpoints(data_dir, tmp_path_factory):
    """One checkpoint per method, each of one training step."""
    out = {}
    for name, options in METHODS.items():
        exp = tmp_path_factory.mktemp(name)
        assert cli.main(["train", *COMMON, *options, "--data-dir", str(data_dir), "--exp-dir", str(exp)]) == 0
        out[name] = exp / "checkpoint.pt"
    return out


@pytest.fixture(scope="module")
def photos(data_dir, tmp_path_factory):
    """Query files and a gallery folder tree with names that say nothing about identity."""
    root = tmp_path_factory.mktemp("photos")
    test = sorted((data_dir / "market1501" / "bounding_box_test").glob("*.jpg"))
    for n, path in enumerate(test):
        target = root / "gallery" / ("street" if n % 2 else "park") / f"IMG_{n:04d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    queries = root / "queries"
    queries.mkdir()
    for n, path in enumerate(sorted((data_dir / "market1501" / "query").glob("*.jpg"))[:3]):
        shutil.copy(path, queries / f"person {n}.jpg")
    return root


@pytest.fixture
def extracted(monkeypatch):
    """Counts the images that feature extraction reads, by its ``desc`` ("query", "gallery")."""
    counts = {}
    real = evaluate.extract

    def counting(model, items, **kwargs):
        counts[kwargs.get("desc")] = counts.get(kwargs.get("desc"), 0) + len(items)
        return real(model, items, **kwargs)

    monkeypatch.setattr(evaluate, "extract", counting)
    return counts


def search(checkpoint, query, gallery, out, *extra):
    return cli.main(["search", "--checkpoint", str(checkpoint), "--query", *map(str, query),
                     "--gallery", str(gallery), "--out", str(out), *QUIET, *map(str, extra)])


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.reader(file))


# --- the command ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["transmatcher", "transreid"])
def test_search_ranks_a_folder_and_reuses_its_index(method, checkpoints, photos, tmp_path, capsys, extracted):
    gallery, index, pictures = photos / "gallery", tmp_path / "index", tmp_path / "pictures"
    num_gallery = len(list(gallery.rglob("*.jpg")))
    queries = sorted((photos / "queries").glob("*.jpg"))
    assert search(checkpoints[method], [queries[0], photos / "queries"], gallery, tmp_path / "ranked.csv",
                  "--topk", 100, "--index", index, "--pictures", pictures) == 0
    out, err = capsys.readouterr()
    assert f"--topk 100 is above the gallery size ({num_gallery}): using {num_gallery}" in err
    assert f"extracted {num_gallery} (new or changed)" in out
    assert (extracted["query"], extracted["gallery"]) == (1 + len(queries), num_gallery)
    rows = read_csv(tmp_path / "ranked.csv")
    assert rows[0] == ["query", "rank", "gallery", "distance"]
    assert len(rows) == 1 + (1 + len(queries)) * num_gallery
    first = [r for r in rows[1:] if r[0] == str(queries[0])][:num_gallery]
    assert [int(r[1]) for r in first] == list(range(1, num_gallery + 1))
    assert sorted(r[2] for r in first) == sorted(str(p) for p in gallery.rglob("*.jpg"))
    values = [float(r[3]) for r in first]
    assert values == sorted(values)
    drawn = sorted(p.name for p in pictures.iterdir())
    assert sum(name.startswith("ranked_q") for name in drawn) == 1 + len(queries)
    fused = method == "transmatcher"
    assert sum(name.startswith("correspondence_q") for name in drawn) == (1 + len(queries) if fused else 0)

    # The same gallery again: its features are read from the index, not one image is extracted.
    extracted.clear()
    stored = {p.name: p.stat().st_mtime_ns for p in index.iterdir()}
    assert search(checkpoints[method], queries, gallery, tmp_path / "ranked.jsonl", "--topk", 3,
                  "--index", index) == 0
    out, _ = capsys.readouterr()
    assert f"--index {index}: reused the stored features of all {num_gallery} gallery images" in out
    assert extracted == {"query": len(queries)}
    assert {p.name: p.stat().st_mtime_ns for p in index.iterdir()} == stored  # nothing rewritten
    records = [json.loads(line) for line in (tmp_path / "ranked.jsonl").read_text().splitlines()]
    assert [r["query"] for r in records] == [str(q) for q in queries]
    for record, expected in zip(records, [rows[1:][i * num_gallery:(i + 1) * num_gallery] for i in (1, 2, 3)]):
        assert [(g["rank"], g["gallery"]) for g in record["ranked"]] == [(int(r[1]), r[2]) for r in expected[:3]]
        # The queries are extracted in other batches than the first run's: the model's float32
        # kernels may round the last bit differently, so the distances agree to rounding.
        assert [g["distance"] for g in record["ranked"]] == \
               pytest.approx([float(r[3]) for r in expected[:3]], rel=1e-5, abs=1e-6)


def test_a_changed_gallery_re_extracts_only_what_changed(checkpoints, photos, tmp_path, capsys, extracted):
    gallery, index = tmp_path / "gallery", tmp_path / "index"
    shutil.copytree(photos / "gallery", gallery)
    queries = sorted((photos / "queries").glob("*.jpg"))
    assert search(checkpoints["transreid"], queries, gallery, tmp_path / "a.csv", "--index", index) == 0
    files = sorted(gallery.rglob("*.jpg"))
    # One image replaced by another picture, one removed, one added.
    shutil.copy(queries[0], files[0])
    os.utime(files[0], ns=(files[0].stat().st_atime_ns, files[0].stat().st_mtime_ns + 10 ** 9))
    files[1].unlink()
    shutil.copy(queries[1], gallery / "park" / "new arrival.jpg")
    capsys.readouterr()
    extracted.clear()
    assert search(checkpoints["transreid"], queries, gallery, tmp_path / "b.csv", "--index", index) == 0
    out, _ = capsys.readouterr()
    assert extracted["gallery"] == 2
    assert f"reused {len(files) - 2} stored gallery features, extracted 2 (new or changed), dropped 1 removed" in out
    # The updated index ranks as a fresh extraction of the whole folder (the values may differ in
    # the last bit: a batch of other images rounds the ViT's GEMMs differently).
    assert search(checkpoints["transreid"], queries, gallery, tmp_path / "fresh.csv") == 0
    updated, fresh = read_csv(tmp_path / "b.csv"), read_csv(tmp_path / "fresh.csv")
    assert [r[:3] for r in updated] == [r[:3] for r in fresh]
    assert [float(r[3]) for r in updated[1:]] == pytest.approx([float(r[3]) for r in fresh[1:]], rel=1e-5, abs=1e-6)
    assert read_csv(tmp_path / "b.csv")[1][2] == str(files[0])  # the query's own picture is now nearest

    # Another checkpoint: the stored features are not those of its model, so all are extracted again.
    extracted.clear()
    assert search(checkpoints["transmatcher"], queries, gallery, tmp_path / "c.csv", "--index", index) == 0
    assert "(built with another checkpoint or input size)" in capsys.readouterr().out
    assert extracted["gallery"] == len(files)


# --- streaming equals dense -----------------------------------------------------------------
@pytest.mark.parametrize("method", ["transmatcher", "transreid"])
def test_streaming_over_shards_equals_the_dense_ranking(method, checkpoints, photos, tmp_path):
    reid = tmf.ReID.load(checkpoints[method], device="cpu", workers=0)
    gallery = tmp_path / "gallery"
    shutil.copytree(photos / "gallery", gallery)
    query = reid.extract(photos / "queries")
    index, update = reid.index(gallery, tmp_path / "index", shard_bytes=3 * reid.bytes_per_image())
    assert update.extracted == len(index) and len(list(index.shards())) == -(-len(index) // 3)
    # An update leaves shards that are not in gallery order: positions still say which image is which.
    newest = sorted(gallery.rglob("*.jpg"))[0]
    os.utime(newest, ns=(newest.stat().st_atime_ns, newest.stat().st_mtime_ns + 10 ** 9))
    index, update = reid.index(gallery, tmp_path / "index", shard_bytes=3 * reid.bytes_per_image())
    assert update.extracted == 1
    stored = index.features_of(range(len(index)))  # the same features, all at once
    dense = match(reid.matcher, query.features, stored)
    for k in (1, 5, len(index)):
        streamed = stream_topk(reid.matcher, query.features, index.shards(), k)
        # Streaming scores other block shapes than the dense call: the float32 GEMMs may round
        # the last bit differently, so values agree to rounding and the order is checked as a
        # valid top-k of the dense distances (two within rounding may come either way).
        assert streamed.index.shape == (len(query.features), k)
        assert all(len(set(row.tolist())) == k for row in streamed.index)
        torch.testing.assert_close(streamed.dist, dense.gather(1, streamed.index), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(streamed.dist, dense.sort(dim=1).values[:, :k], rtol=1e-6, atol=1e-6)
    fresh = reid.extract(list(index.paths)).features
    torch.testing.assert_close(stored, fresh, rtol=1e-5, atol=1e-5)


def test_the_index_knows_its_images_whatever_the_working_folder(checkpoints, photos, tmp_path, monkeypatch):
    reid = tmf.ReID.load(checkpoints["transreid"], device="cpu", workers=0)
    shutil.copytree(photos / "gallery", tmp_path / "gallery")
    _, update = reid.index(tmp_path / "gallery", tmp_path / "index")
    assert update.extracted == len(list((tmp_path / "gallery").rglob("*.jpg")))
    monkeypatch.chdir(tmp_path)
    index, update = reid.index("gallery", "index")
    assert (update.extracted, update.removed) == (0, 0)
    assert index.paths[0] == os.path.join("gallery", "park", "IMG_0000.jpg")  # as the caller named it


def test_merge_keeps_the_lower_gallery_position_first_among_equal_distances():
    best = TopK(torch.tensor([[0.5, 0.7]]), torch.tensor([[9, 4]]))
    new = TopK(torch.tensor([[0.5, 0.2, 0.7]]), torch.tensor([[3, 8, 1]]))
    merged = merge_topk(best, new, 4)
    assert merged.index.tolist() == [[8, 3, 9, 1]]
    assert merged.dist[0].tolist() == pytest.approx([0.2, 0.5, 0.5, 0.7])


# --- bad input --------------------------------------------------------------------------------
def test_bad_input_is_one_line_before_any_extraction(checkpoints, photos, tmp_path, extracted, capsys):
    ckpt, queries, gallery = checkpoints["transmatcher"], photos / "queries", photos / "gallery"
    out = tmp_path / "ranked.csv"
    empty = tmp_path / "empty"
    empty.mkdir()
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")

    def error(*argv):
        return one_line_error(["search", *map(str, argv), *QUIET])

    base = ["--checkpoint", ckpt, "--query", queries, "--out", out]
    assert error(*base, "--gallery", tmp_path / "nowhere").endswith(f"--gallery {tmp_path / 'nowhere'}: no such folder")
    assert "is a file, not a folder" in error(*base, "--gallery", text)
    assert f"--gallery {empty}: no images (.jpg, .jpeg, .png, .bmp) in it or below it" in error(*base, "--gallery", empty)
    assert f"--query {empty}: no images" in error("--checkpoint", ckpt, "--query", empty, "--out", out,
                                                   "--gallery", gallery)
    assert "no such file or folder" in error("--checkpoint", ckpt, "--query", tmp_path / "me.jpg", "--out", out,
                                             "--gallery", gallery)
    assert f"--checkpoint {text}: is a text file, not a checkpoint" in error(
        "--checkpoint", text, "--query", queries, "--out", out, "--gallery", gallery)
    assert "--out" in error(*base[:4], "--out", tmp_path / "missing" / "r.csv", "--gallery", gallery)
    with pytest.raises(SystemExit) as status:  # a malformed command line: argparse's status 2
        cli.main(["search", *map(str, base), "--gallery", str(gallery), "--topk", "0"])
    assert status.value.code == 2

    # An unreadable image is named; nothing is extracted until it is fixed or skipped.
    broken_gallery = tmp_path / "broken"
    shutil.copytree(gallery, broken_gallery)
    bad = broken_gallery / "street" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    message = error(*base, "--gallery", broken_gallery)
    assert f"gallery: {bad}: cannot read the image" in message and "--skip-bad-images" in message
    bad_query = tmp_path / "bad query.jpg"
    bad_query.write_bytes(b"")
    message = error("--checkpoint", ckpt, "--query", queries, bad_query, "--out", out, "--gallery", gallery)
    assert f"--query {bad_query}: cannot read the image" in message
    assert extracted == {}

    capsys.readouterr()
    assert search(ckpt, [queries, bad_query], broken_gallery, out, "--skip-bad-images") == 0
    err = capsys.readouterr().err
    assert str(bad) in err and str(bad_query) in err
    rows = read_csv(out)
    assert str(bad) not in {r[2] for r in rows[1:]} and str(bad_query) not in {r[0] for r in rows[1:]}


def test_reid_load_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text("{}")
    with pytest.raises(validate.UserError, match="is a JSON file, not a checkpoint"):
        tmf.ReID.load(notes)


# --- the Python API ----------------------------------------------------------------------------
def test_reid_api_on_paths_pil_images_and_tensors(checkpoints, photos, tmp_path):
    reid = tmf.ReID.load(checkpoints["transmatcher"], device="cpu", workers=0)
    files = sorted((photos / "queries").glob("*.jpg"))
    from_paths = reid.extract(files)
    assert from_paths.paths == [str(f) for f in files]
    images = [Image.open(f) for f in files]
    from_pil = reid.extract(images)
    batch = torch.stack([reid.transform(image.convert("RGB")) for image in images])
    from_tensor = reid.extract(batch)
    for features in (from_pil, from_tensor):
        torch.testing.assert_close(features.features, from_paths.features, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[N, 3, 64, 32\]"):
        reid.extract(torch.zeros(2, 3, 32, 32))

    gallery = sorted((photos / "gallery").rglob("*.jpg"))
    by_paths = reid.rank(files, photos / "gallery", topk=4)
    assert by_paths.kind == "distance" and by_paths.distance_name == "1 - sigmoid(score / 10)"
    assert by_paths.indices.shape == (len(files), 4) and by_paths.topk == 4
    assert by_paths.gallery_paths == [str(p) for p in gallery]
    assert by_paths.paths[0][0] == str(gallery[int(by_paths.indices[0, 0])])
    in_memory = reid.rank(images, [Image.open(p) for p in gallery], topk=4)
    assert in_memory.query_paths is None and in_memory.paths[0][0] == f"#{int(in_memory.indices[0, 0])}"
    assert torch.equal(in_memory.indices, by_paths.indices)
    torch.testing.assert_close(in_memory.distances, by_paths.distances, rtol=1e-5, atol=1e-6)
    clamped = reid.rank(from_paths, reid.extract(gallery[:3]), topk=10)
    assert clamped.topk == 3

    written = write_ranking(tmp_path / "api.csv", by_paths)
    rows = read_csv(written)
    assert rows[1] == [str(files[0]), "1", by_paths.paths[0][0], repr(float(by_paths.distances[0, 0]))]
    assert [r for r in by_paths.records()][0]["distance"] == float(by_paths.distances[0, 0])


def test_an_index_of_another_format_is_rebuilt(tmp_path, photos, checkpoints):
    (tmp_path / "index.json").write_text(json.dumps({"format": "something else"}))
    index = GalleryIndex(tmp_path, {"checkpoint_sha256": "x"})
    assert index.changed([str(p) for p in sorted((photos / "gallery").rglob("*.jpg"))[:2]])


def _fake_features(paths):
    rows = torch.arange(len(paths), dtype=torch.float32)[:, None].repeat(1, 4)
    zeros = torch.zeros(len(paths), dtype=torch.int64)
    return Features(rows, zeros, zeros, paths=list(paths))


def test_an_image_rewritten_while_it_is_extracted_is_extracted_again(tmp_path):
    """Its size and time are taken before it is read: features of the old bytes are never
    stored under the new file's fingerprint."""
    images = [tmp_path / f"{name}.jpg" for name in "abc"]
    for image in images:
        image.write_bytes(b"old")
    paths = [str(p) for p in images]

    def extract_while_b_changes(chunk):
        images[1].write_bytes(b"new bytes")  # rewritten while the shard is being extracted
        os.utime(images[1], ns=(images[1].stat().st_atime_ns, images[1].stat().st_mtime_ns + 10 ** 9))
        return _fake_features(chunk)

    index = GalleryIndex(tmp_path / "index", {"checkpoint_sha256": "x"})
    index.update(paths, extract_while_b_changes, per_shard=3)
    again = GalleryIndex(tmp_path / "index", {"checkpoint_sha256": "x"})
    assert again.changed(paths) == [paths[1]]


def test_two_updates_of_one_index_never_share_a_shard_name(tmp_path):
    images = [tmp_path / f"{name}.jpg" for name in "ab"]
    for image in images:
        image.write_bytes(b"x")
    first = GalleryIndex(tmp_path / "index", {"checkpoint_sha256": "x"})
    second = GalleryIndex(tmp_path / "index", {"checkpoint_sha256": "x"})  # read the same state
    first.update([str(images[0])], _fake_features, per_shard=1)
    second.update([str(images[1])], _fake_features, per_shard=1)
    shards = sorted(p.name for p in (tmp_path / "index").glob("shard-*.pt"))
    assert len(shards) == 2  # the second did not overwrite the first's shard
    last = GalleryIndex(tmp_path / "index", {"checkpoint_sha256": "x"})
    assert last.changed([str(images[1])]) == []  # the last index.json names its own shard


def test_search_refuses_outputs_that_would_be_ranked_or_replace_the_checkpoint(checkpoints, photos, tmp_path):
    ckpt, queries, gallery = checkpoints["transreid"], photos / "queries", tmp_path / "gallery"
    shutil.copytree(photos / "gallery", gallery)
    base = ["search", "--query", queries, "--gallery", gallery, *QUIET]
    for flag in ("--index", "--pictures"):
        message = one_line_error([*base, "--checkpoint", ckpt, "--out", tmp_path / "r.csv", flag, gallery / "kept"])
        assert message.endswith(f"{flag} {gallery / 'kept'}: is inside --gallery {gallery}; choose a folder outside it")
    copy = tmp_path / "copy.pt"
    shutil.copy(ckpt, copy)
    message = one_line_error([*base, "--checkpoint", copy, "--out", copy])
    assert message.endswith(f"--out {copy}: is the checkpoint; choose another file")
