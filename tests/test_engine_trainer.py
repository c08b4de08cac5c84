"""The training loop: it learns, checkpoints resume exactly (also after a SIGKILL), torchrun works,
and the recipe's pieces (parameter groups, schedules, config files, atomic writes) are right."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import torchrun_two
from transmatcher_fast.cli import build_parser, main
from transmatcher_fast.engine import checkpoint
from transmatcher_fast.engine.trainer import Trainer, TrainConfig
from transmatcher_fast.methods.schedules import build_schedule

# A model small enough for a few CPU steps a second: 64x32 images -> 4x2 = 8 locations.
TINY = ["-d", "market", "-a", "resnet18", "--ibn", "none", "--neck", "16", "--num-trans-layers", "2",
        "--dim-feedforward", "32", "--height", "64", "--width", "32", "-b", "16", "--num-instances", "4",
        "-j", "0", "--no-freeze-bn", "--no-progress", "--no-tensorboard", "--log-every", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSMATCHER_FAST_BACKEND": "cpu"}
ENV.pop("TRITON_INTERPRET", None)


def tiny_config(data_dir, exp_dir, *extra) -> TrainConfig:
    args = build_parser().parse_args(["train", *TINY, "--data-dir", str(data_dir),
                                      "--exp-dir", str(exp_dir), *extra])
    values = {k: v for k, v in vars(args).items() if k not in ("command", "run", "config")}
    return TrainConfig.from_dict(values)


def records(exp_dir, kind):
    lines = (Path(exp_dir) / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_two_epochs_lower_the_loss_and_write_everything(data_dir, tmp_path):
    trainer = Trainer(tiny_config(data_dir, tmp_path, "--epochs", "2", "--lr", "0.01"))
    history = trainer.fit()
    assert [r["epoch"] for r in history] == [0, 1]
    # The graph sampler gives one batch per training identity (8), each of 16 images.
    assert history[0]["steps"] == 8
    assert history[1]["loss"] < history[0]["loss"]
    assert all(r["images_per_s"] > 0 for r in history)
    steps = records(tmp_path, "step")
    assert len(steps) == 16 and steps[-1]["step"] == 16
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 2 and state["global_step"] == 16
    assert set(state) >= {"model", "matcher", "optimizer", "scaler", "schedule", "sampler", "rng", "config"}
    assert not list(tmp_path.glob(".checkpoint.pt.*"))  # no temporary file left behind


def test_parameter_groups_follow_the_recipe(data_dir, tmp_path):
    trainer = Trainer(tiny_config(data_dir, tmp_path, "--lr", "0.02"))
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(0.002)
    assert groups["new"]["lr"] == groups["matcher"]["lr"] == 0.02
    assert all(g["nesterov"] and g["momentum"] == 0.9 and g["weight_decay"] == 5e-4 for g in groups.values())
    backbone = {id(p) for p in trainer.model.base.parameters()}
    assert {id(p) for p in groups["backbone"]["params"]} == backbone
    # The unused template decoder layer is not trained (it never gets a gradient).
    template = {id(p) for p in trainer.matcher.decoder_layer.parameters()}
    assert not template & {id(p) for g in groups.values() for p in g["params"]}


def test_frozen_batchnorm_keeps_running_statistics(data_dir, tmp_path):
    trainer = Trainer(tiny_config(data_dir, tmp_path, "--freeze-bn", "--epochs", "1",
                                  "--max-steps-per-epoch", "1"))
    before = trainer.model.base.bn1.running_mean.clone()
    trainer.fit()
    assert torch.equal(trainer.model.base.bn1.running_mean, before)
    assert not torch.equal(trainer.model.base.bn1.weight, torch.ones_like(before))  # affine trains


def test_resume_in_process_repeats_the_next_epoch_exactly(data_dir, tmp_path):
    full = Trainer(tiny_config(data_dir, tmp_path / "full", "--epochs", "2", "--max-steps-per-epoch", "3"))
    full.fit()
    first = Trainer(tiny_config(data_dir, tmp_path / "split", "--epochs", "1", "--max-steps-per-epoch", "3"))
    first.fit()
    resumed = Trainer(tiny_config(data_dir, tmp_path / "split", "--epochs", "2",
                                  "--max-steps-per-epoch", "3", "--resume"))
    resumed.fit()
    expected = [r["loss"] for r in records(tmp_path / "full", "step") if r["epoch"] == 1]
    assert [r["loss"] for r in records(tmp_path / "split", "step") if r["epoch"] == 1] == expected
    for a, b in zip(full.matcher.state_dict().values(), resumed.matcher.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_drops_a_partial_last_log_line(data_dir, tmp_path):
    """A kill or a full disk can cut the log's last record; resuming drops it and goes on."""
    Trainer(tiny_config(data_dir, tmp_path, "--epochs", "1", "--max-steps-per-epoch", "2")).fit()
    log = tmp_path / "log.jsonl"
    first_epoch = log.read_text()
    with open(log, "a") as file:  # epoch 2 had started: one whole record, then a cut one
        file.write(json.dumps({"kind": "step", "epoch": 1, "step": 3, "loss": 0.0}) + "\n")
        file.write('{"kind": "step", "epoch": 1, "st')
    Trainer(tiny_config(data_dir, tmp_path, "--epochs", "2", "--max-steps-per-epoch", "2",
                        "--resume")).fit()
    text = log.read_text()
    assert text.startswith(first_epoch) and text.endswith("\n")
    lines = [json.loads(line) for line in text.splitlines()]  # every line is whole again
    assert [r["epoch"] for r in lines if r["kind"] == "epoch"] == [0, 1]
    assert [r["step"] for r in lines if r["kind"] == "step"] == [1, 2, 3, 4]
    assert all(r["loss"] != 0.0 for r in lines if r["kind"] == "step")  # epoch 2's records are new


def test_train_refuses_to_replace_a_run_and_overwrite_starts_afresh(data_dir, tmp_path):
    quick = ["train", *TINY, "--data-dir", str(data_dir), "--exp-dir", str(tmp_path), "--epochs", "1",
             "--max-steps-per-epoch", "1"]
    assert main(quick) == 0
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.1.host.2.0").write_text("old")
    (tmp_path / "notes.txt").write_text("mine")
    with open(tmp_path / "log.jsonl", "a") as log:  # marks the old run's log
        log.write(json.dumps({"kind": "old"}) + "\n")
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "train.lock"}
    with pytest.raises(SystemExit) as info:
        main(quick)
    message = str(info.value.code)
    assert "\n" not in message and str(tmp_path) in message
    assert all(choice in message for choice in ("--resume", "--overwrite", "another --exp-dir"))
    after = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "train.lock"}
    assert after == before  # nothing was replaced or truncated
    assert main(quick + ["--overwrite"]) == 0
    assert [r["kind"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())] == \
        ["step", "epoch"]  # the new run's records only
    assert checkpoint.load(tmp_path / "checkpoint.pt")["global_step"] == 1
    assert not (tmp_path / "tensorboard").exists() and (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit):  # argparse: one or the other
        build_parser().parse_args(quick + ["--overwrite", "--resume"])
    with pytest.raises(ValueError, match="exclude each other"):
        TrainConfig(resume=True, overwrite=True)


def test_resume_without_a_checkpoint_never_mixes_logs_and_start_up_removes_stale_temporaries(
        data_dir, tmp_path):
    quick = ["train", *TINY, "--data-dir", str(data_dir), "--epochs", "1", "--max-steps-per-epoch", "1",
             "--resume"]
    killed = tmp_path / "killed"  # killed in its first epoch: a log, no checkpoint
    killed.mkdir()
    (killed / "log.jsonl").write_text(json.dumps({"kind": "step", "epoch": 0, "step": 1}) + "\n")
    with pytest.raises(SystemExit) as info:
        main(quick + ["--exp-dir", str(killed)])
    assert "no checkpoint.pt to resume from" in str(info.value.code) and "--overwrite" in str(info.value.code)
    assert len((killed / "log.jsonl").read_text().splitlines()) == 1  # not appended to
    fresh = tmp_path / "fresh"  # no run yet, but a killed save's temporary: starts from scratch
    fresh.mkdir()
    (fresh / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"torn")
    assert main(quick + ["--exp-dir", str(fresh)]) == 0
    assert not list(fresh.glob(".checkpoint.pt.*")) and not (fresh / ".log.jsonl.tmp").exists()
    assert [r["step"] for r in records(fresh, "step")] == [1]
    assert checkpoint.load(fresh / "checkpoint.pt")["epoch"] == 1


def _train_cli(data_dir, exp_dir, *extra):
    return [sys.executable, "-m", "transmatcher_fast.cli", "train", *TINY, "--data-dir", str(data_dir),
            "--exp-dir", str(exp_dir), "--epochs", "2", "--max-steps-per-epoch", "4", *extra]


def test_killed_run_resumes_with_the_uninterrupted_runs_losses(data_dir, tmp_path):
    """SIGKILL in the middle of epoch 2, resume: epoch 2 runs again and every step's loss equals
    the uninterrupted run's; only the killed epoch's progress was lost."""
    subprocess.run(_train_cli(data_dir, tmp_path / "full"), check=True, env=ENV, capture_output=True)
    killed = tmp_path / "killed"
    process = subprocess.Popen(_train_cli(data_dir, killed), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            log = killed / "log.jsonl"
            lines = log.read_text().split("\n")[:-1] if log.exists() else []  # complete lines only
            if any(r["kind"] == "step" and r["epoch"] == 1 for r in map(json.loads, lines)):
                break
            time.sleep(0.02)
        assert process.poll() is None, "the run ended before it could be killed mid-epoch"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert checkpoint.load(killed / "checkpoint.pt")["epoch"] == 1
    subprocess.run(_train_cli(data_dir, killed, "--resume"), check=True, env=ENV, capture_output=True)
    expected = [(r["step"], r["loss"]) for r in records(tmp_path / "full", "step")]
    assert [(r["step"], r["loss"]) for r in records(killed, "step")] == expected
    assert len(records(killed, "epoch")) == 2


def _wait_for_step(process, exp_dir, epoch=0, timeout=120):
    """Waits until the run logged a step of ``epoch`` (complete lines only)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        log = Path(exp_dir) / "log.jsonl"
        lines = log.read_text().split("\n")[:-1] if log.exists() else []
        if any(r["kind"] == "step" and r["epoch"] == epoch for r in map(json.loads, lines)):
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended or stalled before a step of epoch {epoch + 1} "
                         f"(exit status {process.poll()})")


def test_second_run_on_a_folder_fails_at_once_naming_the_holder(data_dir, tmp_path):
    """While a training holds EXP_DIR, another one there exits 1 with one line naming the
    holder's pid, before it builds anything, and leaves the folder as it was."""
    run = tmp_path / "run"
    holder = subprocess.Popen(_train_cli(data_dir, run, "--epochs", "100"), env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_step(holder, run)
        saving = run / ".checkpoint.pt.inflight.tmp"  # as if the holder were saving right now
        saving.write_text("")
        second = subprocess.run(_train_cli(data_dir, run, "--resume"), env=ENV, capture_output=True,
                                text=True, timeout=120)
        assert holder.poll() is None, "the holder ended before the second run tried"
        assert second.returncode == 1, second.stdout + second.stderr
        assert second.stdout == ""  # failed before it read the dataset
        assert second.stderr.count("\n") == 1, second.stderr
        assert f"pid {holder.pid}" in second.stderr and str(run) in second.stderr
        assert saving.exists()  # only the lock's holder removes temporaries
    finally:
        holder.kill()
        holder.wait()
    whole = (run / "log.jsonl").read_text().split("\n")[:-1]  # the kill may have cut the last one
    steps = [r["step"] for r in map(json.loads, whole) if r["kind"] == "step"]
    assert steps == list(range(1, len(steps) + 1))  # one run's records only


def test_torchrun_two_processes_train_in_sync(data_dir, tmp_path):
    out = tmp_path / "ddp.json"
    result = torchrun_two(Path(__file__).with_name("ddp_train_worker.py"), *TINY, "--data-dir", data_dir,
                          "--exp-dir", tmp_path / "run", "--epochs", "1", "--max-steps-per-epoch", "2", out,
                          env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["steps"] == 2
    rank0, rank1 = report["checksums"]
    assert rank0 == rank1  # DistributedDataParallel kept both replicas identical
    assert checkpoint.load(tmp_path / "run" / "checkpoint.pt")["world_size"] == 2


def test_torchrun_refusal_stops_every_rank_with_the_same_message(data_dir, tmp_path):
    """Rank 0 alone checks and locks EXP_DIR; when it refuses, every rank raises its message
    (none waits for a rank that is gone)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps({"kind": "step", "epoch": 0, "step": 1}) + "\n")
    result = torchrun_two(Path(__file__).with_name("ddp_train_worker.py"), *TINY, "--data-dir", data_dir,
                          "--exp-dir", run, "--epochs", "1", tmp_path / "out.json", env=ENV)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert output.count(f"RunDirError: {run} already holds a training run") == 2, output[-3000:]
    assert (run / "log.jsonl").read_text().count("\n") == 1 and not (run / "checkpoint.pt").exists()


def test_step_schedule():
    schedule = build_schedule(TrainConfig(epochs=15, step_size=10, gamma=0.1))
    assert [schedule.factor(e) for e in (0, 9, 10, 14)] == [1.0, 1.0, pytest.approx(0.1), pytest.approx(0.1)]
    assert schedule.end == 15


def test_adaptive_schedule_decays_once_and_sets_the_end():
    schedule = build_schedule(TrainConfig(schedule="adaptive", step_factor=0.7, max_epochs=60))
    for epoch, loss in enumerate([10.0, 8.0, 6.0, 5.0]):  # base = 8.0 (second epoch); 5.0 < 5.6
        schedule.after_epoch(epoch, loss)
    assert schedule.base_loss == 8.0 and schedule.decay_epoch == 4 and schedule.end == 6
    assert schedule.factor(3) == 1.0 and schedule.factor(4) == pytest.approx(0.1)
    schedule.after_epoch(4, 1.0)
    assert schedule.end == 6  # decays once
    restored = build_schedule(TrainConfig(schedule="adaptive"))
    restored.load_state_dict(schedule.state_dict())
    assert restored.state_dict() == schedule.state_dict()


def test_config_validation_names_the_option():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=30, num_instances=4)
    with pytest.raises(ValueError, match="sampler"):
        TrainConfig(sampler="uniform")
    with pytest.raises(ValueError, match="unknown training options.*bogus"):
        TrainConfig.from_dict({"bogus": 1})


def test_yaml_config_sets_defaults_and_flags_win(tmp_path, monkeypatch):
    config = tmp_path / "small.yaml"
    config.write_text("batch_size: 32\nnum-instances: 2\nlr: 0.001\narch: resnet18\n")
    seen = {}
    monkeypatch.setattr("transmatcher_fast.cli.run_train", lambda args: seen.update(vars(args)) or 0)
    parser = build_parser()
    parser.commands["train"].set_defaults(run=lambda args: seen.update(vars(args)) or 0)
    from transmatcher_fast import cli
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert main(["train", "--config", str(config), "--lr", "0.05"]) == 0
    assert seen["batch_size"] == 32 and seen["num_instances"] == 2 and seen["arch"] == "resnet18"
    assert seen["lr"] == 0.05
    config.write_text("bogus_option: 1\n")
    with pytest.raises(SystemExit, match="bogus_option"):
        main(["train", "--config", str(config)])


def test_train_help_lists_upstream_flags(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--dataset", "--data-dir", "--arch", "--ibn", "--final_layer", "--neck",
                 "--num_trans_layers", "--dim_feedforward", "--batch-size", "--num_instance", "--lr",
                 "--epochs", "--step_size", "--clip_value", "--amp", "--resume", "--config"):
        assert flag in text, flag


def test_atomic_save_keeps_the_old_checkpoint_when_writing_fails(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"epoch": 1, "w": torch.ones(3)}, path)
    with pytest.raises(Exception):
        checkpoint.save_atomic({"epoch": 2, "bad": lambda: None}, path)  # cannot be pickled
    assert checkpoint.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_rng_state_round_trip():
    import random

    import numpy as np
    state = checkpoint.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_missing_dataset_names_the_folder(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path / "nowhere")):
        Trainer(tiny_config(tmp_path / "nowhere", tmp_path / "run"))


# --- worker count, resume rules, evaluation during training, provenance, configs ----------------
def test_step_losses_do_not_depend_on_the_worker_count(data_dir, tmp_path):
    """Every sample's augmentation derives from (seed, rank, epoch, position, index) in whichever
    process loads it: -j 0 and -j 2 train alike, so a resume may change -j."""
    losses = {}
    for workers in ("0", "2"):
        exp = tmp_path / f"j{workers}"
        Trainer(tiny_config(data_dir, exp, "-j", workers, "--epochs", "1",
                            "--max-steps-per-epoch", "3")).fit()
        losses[workers] = [r["loss"] for r in records(exp, "step")]
    assert len(losses["0"]) == 3 and losses["0"] == losses["2"]


def test_resume_applies_and_logs_the_options_that_may_change(data_dir, tmp_path):
    """--resume with more epochs, other workers and logging: applied, a "resume" record lists
    them, the checkpoint keeps the list, and config.yaml stays the start's."""
    Trainer(tiny_config(data_dir, tmp_path, "--epochs", "1", "--max-steps-per-epoch", "2")).fit()
    config_yaml = (tmp_path / "config.yaml").read_text()
    resumed = Trainer(tiny_config(data_dir, tmp_path, "--epochs", "2", "--max-steps-per-epoch", "4",
                                  "--log-every", "2", "-j", "1", "--resume"))
    resumed.fit()
    [record] = records(tmp_path, "resume")
    assert record["epoch"] == 1 and record["step"] == 2
    assert record["changed"] == {"epochs": [1, 2], "log_every": [1, 2], "workers": [0, 1],
                                 "max_steps_per_epoch": [2, 4]}
    # Epoch 2: 4 steps, its first and every second one logged.
    assert [r["step"] for r in records(tmp_path, "step")] == [1, 2, 3, 4, 6]
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 2 and state["config"]["epochs"] == 2
    assert state["config_changes"] == [{"epoch": 1, "changed": record["changed"]}]
    assert (tmp_path / "config.yaml").read_text() == config_yaml  # kept: the changes are logged


def test_resume_refuses_other_changed_options_naming_them(data_dir, tmp_path):
    from transmatcher_fast.engine.trainer import ResumeConfigError
    from transmatcher_fast.engine.rundir import RunDirError

    Trainer(tiny_config(data_dir, tmp_path, "--epochs", "1", "--max-steps-per-epoch", "1")).fit()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != "train.lock"}
    with pytest.raises(ResumeConfigError) as info:
        Trainer(tiny_config(data_dir, tmp_path, "--epochs", "2", "--lr", "0.1", "-b", "8",
                            "--resume"))
    message = str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RunDirError)
    assert "\n" not in message and str(tmp_path) in message
    assert "lr (checkpoint 0.005, given 0.1)" in message and "batch-size (checkpoint 16, given 8)" in message
    assert "epochs (" not in message  # may change: not a reason to refuse
    # The CLI: one line, nothing written, the lock released (the same resume with the
    # checkpoint's options then goes on).
    quick = ["train", *TINY, "--data-dir", str(data_dir), "--exp-dir", str(tmp_path),
             "--max-steps-per-epoch", "1", "--resume"]
    with pytest.raises(SystemExit) as exit_info:
        main(quick + ["--epochs", "2", "--lr", "0.1"])
    assert "\n" not in str(exit_info.value.code) and "lr (checkpoint 0.005, given 0.1)" in str(exit_info.value.code)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != "train.lock"}
    assert after == before
    assert main(quick + ["--epochs", "2"]) == 0
    assert checkpoint.load(tmp_path / "checkpoint.pt")["epoch"] == 2


def test_resume_check_treats_missing_options_as_defaults_and_ignores_start_options():
    from transmatcher_fast.engine.trainer import ResumeConfigError, check_resume

    saved = TrainConfig(epochs=3).__dict__.copy()
    del saved["eval_every"]  # a checkpoint of an older version
    assert check_resume(saved, TrainConfig(epochs=3, resume=True)) == {}
    assert check_resume(saved, TrainConfig(epochs=5, eval_every=1, resume=True)) == {
        "epochs": [3, 5], "eval_every": [0, 1]}
    with pytest.raises(ResumeConfigError, match=r"seed \(checkpoint 0, given 1\)"):
        check_resume(saved, TrainConfig(epochs=3, seed=1, resume=True))


def test_eval_every_logs_metrics_keeps_best_and_leaves_training_alone(data_dir, tmp_path):
    """--eval-every 1: an "eval" record per epoch (rank-1, mAP, provenance) in log.jsonl and
    TensorBoard, best.pt (loadable for evaluation) beside checkpoint.pt; the step losses equal a
    run without evaluation; a resume keeps the best so far."""
    from transmatcher_fast.engine.evaluate import load_trained

    plain = tmp_path / "plain"
    Trainer(tiny_config(data_dir, plain, "--epochs", "2", "--max-steps-per-epoch", "2")).fit()
    run = tmp_path / "eval"
    Trainer(tiny_config(data_dir, run, "--epochs", "1", "--max-steps-per-epoch", "2",
                        "--eval-every", "1", "--tensorboard")).fit()
    [first] = records(run, "eval")
    assert first["epoch"] == 0 and 0 <= first["rank1"] <= 1 and 0 <= first["mAP"] <= 1
    assert first["is_best"] and first["best_mAP"] == first["mAP"] and first["best_epoch"] == 0
    provenance = first["provenance"]
    assert provenance["version"] == __import__("transmatcher_fast").__version__
    assert provenance["dataset"] == "market" and provenance["protocol"] == "market"
    assert provenance["model"]["arch"] == "resnet18" and provenance["epochs_done"] == 1
    assert provenance["checkpoint"].endswith("checkpoint.pt") and provenance["date"]
    best = checkpoint.load(run / "best.pt")
    assert best["epoch"] == 1 and best["metrics"]["mAP"] == first["mAP"]
    model, matcher, config = load_trained(run / "best.pt")
    assert config["neck"] == 16
    assert checkpoint.load(run / "checkpoint.pt")["best"] == {"epoch": 0, "mAP": first["mAP"],
                                                              "rank1": first["rank1"]}
    assert not list(run.glob(".best.pt.*"))
    # TensorBoard has the eval scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"eval/mAP", "eval/rank1"} <= set(events.Tags()["scalars"])
    # Resume for a second epoch: the best so far is kept and compared against.
    resumed = Trainer(tiny_config(data_dir, run, "--epochs", "2", "--max-steps-per-epoch", "2",
                                  "--eval-every", "1", "--tensorboard", "--resume"))
    resumed.fit()
    evals = records(run, "eval")
    assert [r["epoch"] for r in evals] == [0, 1]
    assert evals[1]["best_mAP"] == max(first["mAP"], evals[1]["mAP"])
    assert evals[1]["best_epoch"] == (1 if evals[1]["mAP"] > first["mAP"] else 0)
    assert checkpoint.load(run / "best.pt")["epoch"] == evals[1]["best_epoch"] + 1
    # Evaluation draws nothing from the training's random streams.
    assert [r["loss"] for r in records(run, "step")] == [r["loss"] for r in records(plain, "step")]


def test_config_yaml_records_the_run_and_reads_back_through_config(data_dir, tmp_path, monkeypatch):
    import yaml

    from transmatcher_fast import cli
    config = tiny_config(data_dir, tmp_path / "run", "--epochs", "1", "--max-steps-per-epoch", "1",
                         "--lr", "0.03", "--eval-every", "0")
    Trainer(config).fit()
    path = tmp_path / "run" / "config.yaml"
    values = yaml.safe_load(path.read_text())
    assert "resume" not in values and "overwrite" not in values
    assert values["lr"] == 0.03 and values["neck"] == 16 and values["ibn"] is None
    assert not list((tmp_path / "run").glob(".config.yaml*"))
    assert _config_through_cli(monkeypatch, cli, path) == config  # the same TrainConfig
    # config.yaml is one of the run's files: a folder with only it (a run killed before its first
    # record) is not taken over by a fresh start.
    from transmatcher_fast.engine.rundir import RunDirError
    (tmp_path / "run" / "checkpoint.pt").unlink()
    (tmp_path / "run" / "log.jsonl").unlink()
    with pytest.raises(RunDirError, match=r"already holds a training run \(config.yaml\)"):
        Trainer(tiny_config(data_dir, tmp_path / "run"))
    # --resume there repeats the start that was killed (one command starts and restarts a job).
    again = Trainer(tiny_config(data_dir, tmp_path / "run", "--epochs", "1", "--max-steps-per-epoch",
                                "1", "--lr", "0.04", "--resume"))
    again.fit()
    assert yaml.safe_load(path.read_text())["lr"] == 0.04
    assert checkpoint.load(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1


def _config_through_cli(monkeypatch, cli, path, *extra) -> TrainConfig:
    """``transmatcher-fast train --config PATH`` parsed as the CLI does, up to the TrainConfig."""
    parser = build_parser()
    seen = {}
    parser.commands["train"].set_defaults(run=lambda args: seen.update(vars(args)) or 0)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert main(["train", "--config", str(path), *extra]) == 0
    return TrainConfig.from_dict({k: v for k, v in seen.items() if k not in ("command", "run", "config", "debug")})


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_configs_parse_into_train_configs(monkeypatch):
    from transmatcher_fast import cli
    from transmatcher_fast.engine.demo import DemoConfig
    assert {p.name for p in CONFIGS.glob("*.yaml")} >= {"transmatcher.yaml", "qaconv.yaml",
                                                         "qaconv20.yaml", "cpu_small.yaml"}
    for path in sorted(CONFIGS.glob("*.yaml")):
        config = _config_through_cli(monkeypatch, cli, path)
        assert isinstance(config, TrainConfig), path
    tm = _config_through_cli(monkeypatch, cli, CONFIGS / "transmatcher.yaml")
    assert tm == TrainConfig(neck=512)  # upstream's defaults are TrainConfig's
    qa = _config_through_cli(monkeypatch, cli, CONFIGS / "qaconv.yaml")
    assert (qa.method, qa.neck, qa.num_instances, qa.loss, qa.margin, qa.clip_value, qa.schedule,
            qa.step_factor, qa.max_epochs, qa.lr) == ("qaconv", 128, 2, "triplet", 16.0, 8.0,
                                                      "adaptive", 0.7, 60, 0.005)
    qa20 = _config_through_cli(monkeypatch, cli, CONFIGS / "qaconv20.yaml")
    assert (qa20.neck, qa20.lr, qa20.loss, qa20.epochs, qa20.step_size) == (64, 0.001, "pairwise", 15, 10)
    small = _config_through_cli(monkeypatch, cli, CONFIGS / "cpu_small.yaml", "--epochs", "2")
    demo = DemoConfig()
    assert small.epochs == 2  # flags win over the file
    assert (small.arch, small.ibn, small.height, small.width) == ("resnet18", None, demo.height, demo.width)
    for name in ("neck", "num_trans_layers", "dim_feedforward", "batch_size", "num_instances", "lr",
                 "backbone_lr_factor", "step_size", "workers"):
        assert getattr(small, name) == getattr(demo, name), name
    assert small.freeze_bn is False
