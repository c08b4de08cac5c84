"""The command line as a user meets it: errors in one or two lines (a traceback only with
--debug), input checked before the long work, Ctrl-C, help, version and ``python -m``.

Every command runs in a subprocess (the console script or ``python -m transmatcher_fast``) on a
tiny synthetic dataset and a tiny checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from transmatcher_fast import cli
from transmatcher_fast.data import generate_synthetic

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSMATCHER_FAST_BACKEND": "cpu", "CUDA_VISIBLE_DEVICES": ""}
ENV.pop("TRITON_INTERPRET", None)
EXE = shutil.which("transmatcher-fast")
# 64x32 images -> 4x2 = 8 locations; resnet18 with a 16-channel neck: a few CPU steps a second.
TINY = ["-d", "market1501", "-a", "resnet18", "--ibn", "none", "--neck", "16", "--num-trans-layers", "2",
        "--dim-feedforward", "32", "--height", "64", "--width", "32", "-b", "8", "--num-instances", "4",
        "-j", "0", "--no-freeze-bn", "--no-progress", "--no-tensorboard", "--log-every", "1"]


def command(*args, module=False):
    if module or EXE is None:
        return [sys.executable, "-m", "transmatcher_fast", *map(str, args)]
    return [EXE, *map(str, args)]


def run(*args, module=False, timeout=120):
    return subprocess.run(command(*args, module=module), env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def run_many(commands, timeout=180):
    """Runs argument lists concurrently; their CompletedProcess-like results in order."""
    started = [subprocess.Popen(command(*args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for args in commands]
    results = []
    for args, process in zip(commands, started):
        out, err = process.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(args, process.returncode, out, err))
    return results


def assert_short_error(result, *needles, status=1):
    text = result.stdout + result.stderr
    assert result.returncode == status if status is not None else result.returncode != 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    lines = result.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2, result.stderr
    for needle in needles:
        assert str(needle) in result.stderr, (needle, result.stderr)


@pytest.fixture(scope="module")
def data_dir(market_root):
    return market_root


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A checkpoint of one training step (in process: no subprocess start-up)."""
    exp = tmp_path_factory.mktemp("run")
    assert cli.main(["train", *TINY, "--data-dir", str(data_dir), "--exp-dir", str(exp), "--epochs", "1",
                     "--max-steps-per-epoch", "1", "--overwrite"]) == 0
    return exp / "checkpoint.pt"


def eval_args(data_dir, checkpoint, *extra):
    return [str(a) for a in ("eval", "--checkpoint", checkpoint, "--data-dir", data_dir, "-j", "0",
                             "--no-progress", *extra)]


# --- item 7: one or two lines, the traceback only with --debug --------------------------------
def test_bad_input_errors_are_one_or_two_lines(data_dir, trained, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(trained.read_bytes()[:4096])
    empty = tmp_path / "empty" / "market1501"
    shutil.copytree(data_dir / "market1501", empty)
    for image in (empty / "query").iterdir():
        image.unlink()
    exp_file = tmp_path / "exp-file"
    exp_file.write_text("not a folder")
    train = ["train", *TINY, "--data-dir", data_dir, "--epochs", "1", "--max-steps-per-epoch", "1"]
    cases = {
        "missing data dir (train)": (["train", *TINY, "--data-dir", tmp_path / "nowhere",
                                      "--exp-dir", tmp_path / "r1"], [tmp_path / "nowhere", "--data-dir", "synth"]),
        "missing data dir (eval)": (eval_args(tmp_path / "nowhere", trained), [tmp_path / "nowhere", "--data-dir"]),
        "missing checkpoint": (eval_args(data_dir, tmp_path / "missing.pt"), ["--checkpoint", "missing.pt", "no such file"]),
        "truncated checkpoint": (eval_args(data_dir, truncated), ["--checkpoint", "truncated.pt", "truncated"]),
        "empty query set": (eval_args(empty.parent, trained), ["query", "no images", str(empty)]),
        "cuda without CUDA (eval)": (eval_args(data_dir, trained, "--device", "cuda"), ["--device cuda", "CUDA", "--device cpu"]),
        "cuda without CUDA (train)": ([*train, "--exp-dir", tmp_path / "r2", "--device", "cuda"], ["--device cuda", "--device cpu"]),
        "file-shaped exp-dir": ([*train, "--exp-dir", exp_file], ["--exp-dir", str(exp_file), "not a folder"]),
        "bad -j (train)": ([*train, "--exp-dir", tmp_path / "r3", "-j", "-1"], ["-j/--workers", "-1", "0"], 2),
        "bad -j (eval)": (eval_args(data_dir, trained, "-j", "-2"), ["-j/--workers", "-2", "0"], 2),
        "cuda without CUDA (op-demo)": (["op-demo", "--device", "cuda"], ["--device cuda"]),
        "no --checkpoint nor --log": (["visualize", "--out", tmp_path / "pics"], ["--checkpoint", "--log"]),
    }
    results = run_many([args for args, *_ in cases.values()])
    for (name, (args, needles, *status)), result in zip(cases.items(), results):
        print(name, "->", result.stderr.strip())
        assert_short_error(result, "transmatcher-fast", *needles, status=status[0] if status else 1)
    assert not (tmp_path / "pics").exists()  # checked before anything was written


def test_unknown_dataset_is_a_usage_error(data_dir, trained):
    result = run(*eval_args(data_dir, trained, "-d", "nosuchset"))
    assert_short_error(result, "transmatcher-fast eval", "nosuchset", "market1501", "--help", status=2)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_exp_dir(data_dir, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        result = run("train", *TINY, "--data-dir", data_dir, "--exp-dir", folder / "run", "--epochs", "1")
    finally:
        folder.chmod(0o755)
    assert_short_error(result, "--exp-dir", "cannot write")


def test_read_only_exp_dir_is_refused_before_training(data_dir, tmp_path, monkeypatch):
    """As root (a read-only folder is writable to root) the check is shown with a failing probe."""
    from transmatcher_fast.engine import validate

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(validate.tempfile, "TemporaryFile", refuse)
    with pytest.raises(SystemExit) as info:
        cli.main(["train", *TINY, "--data-dir", str(data_dir), "--exp-dir", str(tmp_path / "run")])
    message = str(info.value.code)
    assert message.startswith("transmatcher-fast train: --exp-dir") and "Permission denied" in message
    assert "\n" not in message and not (tmp_path / "run").exists()


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("something broke\nsecond line")

    parser = cli.build_parser()
    parser.commands["op-demo"].set_defaults(run=boom)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    with pytest.raises(SystemExit) as info:
        cli.main(["op-demo"])
    message = str(info.value.code)
    assert message.splitlines() == ["transmatcher-fast op-demo: unexpected RuntimeError: something broke",
                                    "run with --debug for the traceback"]
    for argv in (["--debug", "op-demo"], ["op-demo", "--debug"]):
        with pytest.raises(RuntimeError, match="something broke"):
            cli.main(argv)


def test_debug_prints_the_traceback(data_dir, tmp_path):
    result = run("--debug", *eval_args(data_dir, tmp_path / "missing.pt"))
    assert result.returncode != 0 and "Traceback" in result.stderr and "missing.pt" in result.stderr


# --- item 10: Ctrl-C ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def larger_data_dir(tmp_path_factory):
    """Enough identities for several steps per epoch and a slow enough evaluation to interrupt."""
    root = tmp_path_factory.mktemp("cli-larger") / "data"
    generate_synthetic(root / "market1501", ids=40, cams=2, images_per_cam=4, seed=2, height=64, width=32)
    return root


def _wait_for(predicate, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"the process ended or stalled first (exit status {process.poll()})")


def _log_records(exp_dir):
    log = Path(exp_dir) / "log.jsonl"
    lines = log.read_text().split("\n")[:-1] if log.exists() else []  # complete lines only
    return [json.loads(line) for line in lines]


def _interrupt(process):
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


def test_ctrl_c_during_training_names_the_last_checkpoint(larger_data_dir, tmp_path):
    exp = tmp_path / "run"
    process = subprocess.Popen(command("train", *TINY, "--data-dir", larger_data_dir, "--exp-dir", exp,
                                       "--epochs", "100", "--max-steps-per-epoch", "2"),
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # a complete checkpoint exists once the first epoch record is logged and a step of epoch 2 ran
        _wait_for(lambda: any(r["kind"] == "step" and r["epoch"] >= 1 for r in _log_records(exp)), process)
        status, out, err = _interrupt(process)
    finally:
        process.kill()
        process.wait()
    assert status == 130, err[-3000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    epoch = torch.load(exp / "checkpoint.pt", weights_only=True)["epoch"]
    assert f"interrupted; last complete checkpoint: {exp / 'checkpoint.pt'} (epoch {epoch}); " \
           "continue with --resume" in err
    assert epoch >= 1
    # the lock was released: --resume there starts at once (and has nothing left to train)
    resumed = subprocess.run(command("train", *TINY, "--data-dir", larger_data_dir, "--exp-dir", exp,
                                     "--epochs", str(epoch), "--max-steps-per-epoch", "2", "--resume"),
                             env=ENV, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0 and f"{epoch} epochs done" in resumed.stdout, resumed.stderr[-2000:]


def test_ctrl_c_before_the_first_checkpoint(larger_data_dir, tmp_path):
    exp = tmp_path / "run"
    process = subprocess.Popen(command("train", *TINY, "--data-dir", larger_data_dir, "--exp-dir", exp,
                                       "--epochs", "1", "-b", "4", "--num-instances", "2"),
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: any(r["kind"] == "step" for r in _log_records(exp)), process)
        status, out, err = _interrupt(process)
    finally:
        process.kill()
        process.wait()
    assert status == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip() == "transmatcher-fast train: interrupted; no checkpoint written yet"
    assert not (exp / "checkpoint.pt").exists()


def test_ctrl_c_during_evaluation_exits_130(larger_data_dir, trained):
    env = {**ENV, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command(*eval_args(larger_data_dir, trained, "-b", "1")), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "Loaded Market1501" in process.stdout.readline()  # the dataset summary: extraction next
        status, out, err = _interrupt(process)
    finally:
        process.kill()
        process.wait()
    assert status == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip() == "transmatcher-fast eval: interrupted"


@pytest.mark.parametrize("name", ["extract", "visualize"])
def test_ctrl_c_in_other_commands_exits_130(name, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    parser = cli.build_parser()
    parser.commands[name].set_defaults(run=interrupted)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    with pytest.raises(SystemExit) as info:
        cli.main([name, "--checkpoint", "x.pt", "--out", "y"])
    assert info.value.code == 130
    assert capsys.readouterr().err == f"transmatcher-fast {name}: interrupted\n"


# --- item 16: help, version, python -m, ranks, notes ------------------------------------------
COMMANDS = ["demo", "op-demo", "synth", "train", "eval", "extract", "visualize"]


def test_help_shows_every_default_once_the_choices_and_plain_text():
    results = run_many([["--help"]] + [[name, "--help"] for name in COMMANDS])
    parser = cli.build_parser()
    for name, result in zip(["(top)"] + COMMANDS, results):
        assert result.returncode == 0, result.stderr
        text = result.stdout
        flat = " ".join(text.split())
        assert "``" not in text and ":class:" not in text, name
        assert "(default: None)" not in flat, name
        if name == "(top)":
            assert "--version" in text and "--debug" in text
            continue
        for action in parser.commands[name]._actions:
            if not action.option_strings or action.default is argparse.SUPPRESS or action.required:
                continue
            # the help entry of the option: from its first flag to the next entry
            start = text.index("  " + action.option_strings[0])
            entry = re.split(r"\n  -", text[start + 3:], maxsplit=1)[0]
            assert re.search(r"default", entry, re.IGNORECASE), (name, action.dest, entry)
            assert len(re.findall(r"\(default", entry)) <= 1, (name, action.dest, entry)  # never doubled
            if action.choices is not None:
                assert "{" + ",".join(map(str, action.choices)) + "}" in entry, (name, action.dest, entry)
    train = " ".join(results[COMMANDS.index("train") + 1].stdout.split())
    assert "qaconv/transmatcher True" in train and "--sampler {graph,pk,pk_all" in train
    assert "(default: --jpm)" not in train and "(default: --no-jpm)" in train
    assert "neck channels = d_model (default 512 TransMatcher, 128 QAConv)" in train


def test_version_and_python_dash_m():
    import transmatcher_fast

    script, module = run("--version"), run("--version", module=True)
    assert script.returncode == module.returncode == 0
    assert script.stdout.strip() == module.stdout.strip() == f"transmatcher-fast {transmatcher_fast.__version__}"
    usage = run(module=True)  # no command: a usage error, not a traceback
    assert usage.returncode == 2 and "Traceback" not in usage.stderr and "command" in usage.stderr


def test_eval_ranks_and_the_notes_on_skipped_queries_and_top_k(data_dir, trained, tmp_path):
    # one query whose identity has no gallery image from another camera: it is skipped
    root = tmp_path / "data"
    shutil.copytree(data_dir / "market1501", root / "market1501")
    first = sorted((root / "market1501" / "query").iterdir())[0]
    shutil.copy(first, first.with_name("0999" + first.name[4:]))
    full, top = run_many([eval_args(root, trained, "--ranks", "1", "5", "10"),
                          eval_args(root, trained, "--topk", "3", "--ranks", "1", "3", "5", "--out",
                                    tmp_path / "top.json")])
    assert full.returncode == 0 and top.returncode == 0, full.stderr + top.stderr
    header = [line for line in full.stdout.splitlines() if line.startswith("| model |")]
    assert header == ["| model | Rank-1 | Rank-5 | Rank-10 | mAP | mINP |"]
    queries = len(list((root / "market1501" / "query").iterdir()))
    assert f"note: 1 of {queries} queries were skipped" in full.stdout
    assert "top-k" not in full.stdout
    assert "| model | Rank-1 | Rank-3 | Rank-5 | mAP (AP@3) | mINP |" in top.stdout
    row = [line for line in top.stdout.splitlines() if line.startswith("| market1501 |")][0]
    assert row.split("|")[4].strip() == "n/a"  # rank 5 > k = 3
    assert "note: top-k mode (--topk 3): mAP is AP@3" in top.stdout
    assert json.loads((tmp_path / "top.json").read_text())["topk"] == 3
    bad = run(*eval_args(root, trained, "--ranks", "0"))
    assert_short_error(bad, "--ranks", status=2)


# --- item 9: validated before the work ---------------------------------------------------------
def test_fixed_sets_are_argparse_choices(data_dir, trained, tmp_path):
    train = ["train", *TINY, "--data-dir", data_dir, "--exp-dir", tmp_path / "run"]
    cases = [(train + ["--arch", "resnet9"], "-a/--arch", "resnet50"),
             (train + ["--ibn", "a"], "--ibn", "'none'"),
             (train + ["--final-layer", "layer5"], "--final-layer", "layer3"),
             (train + ["--amp", "fp8"], "--amp", "bf16"),
             (train + ["--dataset", "nosuchset"], "-d/--dataset", "market1501"),
             (eval_args(data_dir, trained, "--amp", "fp8"), "--amp", "auto"),
             (eval_args(data_dir, trained, "--dataset", "nosuchset"), "-d/--dataset", "market1501"),
             (["extract", "--checkpoint", trained, "--out", tmp_path / "f.pt", "-d", "x"], "-d/--dataset", "duke")]
    for (args, flag, choice), result in zip(cases, run_many([args for args, *_ in cases])):
        assert_short_error(result, flag, "invalid choice", choice, status=2)
    assert not (tmp_path / "run").exists()
    parser = cli.build_parser()
    assert parser.parse_args(["train", "--ibn", "none"]).ibn is None  # none still means None
    assert parser.parse_args(["eval", "--checkpoint", "c", "--amp", "none"]).amp == "none"


def test_output_paths_are_checked_before_extraction(data_dir, trained, tmp_path):
    missing = tmp_path / "no-such-folder"
    results = run_many([eval_args(data_dir, trained, "--out", missing / "m.json"),
                        ["extract", "--checkpoint", trained, "--data-dir", data_dir, "-j", "0",
                         "--out", missing / "f.pt"],
                        ["extract", "--checkpoint", trained, "--data-dir", data_dir, "-j", "0",
                         "--out", tmp_path]])
    for result in results[:2]:
        assert_short_error(result, "--out", str(missing), "does not exist")
        assert result.stdout == ""  # nothing loaded, nothing extracted
    assert_short_error(results[2], "--out", "is a folder")


def test_read_only_output_folder_is_refused_before_extraction(data_dir, trained, tmp_path, monkeypatch):
    from transmatcher_fast.engine import evaluate, validate

    def refuse(*args, **kwargs):  # as a read-only folder does (root writes anyway)
        raise PermissionError(13, "Permission denied")

    def never(*args, **kwargs):
        raise AssertionError("extraction started")

    monkeypatch.setattr(validate.tempfile, "TemporaryFile", refuse)
    monkeypatch.setattr(evaluate, "extract", never)
    monkeypatch.setattr(evaluate, "evaluate", never)
    for name in ("eval", "extract"):
        with pytest.raises(SystemExit) as info:
            cli.main([name, "--checkpoint", str(trained), "--data-dir", str(data_dir), "-j", "0",
                      "--out", str(tmp_path / "out.x")])
        assert str(info.value.code) == (f"transmatcher-fast {name}: --out {tmp_path / 'out.x'}: cannot "
                                        f"write in {tmp_path} (Permission denied); choose a writable folder")


def test_topk_above_the_gallery_is_clamped_with_a_note(data_dir, trained, tmp_path):
    result = run(*eval_args(data_dir, trained, "--topk", "1000", "--out", tmp_path / "m.json"))
    assert result.returncode == 0, result.stderr
    gallery = len(list((data_dir / "market1501" / "bounding_box_test").iterdir()))
    assert f"note: --topk 1000 is above the gallery size ({gallery}): using {gallery}" in result.stderr
    assert json.loads((tmp_path / "m.json").read_text())["topk"] == gallery
    both = run(*eval_args(data_dir, trained, "--topk", "3", "--rerank"))
    assert_short_error(both, "--rerank", "--topk")


def test_input_size_is_checked_against_the_checkpoint_before_the_data(data_dir, trained, tmp_path):
    result = run(*eval_args(data_dir, trained, "--height", "128", "--width", "32"))
    assert_short_error(result, "--height 128 --width 32", "8x2", "seq_len 8", "64x32")
    assert result.stdout == ""  # before the dataset summary
    assert run(*eval_args(data_dir, trained, "--height", "64", "--width", "32")).returncode == 0


def test_input_size_of_upstream_checkpoints_uses_score_embed():
    from transmatcher_fast.engine.validate import UserError, check_input_size

    upstream = {"model": {}, "criterion": {"module.matcher.decoder.layers.0.score_embed": torch.zeros(1, 1, 192, 192)}}
    check_input_size(upstream, 384, 128, "up.pth.tar")
    check_input_size(upstream, None, None, "up.pth.tar")
    with pytest.raises(UserError, match=r"--height 256 --width 128 give a 16x8 = 128-location .* seq_len 192"):
        check_input_size(upstream, 256, None, "up.pth.tar")
    qaconv = {"model": {}, "criterion": {"matcher.fc.weight": torch.zeros(1, 128), "matcher.logit_bn.weight": torch.ones(1)}}
    check_input_size(qaconv, 256, 128, "q.pth.tar")
    with pytest.raises(UserError, match="seq_len 128"):
        check_input_size(qaconv, 384, 128, "q.pth.tar")


def test_yaml_values_are_typed_like_their_flags(tmp_path, monkeypatch):
    seen = {}
    parser = cli.build_parser()
    parser.commands["train"].set_defaults(run=lambda args: seen.update(vars(args)) or 0)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    config = tmp_path / "c.yaml"

    def load(text, *flags):
        config.write_text(text)
        seen.clear()
        assert cli.main(["train", "--config", str(config), *flags]) == 0
        return seen

    assert load('freeze_bn: "no"\n')["freeze_bn"] is False  # a string "no" is false, not truthy
    assert load("freeze_bn: no\nprogress: 'Yes'\ntensorboard: 0\n")["progress"] is True
    assert load("freeze_bn: 'true'\n")["freeze_bn"] is True
    assert load("freeze_bn: 'no'\n", "--freeze-bn")["freeze_bn"] is True  # the flag still wins
    typed = load("lr: 1e-3\nibn: null\nneck: 16\narch: resnet18\nresume: 'yes'\n")
    assert typed["lr"] == 0.001 and typed["ibn"] is None and typed["neck"] == 16 and typed["resume"] is True
    assert load("ibn: none\n")["ibn"] is None
    for text, needles in (("freeze_bn: maybe\n", ["freeze_bn", "boolean", "'maybe'"]),
                          ("freeze_bn: 2\n", ["freeze_bn", "boolean"]),
                          ("arch: resnet9\n", ["arch", "invalid choice", "resnet50"]),
                          ("epochs: 2.5\n", ["epochs", "2.5"]),
                          ("batch_size: 0\n", ["batch_size", "at least 1"]),
                          ("lr: [1, 2]\n", ["lr"]),
                          ("lr: fast\n", ["lr", "'fast'"]),
                          ("amp: true\n", ["amp"])):
        config.write_text(text)
        with pytest.raises(SystemExit) as info:
            cli.main(["train", "--config", str(config)])
        message = str(info.value.code)
        assert message.startswith(f"transmatcher-fast train: --config {config}: ") and "\n" not in message, message
        assert all(n in message for n in needles), message
    config.write_text("lr: [unclosed\n")
    with pytest.raises(SystemExit, match="not valid YAML"):
        cli.main(["train", "--config", str(config)])


# --- exports, feature files, several test sets, bad images (item 8, 14) ----------------------
def test_eval_exports_matrix_ranked_results_and_provenance(data_dir, trained, tmp_path):
    out, matrix, ranked = tmp_path / "results.json", tmp_path / "dist.npz", tmp_path / "ranked.csv"
    assert cli.main(eval_args(data_dir, trained, "--out", out, "--save-matrix", matrix,
                              "--save-ranked", ranked, "--ranked-topk", "3")) == 0
    results = json.loads(out.read_text())
    provenance = results["provenance"]
    assert provenance["version"] and provenance["checkpoint"] == str(trained.resolve())
    assert provenance["dataset"]["query"] and provenance["model"]["height"] == 64
    arrays = tmp_path / "dist.npz"
    import numpy as np

    with np.load(arrays) as npz:
        assert npz["distance"].shape[0] == provenance["dataset"]["query"]["images"]
    lines = ranked.read_text().splitlines()
    assert lines[0].startswith("query_path") and len(lines) > 1


def test_eval_from_extracted_features_equals_eval_from_images(data_dir, trained, tmp_path):
    files = {}
    for split in ("query", "gallery"):
        files[split] = tmp_path / f"{split}.pt"
        assert cli.main([str(a) for a in ("extract", "--checkpoint", trained, "--data-dir", data_dir,
                                          "-j", "0", "--no-progress", "--split", split,
                                          "--out", files[split])]) == 0
    from_images, from_features = tmp_path / "images.json", tmp_path / "features.json"
    assert cli.main(eval_args(data_dir, trained, "--out", from_images)) == 0
    assert cli.main([str(a) for a in ("eval", "--checkpoint", trained, "--no-progress",
                                      "--data-dir", tmp_path / "nowhere",
                                      "--query-features", files["query"],
                                      "--gallery-features", files["gallery"],
                                      "--out", from_features)]) == 0
    a, b = (json.loads(p.read_text()) for p in (from_images, from_features))
    assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-6) and a["cmc"][:5] == pytest.approx(b["cmc"][:5])
    result = run("eval", "--checkpoint", trained, "--query-features", files["query"])
    assert_short_error(result, "--gallery-features")


def test_eval_of_several_test_sets_in_one_run(data_dir, trained, tmp_path):
    shutil.copytree(data_dir / "market1501", tmp_path / "dukemtmcreid")
    shutil.copytree(data_dir / "market1501", tmp_path / "market1501")
    out = tmp_path / "results.json"
    assert cli.main(eval_args(tmp_path, trained, "--testsets", "market1501,dukemtmcreid", "--out", out,
                              "--save-ranked", tmp_path / "ranked.jsonl")) == 0
    results = json.loads(out.read_text())
    assert {"market1501", "dukemtmcreid"} <= set(results)
    assert results["market1501"]["mAP"] == pytest.approx(results["dukemtmcreid"]["mAP"])
    assert (tmp_path / "ranked_market1501.jsonl").exists() and (tmp_path / "ranked_dukemtmcreid.jsonl").exists()


def test_a_truncated_image_is_named_and_can_be_skipped(data_dir, trained, tmp_path):
    broken = tmp_path / "data"
    shutil.copytree(data_dir, broken)
    victim = sorted((broken / "market1501" / "bounding_box_test").glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:200])
    result = run(*eval_args(broken, trained))
    assert_short_error(result, victim.name)
    out = tmp_path / "results.json"
    result = run(*eval_args(broken, trained, "--skip-bad-images", "--out", out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert victim.name in result.stderr
    assert json.loads(out.read_text())["num_skipped_images"] == 1
