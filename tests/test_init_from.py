"""``train --init-from``: a new run starts from a trained model's weights, with a fresh classifier
when the identity count differs; another architecture is refused naming its keys."""

from __future__ import annotations

import pytest
import torch

from helpers import one_line_error
from test_methods import COMMON, TINY, tiny_config
from transmatcher_fast.cli import main
from transmatcher_fast.data import generate_synthetic
from transmatcher_fast.engine.evaluate import load_trained
from transmatcher_fast.engine.trainer import Trainer

RUN = ("--epochs", "1", "--max-steps-per-epoch", "1")


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A tiny TransReID (JPM, 16 identities) and a tiny TransMatcher, one step each."""
    root = tmp_path_factory.mktemp("init_from")
    for kind in ("transreid", "transmatcher"):
        assert main(["train", *COMMON, *TINY[kind], "--data-dir", str(data_dir),
                     "--exp-dir", str(root / kind), *RUN]) == 0
    return {kind: root / kind / "checkpoint.pt" for kind in ("transreid", "transmatcher")}


@pytest.fixture(scope="module")
def fewer_ids(tmp_path_factory):
    """Another synthetic set, with 12 identities instead of 16."""
    root = tmp_path_factory.mktemp("fewer_ids")
    generate_synthetic(root, ids=12, cams=2, images_per_cam=4, seed=5, height=64, width=32)
    return root


def _built(kind, data_dir, exp_dir, *extra) -> Trainer:
    trainer = Trainer(tiny_config(kind, data_dir, exp_dir, *extra))
    trainer.run_folder.release()  # built only: fit() is not called
    return trainer


def test_a_new_run_takes_every_weight_and_a_fresh_classifier_for_other_identities(
        trained, fewer_ids, tmp_path, capsys):
    source, _, _ = load_trained(trained["transreid"])
    trainer = _built("transreid", fewer_ids, tmp_path / "run", "--init-from", str(trained["transreid"]))
    out = capsys.readouterr().out
    assert f"--init-from: the weights of {trained['transreid']}" in out
    assert "a new classifier for 6 identities (the checkpoint's has 8)" in out
    fresh = _built("transreid", fewer_ids, tmp_path / "fresh")  # the same seed, no --init-from
    own, theirs, untouched = (trainer.model.state_dict(), source.state_dict(), fresh.model.state_dict())
    classifier = {k for k in own if k.startswith("classifier")}
    assert classifier == {"classifier.weight", "classifier_1.weight", "classifier_2.weight"}  # --divide-length 2
    for key, value in own.items():
        if key in classifier:  # a new classifier: the fresh run's initialisation, 6 rows
            assert value.shape[0] == 6 and torch.equal(value, untouched[key]), key
        else:  # everything else (backbone, BNNeck statistics, JPM branches) from the checkpoint
            assert torch.equal(value, theirs[key]), key
    assert trainer.start_epoch == 0 and trainer.global_step == 0


def test_the_same_identities_take_the_classifier_too(trained, data_dir, tmp_path, capsys):
    source, _, _ = load_trained(trained["transreid"])
    trainer = _built("transreid", data_dir, tmp_path / "run", "--init-from", str(trained["transreid"]))
    assert "new classifier" not in capsys.readouterr().out
    for key, value in source.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[key], value), key


def test_another_architecture_is_refused_naming_the_keys(trained, data_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--init-from .*transreid.*the weights do not fit the model.*missing keys"):
        _built("transmatcher", data_dir, tmp_path / "a", "--init-from", str(trained["transreid"]))
    # The command line says it in one line (exit 1) and leaves no checkpoint behind.
    message = one_line_error(["train", *COMMON, *TINY["transmatcher"], "--data-dir", data_dir,
                              "--exp-dir", tmp_path / "b", *RUN, "--init-from", trained["transreid"]])
    assert f"--init-from {trained['transreid']} (model): the weights do not fit the model" in message
    assert "missing keys" in message and "base.conv1.weight" in message and "unexpected keys" in message
    assert not (tmp_path / "b" / "checkpoint.pt").exists()


def test_a_file_that_is_not_a_checkpoint_is_refused_before_the_data_is_read(data_dir, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    message = one_line_error(["train", *COMMON, *TINY["transmatcher"], "--data-dir", data_dir,
                              "--exp-dir", tmp_path / "run", *RUN, "--init-from", text])
    assert f"--init-from {text}: is a text file, not a checkpoint" in message
    assert "Loaded" not in capsys.readouterr().out and not (tmp_path / "run").exists()


def test_a_resumed_run_continues_from_its_own_checkpoint(trained, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", *COMMON, *TINY["transmatcher"], "--data-dir", str(data_dir), "--exp-dir", str(run),
            "--init-from", str(trained["transmatcher"])]
    assert main([*args, *RUN]) == 0
    assert "--init-from: the weights of" in capsys.readouterr().out
    own = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    trainer = _built("transmatcher", data_dir, run, "--init-from", str(trained["transmatcher"]), "--resume")
    trainer.resume()
    assert "--init-from" not in capsys.readouterr().out
    for key, value in own.items():
        assert torch.equal(trainer.model.state_dict()[key], value), key
