"""CFS filtering (transmatcher_fast.engine.cfs): scores against a direct computation, the ranked
outputs, resuming after an interruption (an exception, and a hard kill), unreadable images,
reading upstream's pickled list safely, select_top. Tiny images and models."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from transmatcher_fast.engine import cfs

N_IMAGES = 11


def make_models():
    """Two tiny feature models [B, 3, H, W] -> [B, 8] (pooled colours, then different linear maps),
    deterministic so every call builds the same ones."""
    def model(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.AdaptiveAvgPool2d((4, 2)), nn.Flatten(), nn.Linear(24, 8), nn.LayerNorm(8))
    return model(0), model(1)


def make_images(folder: Path, n: int = N_IMAGES):
    """``n`` small random RGB images (names relative to ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = f"img_{i:03d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (20, 10, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def direct_scores(models, folder, names):
    transform = cfs.build_cfs_transform()
    batch = torch.stack([transform(Image.open(folder / n).convert("RGB")) for n in names])
    with torch.no_grad():
        a, b = (m(batch).double().numpy() for m in models)  # (no dropout/BN: mode is moot)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture
def images(tmp_path):
    return tmp_path / "images", make_images(tmp_path / "images")


def test_scores_order_and_files(images, tmp_path):
    folder, names = images
    models = make_models()
    out = tmp_path / "out"
    result = cfs.run_cfs(*models, names, out, root=folder, batch_size=3, progress=False)
    assert result.complete and result.failed == []
    assert all(m.training for m in models)  # eval for the call, modes restored
    expected = direct_scores(models, folder, names)
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5)
    assert result.scores.dtype == np.float32

    ranked = [names[i] for i in np.argsort(-expected, kind="stable")]
    assert (out / cfs.LIST_FILE).read_text().splitlines() == ranked
    listed = [float(s) for s in (out / cfs.SCORES_FILE).read_text().splitlines()]
    np.testing.assert_allclose(listed, np.sort(expected)[::-1], atol=1e-6)
    assert listed == sorted(listed, reverse=True)
    np.testing.assert_array_equal(np.load(out / cfs.SCORES_NPY), result.scores)
    assert (out / cfs.HIST_FILE).read_bytes()[:4] == b"\x89PNG"
    assert not (out / cfs.FAILED_FILE).exists()
    assert cfs.read_cfs_list(out / cfs.LIST_FILE) == ranked

    # A finished run is not scored again.
    again = cfs.compute_cfs_scores(*models, names, out, root=folder, on_batch=_fail, progress=False)
    np.testing.assert_array_equal(again.scores, result.scores)


def _fail(done, total):
    raise AssertionError("scored again")


class _Stop(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_result(images, tmp_path):
    folder, names = images
    models = make_models()
    whole = cfs.run_cfs(*models, names, tmp_path / "whole", root=folder, batch_size=2, progress=False,
                        histogram=False)

    out = tmp_path / "resumed"
    seen = []

    def stop_after_three(done, total):
        seen.append(done)
        if len(seen) == 2:  # the periodic save (save_every=2) has happened
            state = json.loads((out / cfs.PROGRESS_FILE).read_text())
            assert state["done"] == 4 and len(np.load(out / cfs.PARTIAL_FILE)) == 4
        if len(seen) == 3:
            raise _Stop

    with pytest.raises(_Stop):
        cfs.run_cfs(*models, names, out, root=folder, batch_size=2, save_every=2,
                    on_batch=stop_after_three, progress=False, histogram=False)
    # The interrupted call saved its 3 batches on the way out; no list is written yet.
    assert json.loads((out / cfs.PROGRESS_FILE).read_text())["done"] == 6
    assert not (out / cfs.LIST_FILE).exists()

    calls = []
    counted = [nn.Sequential(m) for m in models]
    counted[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    resumed = cfs.run_cfs(*counted, names, out, root=folder, batch_size=2, progress=False, histogram=False)
    assert sum(calls) == N_IMAGES - 6  # only the rest was scored
    np.testing.assert_array_equal(resumed.scores, whole.scores)
    assert (out / cfs.LIST_FILE).read_text() == (tmp_path / "whole" / cfs.LIST_FILE).read_text()


def test_batch_limit_and_changed_path_list(images, tmp_path):
    folder, names = images
    models = make_models()
    out = tmp_path / "out"
    part = cfs.run_cfs(*models, names, out, root=folder, batch_size=4, max_batches=1, progress=False,
                       histogram=False)
    assert not part.complete and part.done == 4
    assert np.isfinite(part.scores[:4]).all() and np.isnan(part.scores[4:]).all()
    with pytest.raises(ValueError, match="different list of paths"):
        cfs.compute_cfs_scores(*models, names[::-1], out, root=folder, progress=False)
    with pytest.raises(ValueError, match="different list of paths"):
        cfs.compute_cfs_scores(*models, names[:-1], out, root=folder, progress=False)
    rest = cfs.run_cfs(*models, names, out, root=folder, batch_size=4, progress=False, histogram=False)
    assert rest.complete
    np.testing.assert_allclose(rest.scores, direct_scores(models, folder, names), rtol=1e-5)


def test_resume_after_a_hard_kill(images, tmp_path, monkeypatch):
    """A process killed between two saves (no exception handler runs, so no save on the way out)
    loses only the batches after the last periodic save."""
    folder, names = images
    out = tmp_path / "out"
    save = cfs._save_progress
    dead = []
    monkeypatch.setattr(cfs, "_save_progress", lambda *a: None if dead else save(*a))

    def kill(done, total):
        if done >= 6:  # 3 batches of 2, saved after the 2nd
            dead.append(True)
            raise _Stop

    with pytest.raises(_Stop):
        cfs.compute_cfs_scores(*make_models(), names, out, root=folder, batch_size=2, save_every=2,
                               on_batch=kill, progress=False)
    assert json.loads((out / cfs.PROGRESS_FILE).read_text())["done"] == 4
    assert not list(out.glob(".*.tmp"))
    monkeypatch.setattr(cfs, "_save_progress", save)
    models = make_models()
    resumed = cfs.run_cfs(*models, names, out, root=folder, batch_size=2, progress=False, histogram=False)
    np.testing.assert_allclose(resumed.scores, direct_scores(models, folder, names), rtol=1e-5)


def test_unreadable_images_are_reported_not_fatal(images, tmp_path):
    folder, names = images
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    paths = names[:3] + ["broken.jpg", "missing.png"] + names[3:]
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"2 of 13 images could not be scored.*broken\.jpg.*missing\.png"):
        result = cfs.run_cfs(*make_models(), paths, out, root=folder, batch_size=4, progress=False,
                             histogram=False)
    assert [(i, p) for i, p, _ in result.failed] == [(3, "broken.jpg"), (4, "missing.png")]
    assert np.isnan(result.scores[[3, 4]]).all() and np.isfinite(np.delete(result.scores, [3, 4])).all()
    listed = (out / cfs.LIST_FILE).read_text().splitlines()
    assert sorted(listed) == sorted(names)
    failed = (out / cfs.FAILED_FILE).read_text().splitlines()
    assert [line.split("\t")[0] for line in failed] == ["broken.jpg", "missing.png"]
    assert all("cannot read the image" in line for line in failed)


def test_failure_inside_a_batch_keeps_a_consistent_prefix(images, tmp_path):
    folder, names = images
    (folder / "broken.jpg").write_bytes(b"garbage")
    paths = names[:5] + ["broken.jpg"] + names[5:]  # the 3rd batch of 2: items 4, 5
    source, target = make_models()
    calls = []

    def explode(module, inputs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")

    handle = source.register_forward_pre_hook(explode)
    with pytest.raises(RuntimeError, match="device lost"):
        cfs.compute_cfs_scores(source, target, paths, tmp_path / "out", root=folder, batch_size=2,
                               save_every=100, progress=False)
    state = json.loads((tmp_path / "out" / cfs.PROGRESS_FILE).read_text())
    assert state["done"] == 4 and state["failed"] == []  # batch 3 not counted, its failure not kept
    handle.remove()
    result = cfs.compute_cfs_scores(source, target, paths, tmp_path / "out", root=folder, batch_size=2,
                                    progress=False)
    assert [(i, p) for i, p, _ in result.failed] == [(5, "broken.jpg")]
    assert result.complete and np.isfinite(np.delete(result.scores, 5)).all()


def test_bad_arguments(images, tmp_path):
    folder, names = images
    models = make_models()
    with pytest.raises(ValueError, match="line break"):
        cfs.compute_cfs_scores(*models, ["a\nb.jpg"], tmp_path, progress=False)
    with pytest.raises(TypeError, match="not one path"):
        cfs.compute_cfs_scores(*models, "a.jpg", tmp_path, progress=False)
    with pytest.raises(ValueError, match="empty"):
        cfs.compute_cfs_scores(*models, [], tmp_path, progress=False)
    wide = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5))
    with pytest.raises(ValueError, match="target_model 5-d"):
        cfs.compute_cfs_scores(models[0], wide, names, tmp_path / "w", root=folder, progress=False)
    with pytest.raises(ValueError, match="source_model must map"):
        cfs.compute_cfs_scores(nn.Identity(), models[1], names, tmp_path / "i", root=folder, progress=False)


# ------------------------------------------------------------------------------------------------
# Reading lists, select_top
# ------------------------------------------------------------------------------------------------

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_read_cfs_list_pickle_and_text(tmp_path):
    names = ["a/0001.jpg", "b/0002.jpg", "ünïcode.png"]
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"CFS_list_{protocol}.pkl"
        path.write_bytes(pickle.dumps(names, protocol=protocol))
        assert cfs.read_cfs_list(path) == names
    text = tmp_path / "list.txt"
    text.write_text("a/0001.jpg\n\nb/0002.jpg\n")
    assert cfs.read_cfs_list(text) == ["a/0001.jpg", "b/0002.jpg"]
    with pytest.raises(FileNotFoundError, match="nowhere.pkl"):
        cfs.read_cfs_list(tmp_path / "nowhere.pkl")


def test_read_cfs_list_refuses_code_and_non_lists(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "CFS_list.pkl"
    evil.write_bytes(pickle.dumps(["a.jpg", _Evil(marker)]))
    with pytest.raises(ValueError, match=r"refused to read .*CFS_list\.pkl.*system"):
        cfs.read_cfs_list(evil)
    assert not marker.exists()  # nothing ran

    disguised = tmp_path / "list.txt"  # a pickle under another name is still read as one
    disguised.write_bytes(pickle.dumps(_Evil(marker), protocol=4))
    with pytest.raises(ValueError, match="refused"):
        cfs.read_cfs_list(disguised)
    assert not marker.exists()

    for value, kind in (({"a.jpg": 1}, "dict"), (("a.jpg",), "tuple"), (["a.jpg", 3], "int")):
        path = tmp_path / f"{kind}.pkl"
        path.write_bytes(pickle.dumps(value))
        with pytest.raises(ValueError, match=kind):
            cfs.read_cfs_list(path)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(pickle.dumps(["a.jpg", "b.jpg"])[:-3])
    with pytest.raises(ValueError, match="not a readable pickle"):
        cfs.read_cfs_list(truncated)


def test_select_top():
    names = [f"{i}.jpg" for i in range(10)]
    assert cfs.select_top(names, keep=3) == names[:3]
    assert cfs.select_top(names, keep=0) == [] and cfs.select_top(names, keep=10) == names
    assert cfs.select_top(names, keep_ratio=0.5) == names[:5]
    assert cfs.select_top(names, keep_ratio=0.25) == names[:3]  # 2.5 rounds half up
    assert cfs.select_top(names, keep_ratio=1.0) == names
    assert cfs.select_top(names, keep_ratio=0.01) == names[:1]  # at least one
    assert cfs._count_for_ratio(0.5, 4180243) == 2090122  # upstream's 50 % of LUPerson
    for kwargs in ({}, {"keep": 1, "keep_ratio": 0.5}):
        with pytest.raises(ValueError, match="exactly one"):
            cfs.select_top(names, **kwargs)
    for ratio in (0, -0.1, 1.5, float("nan"), "half"):
        with pytest.raises(ValueError, match="keep_ratio"):
            cfs.select_top(names, keep_ratio=ratio)
    for keep in (11, -1, 2.0):
        with pytest.raises(ValueError, match="keep must"):
            cfs.select_top(names, keep=keep)


def test_histogram_of_identical_scores(tmp_path):
    """The same model as source and target scores every image 1: the histogram still draws."""
    from transmatcher_fast.engine.cfs import _histogram

    _histogram(np.full(50, 1.0, dtype=np.float32), tmp_path / "hist.png")
    assert (tmp_path / "hist.png").stat().st_size > 1000
