"""The synthetic person generator: determinism, Market-1501 layout, same-camera easier than
cross-camera, and the CLI."""

import itertools

import numpy as np
import pytest
from PIL import Image

from transmatcher_fast import cli
from transmatcher_fast.data.datasets import Market1501
from transmatcher_fast.data.synthetic import generate_synthetic

SMALL = dict(ids=6, cams=3, images_per_cam=3, height=64, width=32)


def files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    generate_synthetic(tmp_path / "a", seed=3, **SMALL)
    generate_synthetic(tmp_path / "b", seed=3, **SMALL)
    generate_synthetic(tmp_path / "c", seed=4, **SMALL)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert len(a) == 6 * 3 * 3 and a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_market_layout_and_counts(tmp_path):
    counts = generate_synthetic(tmp_path, seed=0, **SMALL)
    assert counts == {"bounding_box_train": 3 * 3 * 3, "query": 3 * 3, "bounding_box_test": 3 * 3 * 2}
    data = Market1501(tmp_path)
    assert data.stats(data.train) == (3, 27, 3) and sorted({p for _, p, _ in data.train}) == [0, 1, 2]
    assert data.stats(data.query) == (3, 9, 3) and data.stats(data.gallery) == (3, 18, 3)
    test_ids = {p for _, p, _ in data.query}
    assert test_ids == {4, 5, 6} == {p for _, p, _ in data.gallery}  # raw pids, disjoint from train's 1..3
    # one query per test id and camera
    assert sorted((p, c) for _, p, c in data.query) == sorted(itertools.product([4, 5, 6], range(3)))
    with Image.open(data.query[0][0]) as image:
        assert image.size == (32, 64) and image.mode == "RGB"
    with pytest.raises(FileExistsError, match="bounding_box_train is not empty"):
        generate_synthetic(tmp_path, seed=0, **SMALL)


def test_same_camera_is_easier_than_cross_camera(tmp_path):
    ids, cams, k = 8, 4, 3
    generate_synthetic(tmp_path, ids=ids, cams=cams, images_per_cam=k, seed=1, height=64, width=32)
    data = Market1501(tmp_path)
    images = {}
    for path, pid, cam in data.train:
        images.setdefault((pid, cam), []).append(np.asarray(Image.open(path), np.float32))
    within, across = [], []
    for pid in range(ids // 2):
        for c1, c2 in itertools.combinations_with_replacement(range(cams), 2):
            for (i, x), (j, y) in itertools.product(enumerate(images[pid, c1]), enumerate(images[pid, c2])):
                if c1 == c2 and i < j:
                    within.append(np.abs(x - y).mean())
                elif c1 != c2:
                    across.append(np.abs(x - y).mean())
    assert np.mean(within) < 0.6 * np.mean(across)


def test_bad_arguments():
    with pytest.raises(ValueError, match="ids must be at least 2"):
        generate_synthetic("unused", ids=1)
    with pytest.raises(ValueError, match="cams must be in 1..9"):
        generate_synthetic("unused", cams=10)


def test_cli_synth(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path), "--ids", "4", "--cams", "2", "--images-per-cam", "2",
                     "--seed", "5", "--height", "48", "--width", "24"]) == 0
    out = capsys.readouterr().out
    assert "wrote 4 ids x 2 cameras x 2 images (48x24)" in out and "query    |     2 |        4 |         2" in out
    assert (tmp_path / "synthetic.json").exists()
