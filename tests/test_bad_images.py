"""Unreadable images: every command that reads images names the file and the cause in one line
and exits 1, with any loader worker count; train/pretrain --skip-bad-images list the bad files
once (and in log.jsonl), leave them out and still resume exactly."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from helpers import fit_interrupted_in_epoch, one_line_error
from test_cli import TINY
from transmatcher_fast import cli
from transmatcher_fast.data import generate_synthetic
from transmatcher_fast.data.images import ImageReadError, find_unreadable, open_image
from transmatcher_fast.engine import cfs
from transmatcher_fast.engine.trainer import Trainer, TrainConfig

WORKERS = ["-j", "2"]  # after TINY's "-j 0": the last one counts


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:200])
    return path


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """A synthetic Market-1501 set with one truncated image in each split, and the names."""
    root = tmp_path_factory.mktemp("broken") / "data"
    generate_synthetic(root / "market1501", ids=8, cams=2, images_per_cam=3, seed=1, height=64, width=32)
    bad = {split: truncate(sorted((root / "market1501" / folder).glob("*.jpg"))[1])
           for split, folder in (("train", "bounding_box_train"), ("query", "query"),
                                 ("gallery", "bounding_box_test"))}
    return root, bad


@pytest.fixture(scope="module")
def trained(broken, tmp_path_factory):
    """A one-step checkpoint (trained on the readable images)."""
    root, _ = broken
    exp = tmp_path_factory.mktemp("run")
    assert cli.main(["train", *TINY, "--data-dir", str(root), "--exp-dir", str(exp), "--epochs", "1",
                     "--max-steps-per-epoch", "1", "--skip-bad-images"]) == 0
    return exp / "checkpoint.pt"


class _Paths(Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        open_image(self.paths[index])
        return torch.zeros(1)


def test_a_worker_error_names_the_file(broken):
    _, bad = broken
    good = sorted(bad["train"].parent.glob("*.jpg"))[0]
    loader = DataLoader(_Paths([good, good, bad["train"], good]), batch_size=1, num_workers=2)
    with pytest.raises(ImageReadError) as info:
        list(loader)
    assert str(info.value).startswith(f"{bad['train']}: cannot read the image (")
    assert info.value.path == str(bad["train"])
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value) and again.path == info.value.path
    assert str(ImageReadError("Caught ValueError elsewhere")) == "Caught ValueError elsewhere"


def test_find_unreadable_lists_every_bad_file_in_order(tmp_path, broken):
    _, bad = broken
    good = sorted(bad["train"].parent.glob("*.jpg"))[0]
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")
    paths = [str(p) for p in (good, bad["query"], good, tmp_path / "missing.jpg", not_image, bad["gallery"])]
    for workers in (0, 2):
        found = find_unreadable(paths, workers=workers, progress=False, batch_size=2)
        assert [p for p, _ in found] == [paths[1], paths[3], paths[4], paths[5]]
        assert all(error.startswith(f"{p}: cannot read the image (") for p, error in found)


@pytest.mark.parametrize("command", ["eval", "extract", "visualize"])
def test_reading_commands_name_the_file_with_workers(command, broken, trained, tmp_path):
    root, bad = broken
    argv = {"eval": ["eval"],
            "extract": ["extract", "--out", tmp_path / "features.pt"],
            "visualize": ["visualize", "--out", tmp_path / "pictures", "--num-queries", "1"]}[command]
    message = one_line_error([*argv, "--checkpoint", trained, "--data-dir", root, "--no-progress", *WORKERS])
    assert f": {bad['query']}: cannot read the image (" in message or \
        f": {bad['gallery']}: cannot read the image (" in message, message
    assert message.startswith(f"transmatcher-fast {command}: ")


def test_train_names_the_file_with_workers(broken, tmp_path):
    root, bad = broken
    message = one_line_error(["train", *TINY, *WORKERS, "--data-dir", root, "--exp-dir", tmp_path / "run",
                              "--epochs", "1", "--sampler", "random"])  # every image, each epoch
    assert message == f"transmatcher-fast train: {open_error(bad['train'])}"


def test_pretrain_names_the_file_and_skips_it(tmp_path, broken):
    _, bad = broken
    images = tmp_path / "images"
    shutil.copytree(bad["train"].parent, images / "a")
    dino = ["-a", "vit_tiny_patch16", "--height", "64", "--width", "32", "-b", "8", "--out-dim", "64",
            "--local-crops", "2", "--dino-warmup-epochs", "1", "--no-tensorboard", "--no-progress", "--epochs", "1",
            "--data-dir", images, *WORKERS]  # the whole epoch: every image
    copied = images / "a" / bad["train"].name
    message = one_line_error(["pretrain", *dino, "--exp-dir", tmp_path / "stops"])
    assert message == f"transmatcher-fast pretrain: {open_error(copied)}"
    assert cli.main([str(a) for a in ["pretrain", *dino, "--exp-dir", tmp_path / "runs", "--skip-bad-images"]]) == 0
    skipped = [r for r in log_records(tmp_path / "runs") if r["kind"] == "skipped_images"]
    assert [[i["path"] for i in r["images"]] for r in skipped] == [[str(copied)]]


def test_cfs_stops_at_a_bad_image_unless_told_to_skip_it(tmp_path, broken):
    _, bad = broken
    folder = bad["train"].parent
    names = [p.name for p in sorted(folder.glob("*.jpg"))]

    def model(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d((4, 2)), torch.nn.Flatten(),
                                   torch.nn.Linear(24, 8))
    args = dict(root=folder, batch_size=4, num_workers=2, progress=False)
    with pytest.raises(ImageReadError, match=f"^{bad['train']}: cannot read the image"):
        cfs.compute_cfs_scores(model(0), model(1), names, tmp_path / "stops", skip_bad_images=False, **args)
    result = cfs.compute_cfs_scores(model(0), model(1), names, tmp_path / "skips", **args)
    assert [p for _, p, _ in result.failed] == [bad["train"].name]
    parse = cli.build_parser().parse_args
    cfs_args = ["cfs", "--source-checkpoint", "s", "--target-checkpoint", "t", "--images", "i", "--out", "o"]
    assert not parse(cfs_args).skip_bad_images and parse([*cfs_args, "--skip-bad-images"]).skip_bad_images


def open_error(path: Path) -> str:
    with pytest.raises(ImageReadError) as info:
        open_image(path)
    return str(info.value)


def log_records(exp_dir: Path) -> list:
    return [json.loads(line) for line in (exp_dir / "log.jsonl").read_text().splitlines()]


def config(root, exp_dir, *extra) -> TrainConfig:
    args = cli.build_parser().parse_args(["train", *TINY, "--data-dir", str(root), "--exp-dir", str(exp_dir),
                                          "--max-steps-per-epoch", "3", "--skip-bad-images", *map(str, extra)])
    return TrainConfig.from_dict({k: v for k, v in vars(args).items() if k not in ("command", "run", "config")})


def test_skip_bad_images_lists_once_and_resumes_exactly(broken, tmp_path, capsys):
    root, bad = broken
    full = Trainer(config(root, tmp_path / "full", "--epochs", "2"))
    out = capsys.readouterr().out
    total = len(list(bad["train"].parent.glob("*.jpg")))
    assert out.count(str(bad["train"])) == 1 and f"left out 1 of {total} training images" in out
    assert str(bad["train"]) not in {path for path, _, _ in full.dataset.train}
    full.fit()
    split = Trainer(config(root, tmp_path / "split", "--epochs", "2"))
    fit_interrupted_in_epoch(split, 1)
    resumed = Trainer(config(root, tmp_path / "split", "--epochs", "2", "--resume"))
    resumed.fit()

    def losses(run):
        return [r["loss"] for r in log_records(run) if r["kind"] == "step"]
    assert losses(tmp_path / "split") == losses(tmp_path / "full")
    for a, b in zip(full.matcher.state_dict().values(), resumed.matcher.state_dict().values()):
        assert torch.equal(a, b)
    # Listed once in the log, though the run started twice.
    skipped = [r for r in log_records(tmp_path / "split") if r["kind"] == "skipped_images"]
    assert len(skipped) == 1 and skipped[0]["count"] == 1
    assert skipped[0]["images"][0]["path"] == str(bad["train"])
    assert skipped[0]["images"][0]["error"] == open_error(bad["train"])
