"""What a user meets on a tour of the commands: cameras shown as the file names number them,
checkpoint errors that say what the file is, --compare-checkpoint refused for a non-ViT model,
no train.lock left after a run, and warnings printed as the command's one-line notes."""

from __future__ import annotations

import csv
import re
import subprocess
from pathlib import Path

import pytest

from helpers import one_line_error
from test_cli import ENV, command, data_dir, trained  # noqa: F401  (fixtures)
from transmatcher_fast import cli
from transmatcher_fast.data import build_dataset
from transmatcher_fast.data.datasets import PidCamFolder
from transmatcher_fast.engine import visualize
from transmatcher_fast.engine.rundir import LOCK_NAME

CAMERA_IN_NAME = re.compile(r"_c(\d+)")


def camera_in_name(path) -> int:
    return int(CAMERA_IN_NAME.search(Path(path).name).group(1))


@pytest.fixture(scope="module")
def run_dir(trained):
    return trained.parent


def test_datasets_say_how_their_names_number_cameras(data_dir, tmp_path):
    market = build_dataset("market1501", data_dir / "market1501")
    assert market.camera_base == 1
    for path, _, camid in market.train + market.query + market.gallery:
        assert camid + market.camera_base == camera_in_name(path)
    folder = tmp_path / "zero_based"
    folder.mkdir()
    image = next((data_dir / "market1501" / "query").glob("*.jpg"))
    (folder / "0001_c0_x.jpg").write_bytes(image.read_bytes())
    generic = PidCamFolder(folder, cam_base=0)
    assert generic.camera_base == 0 and generic.train[0][2] == 0


def test_ranked_exports_show_the_cameras_of_the_file_names(data_dir, run_dir, tmp_path):
    ranked = tmp_path / "ranked.csv"
    assert cli.main(["eval", "--checkpoint", str(run_dir / "checkpoint.pt"), "--data-dir", str(data_dir),
                     "-j", "0", "--no-progress", "--save-ranked", str(ranked), "--ranked-topk", "3"]) == 0
    rows = list(csv.DictReader(ranked.open()))
    assert rows
    for row in rows:
        assert int(row["query_cam"]) == camera_in_name(row["query_path"])
        assert int(row["gallery_cam"]) == camera_in_name(row["gallery_path"])


def test_pictures_show_the_cameras_of_the_file_names(data_dir, run_dir, tmp_path, monkeypatch):
    labels, headers = [], []
    draw_row, draw_pair = visualize.ranked_list_image, visualize.save_correspondences

    def ranked_row(query, gallery, same, **kw):
        labels.append((query, kw["query_label"], kw["title"]))
        labels.extend(zip(gallery, kw["gallery_labels"], [None] * len(gallery)))
        return draw_row(query, gallery, same, **kw)

    def pair(out_path, probe, gallery, matches, **kw):
        headers.append((kw["probe_label"], kw["gallery_label"]))
        return draw_pair(out_path, probe, gallery, matches, **kw)
    monkeypatch.setattr(visualize, "ranked_list_image", ranked_row)
    monkeypatch.setattr(visualize, "save_correspondences", pair)
    assert cli.main(["visualize", "--checkpoint", str(run_dir / "checkpoint.pt"), "--data-dir", str(data_dir),
                     "-j", "0", "--no-progress", "--num-queries", "2", "--pairs", "1",
                     "--out", str(tmp_path / "pictures")]) == 0
    assert labels and headers
    for path, label, title in labels:
        assert label.endswith(f" c{camera_in_name(path)}"), (path, label)
        if title is not None:
            assert f" c{camera_in_name(path)} " in title, (path, title)
    for probe, gallery in headers:  # "query 3, pid 2 c1, 0002_c1s1_....jpg"
        for label in (probe, gallery):
            assert re.search(r" c(\d+), (\S+)$", label).group(1) == str(camera_in_name(label.split(", ")[-1]))


def test_a_text_file_or_a_truncated_checkpoint_says_what_it_is(data_dir, run_dir, tmp_path):
    log = run_dir / "log.jsonl"
    message = one_line_error(["eval", "--checkpoint", log, "--data-dir", data_dir])
    assert message == (f"transmatcher-fast eval: --checkpoint {log}: is a JSON file, not a checkpoint; "
                       "give a complete checkpoint.pt of transmatcher-fast train or upstream's checkpoint.pth.tar")
    config = run_dir / "config.yaml"
    assert f"{config}: is a text file, not a checkpoint" in one_line_error(
        ["eval", "--checkpoint", config, "--data-dir", data_dir])
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((run_dir / "checkpoint.pt").read_bytes()[:4096])
    message = one_line_error(["eval", "--checkpoint", truncated, "--data-dir", data_dir])
    assert f"--checkpoint {truncated}: the checkpoint is truncated or corrupt (" in message
    assert "If you are seeing this error" not in message and "miniz" not in message
    assert "could run code" not in message


def test_compare_checkpoint_is_refused_for_a_model_without_attention(data_dir, run_dir, tmp_path):
    checkpoint = run_dir / "checkpoint.pt"
    out = tmp_path / "pictures"
    message = one_line_error(["visualize", "--checkpoint", checkpoint, "--compare-checkpoint", checkpoint,
                              "--data-dir", data_dir, "-j", "0", "--out", out])
    assert "--compare-checkpoint" in message and "no attention maps" in message
    assert not out.exists()  # refused before anything was drawn


def test_a_finished_run_leaves_no_lock_file(run_dir):
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / LOCK_NAME).exists()


def test_warnings_print_as_the_commands_notes(data_dir, run_dir):
    # k1 beyond the 24 images of the set: re-ranking warns and goes on.
    args = ["eval", "--checkpoint", run_dir / "checkpoint.pt", "--data-dir", data_dir, "-j", "0",
            "--no-progress", "--rerank", "--k1", "30"]
    result = subprocess.run(command(*args), env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    notes = [line for line in result.stderr.splitlines() if "re-ranking" in line]
    assert notes == [notes[0]] and notes[0].startswith("transmatcher-fast eval: note: re-ranking: k1=30")
    assert "Warning" not in result.stderr and ".py:" not in result.stderr
    debug = subprocess.run(command(*args, "--debug"), env=ENV, capture_output=True, text=True, timeout=300)
    assert "evaluate.py:" in debug.stderr and "RuntimeWarning" in debug.stderr  # the source, on request
