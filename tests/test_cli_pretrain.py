"""``transmatcher-fast pretrain`` and ``cfs`` through the command line: DINO on a folder tree of
unlabelled images, resume from its config.yaml, kNN evaluation of the checkpoint, TransReID-SSL
fine-tuning from teacher.pth, CFS scoring (resumable) of the images with the two proxies, and
pre-training again on the top of the CFS list; one-line errors; the shipped configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from transmatcher_fast.cli import build_parser, main
from transmatcher_fast.data import generate_synthetic
from transmatcher_fast.engine.trainer import TrainConfig

QUIET = ["-j", "0", "--no-progress"]
TINY_DINO = ["-a", "vit_tiny_patch16", "--height", "64", "--width", "32", "-b", "8", "--out-dim", "64",
             "--local-crops", "2", "--dino-warmup-epochs", "1", "--no-tensorboard", *QUIET]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A synthetic labelled set, and its training images as an unlabelled folder tree."""
    root = tmp_path_factory.mktemp("pretrain")
    labelled = root / "synthetic"
    generate_synthetic(labelled, ids=16, cams=2, images_per_cam=4, seed=3, height=64, width=32)
    unlabelled = root / "unlabelled"
    for i, path in enumerate(sorted((labelled / "bounding_box_train").glob("*.jpg"))):
        target = unlabelled / ("a" if i % 2 else "b") / f"{i:03d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return labelled, unlabelled


def test_pretrain_fine_tune_cfs_and_pretrain_on_the_top(data, tmp_path, capsys):
    labelled, unlabelled = data
    run = tmp_path / "dino"
    assert main(["pretrain", *TINY_DINO, "--data-dir", str(unlabelled), "--exp-dir", str(run),
                 "--epochs", "1", "--max-steps-per-epoch", "2"]) == 0
    out = capsys.readouterr().out
    assert "=> Loaded 64 unlabelled images from" in out and "teacher.pth" in out
    assert {"checkpoint.pt", "teacher.pth", "config.yaml", "log.jsonl"} <= {p.name for p in run.iterdir()}
    # config.yaml holds every option (those of train and of DINO): pretrain reads it back.
    assert main(["pretrain", "--config", str(run / "config.yaml"), "--resume", "--epochs", "2"]) == 0
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0, 1]
    assert torch.load(run / "teacher.pth", weights_only=True)["epoch"] == 2
    # The checkpoint evaluates as any other: kNN re-ID of the teacher's cls tokens (cosine).
    results = tmp_path / "knn.json"
    assert main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "-d", "market", "--data-dir", str(labelled),
                 *QUIET, "--out", str(results)]) == 0
    assert 0 < json.loads(results.read_text())["mAP"] <= 1

    # TransReID-SSL fine-tuning from the teacher: no JPM / SIE, ICS off, lr per the SSL recipe.
    tuned = tmp_path / "tuned"
    assert main(["train", "--method", "transreid", "-a", "vit_tiny_patch16", "--height", "64", "--width", "32",
                 "-d", "market", "--data-dir", str(labelled), "--pretrained", str(run / "teacher.pth"),
                 "--pretrain-hw-ratio", "2", "--schedule-offset", "0", "--warmup-epochs", "1", "--lr", "0.01",
                 "-b", "16", "--epochs", "1", "--max-steps-per-epoch", "2", "--no-tensorboard", *QUIET,
                 "--exp-dir", str(tuned)]) == 0

    # DINO's view of the pre-trained and the fine-tuned model side by side, for the same queries.
    pictures = tmp_path / "pictures"
    assert main(["visualize", "--checkpoint", str(tuned / "checkpoint.pt"), "--compare-checkpoint",
                 str(run / "checkpoint.pt"), "-d", "market", "--data-dir", str(labelled), *QUIET,
                 "--num-queries", "2", "--out", str(pictures)]) == 0
    compared = sorted((pictures / "attention").glob("attention_compare_q*_pid*.png"))
    assert len(compared) == 2 and len(list((pictures / "attention").glob("attention_q*_pid*.png"))) == 2

    # CFS: source proxy = the pre-trained teacher, target proxy = its fine-tuned copy. Resumable.
    cfs_out = tmp_path / "cfs"
    common = ["cfs", "--target-checkpoint", str(tuned / "checkpoint.pt"), "--images", str(unlabelled),
              "--height", "64", "--width", "32", "-b", "16", *QUIET]
    assert main([*common, "--source-checkpoint", str(run / "checkpoint.pt"), "--out", str(cfs_out),
                 "--max-batches", "1"]) == 0
    assert "scored 16 of 64 images (--max-batches); the same command continues" in capsys.readouterr().out
    assert main([*common, "--source-checkpoint", str(run / "checkpoint.pt"), "--out", str(cfs_out)]) == 0
    out = capsys.readouterr().out
    assert "scored 64 images (0 unreadable, left out)" in out and "top 60%: 38 images" in out
    names = (cfs_out / "cfs_list.txt").read_text().splitlines()
    scores = [float(x) for x in (cfs_out / "cfs_scores.txt").read_text().splitlines()]
    assert sorted(names) == sorted(p.relative_to(unlabelled).as_posix() for p in unlabelled.rglob("*.jpg"))
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    assert (cfs_out / "cfs_hist.png").is_file()
    # teacher.pth (DINO's layout, bare weights) is the same source proxy.
    assert main([*common, "--source-checkpoint", str(run / "teacher.pth"), "--out", str(tmp_path / "cfs2")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "cfs2" / "cfs_scores.npy"), np.load(cfs_out / "cfs_scores.npy"),
                               atol=1e-6)

    # Pre-training on the top half of the CFS list.
    top = tmp_path / "dino_top"
    assert main(["pretrain", *TINY_DINO, "--data-dir", str(unlabelled), "--exp-dir", str(top), "--epochs", "1",
                 "--max-steps-per-epoch", "1", "--filter-list", str(cfs_out / "cfs_list.txt"),
                 "--keep-ratio", "0.5"]) == 0
    assert "CFS list cfs_list.txt: 32 images (the first 32 of 64: keep_ratio 0.5)" in capsys.readouterr().out


def test_pretrain_and_cfs_errors_are_one_line(data, tmp_path, capsys):
    labelled, unlabelled = data

    def error(argv) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        return str(exit_info.value.code)

    text = error(["pretrain", *TINY_DINO, "--data-dir", str(unlabelled), "--exp-dir", str(tmp_path / "a"),
                  "--eval-every", "1"])
    assert text.startswith("transmatcher-fast pretrain: eval_every 1: the unlabelled images of dataset 'images' "
                           "have no query/gallery") and "\n" not in text
    text = error(["pretrain", *TINY_DINO, "--data-dir", str(unlabelled), "--exp-dir", str(tmp_path / "b"),
                  "--filter-list", str(tmp_path / "missing.txt")])
    assert text == f"transmatcher-fast pretrain: --filter-list {tmp_path / 'missing.txt'}: no such file"
    text = error(["pretrain", *TINY_DINO, "--data-dir", str(tmp_path / "nowhere"), "--exp-dir", str(tmp_path / "c")])
    assert text.startswith(f"transmatcher-fast pretrain: --data-dir {tmp_path / 'nowhere'}: no such folder")
    text = error(["cfs", "--source-checkpoint", str(tmp_path / "none.pt"), "--target-checkpoint", str(tmp_path / "x"),
                  "--images", str(unlabelled), "--out", str(tmp_path / "o")])
    assert text == f"transmatcher-fast cfs: --source-checkpoint {tmp_path / 'none.pt'}: no such file"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    text = error(["cfs", "--source-checkpoint", str(garbage), "--target-checkpoint", str(garbage),
                  "--images", str(unlabelled), "--out", str(tmp_path / "o")])
    assert text.startswith(f"transmatcher-fast cfs: --source-checkpoint {garbage}: ") and "\n" not in text
    text = error(["cfs", "--source-checkpoint", str(garbage), "--target-checkpoint", str(garbage),
                  "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert text == f"transmatcher-fast cfs: --images {tmp_path / 'nowhere'}: no such folder of images"
    with pytest.raises(SystemExit):  # only DINO pre-trains
        main(["pretrain", "--method", "transreid"])
    assert "invalid choice: 'transreid'" in capsys.readouterr().err


def test_help_of_pretrain_and_cfs(capsys):
    for command in ("pretrain", "cfs"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("--filter-list", "--keep-ratio", "--momentum-teacher", "(default: 0.996)", "(default: 65536)",
                   "--source-checkpoint", "--target-checkpoint", "the same command continues"):
        assert phrase in text, phrase
    # train keeps its own defaults (pretrain's parser is a copy).
    assert build_parser().parse_args(["train"]).method == "transmatcher"
    assert build_parser().parse_args(["pretrain"]).dataset == "images"


def _through_cli(monkeypatch, command, path) -> TrainConfig:
    import transmatcher_fast.cli as cli

    parser = build_parser()
    seen = {}
    parser.commands[command].set_defaults(run=lambda args: seen.update(vars(args)) or 0)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert main([command, "--config", str(path)]) == 0
    return TrainConfig.from_dict({k: v for k, v in seen.items() if k not in ("command", "run", "config", "debug")})


def test_shipped_dino_and_ssl_configs(monkeypatch):
    for name, (arch, stem) in {"dino_vit_small": ("vit_small_patch16", False),
                               "dino_vit_small_ics": ("vit_small_patch16", True),
                               "dino_vit_base_ics": ("vit_base_patch16", True)}.items():
        for command in ("pretrain", "train"):
            config = _through_cli(monkeypatch, command, CONFIGS / f"{name}.yaml")
            assert config == TrainConfig(method="dino", dataset="images", data_dir="LUP", workers=16, arch=arch,
                                         stem_conv=stem, exp_dir=f"runs/{command}"), (name, command)
    for name, (arch, stem, height) in {"transreid_ssl_vit_small": ("vit_small_patch16", False, 256),
                                       "transreid_ssl_vit_small_ics": ("vit_small_patch16", True, 256),
                                       "transreid_ssl_vit_base_ics_384": ("vit_base_patch16", True, 384)}.items():
        config = _through_cli(monkeypatch, "train", CONFIGS / f"{name}.yaml")
        assert config == TrainConfig(method="transreid", arch=arch, stem_conv=stem, height=height, lr=4e-4,
                                     warmup_epochs=20, schedule_offset=0, pretrain_hw_ratio=2, workers=8,
                                     test_batch=256, seed=1234), name
