"""Options declared once (transmatcher_fast.options, engine.config, each method's options
dataclass): the flags, --help, the --config YAML typing and the resume rule generated from the
fields keep what the code before this design wrote and read (tests/fixtures/options_before/,
written by that code)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Optional

import pytest
import yaml

from transmatcher_fast import options
from transmatcher_fast.cli import _apply_config, build_parser
from transmatcher_fast.cli.common import _NOT_OPTIONS, UserError
from transmatcher_fast.engine.config import (OPTION_CLASSES, RESUME_MAY_CHANGE, TRAIN_GROUPS, TrainConfig,
                                             check_resume, resume_changes)
from transmatcher_fast.methods import all_losses, get_method, method_names

BEFORE = Path(__file__).parent / "fixtures" / "options_before"
CONFIGS = Path(__file__).parent.parent / "configs"


def _help(command: str, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")  # the fixtures' width
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return out.getvalue()


def _parsed(argv) -> TrainConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        args = _apply_config(build_parser(), args, argv)
    return TrainConfig.from_dict({k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS})


# Options added since the fixtures were written: train --init-from (issue 23), and any option a
# method registered later declares. The fixtures pin what was there; what is added is checked
# to be an addition (a new flag, a field at its declared default), not a change.
ADDED_SINCE = ("init-from",)


def _added_flags(text: str, before: str) -> set:
    """The options of ``text`` (a --help) whose first flag the fixture ``before`` does not have."""
    flags = set(re.findall(r"^  (--[a-z0-9-]+)", text, flags=re.M))
    return {flag for flag in flags if not re.search(rf"^  {flag}\b", before, flags=re.M)}


def _without_added(text: str, added=None) -> str:
    """--help without the added options: the usage as its words (an added option re-wraps it),
    then the option paragraphs with the added ones' left out."""
    usage, _, body = text.partition("\n\n")
    for flag in added if added is not None else [f"--{name}" for name in ADDED_SINCE]:
        usage = re.sub(rf"\[{flag}\b[^\]]*\]", "", usage)
        body = re.sub(rf"\n  {flag}\b.*\n(?: {{24}}.*\n)*", "\n", body)
    return " ".join(usage.split()) + "\n\n" + body


def _added_fields(before_keys) -> dict:
    """Each TrainConfig field the fixture's keys lack (but the start options, which config.yaml
    leaves out), with its declared default."""
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)
            if f.name not in before_keys and not f.metadata.get("start")}


FIXTURE_METHODS = ["dino", "qaconv", "transmatcher", "transreid"]


def _compare_help(command: str, monkeypatch):
    """(--help now, the fixture's), both without the options added since. The fixtures are the
    --help of the four shipped methods: another registered method changes --help by design (its
    name in the choices and the per-method defaults, its own help group)."""
    if method_names() != FIXTURE_METHODS:
        pytest.skip(f"methods {method_names()} registered, the fixtures have {FIXTURE_METHODS}")
    new, old = _help(command, monkeypatch), (BEFORE / f"help_{command}.txt").read_text()
    added = _added_flags(new, old)
    assert {f"--{name}" for name in ADDED_SINCE} <= added
    return _without_added(new, added), _without_added(old, ())


def test_train_help_is_unchanged_but_for_the_added_options(monkeypatch):
    new, old = _compare_help("train", monkeypatch)
    assert new == old


def test_pretrain_help_is_unchanged_but_resume_and_overwrite_sit_in_run_as_in_train(monkeypatch):
    """The old pretrain parser copied train's through argparse ``parents``, which moved the
    --resume | --overwrite pair into "options:"; generated, they stay in "run:" as in train."""
    new, old = _compare_help("pretrain", monkeypatch)
    assert sorted(new.splitlines()) == sorted(old.splitlines())
    run = new.index("\nrun:\n")
    assert run < new.index("\n  --resume ") < new.index("\n  --overwrite ") < new.index("\n  --seed ")


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_resolves_as_before(name):
    before = json.loads((BEFORE / "configs_resolved.json").read_text())
    command = "pretrain" if name.startswith("dino") else "train"
    config = _parsed([command, "--config", str(CONFIGS / name)])
    resolved = json.loads(json.dumps(dataclasses.asdict(config)))
    added = _added_fields(before[name])
    assert {"init_from"} <= set(added)
    assert {k: resolved.pop(k) for k in added} == json.loads(json.dumps(added))
    assert resolved == before[name]


@pytest.mark.parametrize("method", ["transmatcher", "transreid", "dino"])
def test_a_run_folders_config_yaml_from_before_reads_back_and_resumes(method, tmp_path):
    """config.yaml of a run written before (flat keys, the start options left out): --config
    reads it back, and a resume with it finds no difference from the checkpoint's configuration
    (which holds the same flat values, plus resume/overwrite)."""
    path = BEFORE / f"config_{method}.yaml"
    # checkpoint.pt holds these values as config.yaml does, the crop-area pairs as tuples.
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in yaml.safe_load(path.read_text()).items()}
    command = "pretrain" if method == "dino" else "train"
    config = _parsed([command, "--config", str(path), "--resume"])
    assert config.method == method and config.resume
    assert check_resume(saved, config, tmp_path) == {}
    assert check_resume({**saved, "resume": False, "overwrite": False}, config, tmp_path) == {}
    assert options.flat(config) == {**saved, **_added_fields(saved)}
    # What a resume may change is still what it was.
    later = _parsed([command, "--config", str(path), "--resume", "--epochs", str(config.epochs + 1)])
    assert check_resume(saved, later, tmp_path) == {"epochs": [config.epochs, config.epochs + 1]}


def test_resume_rule_is_the_one_before():
    assert RESUME_MAY_CHANGE == {
        "epochs", "max_epochs", "max_steps_per_epoch", "workers", "log_every", "progress", "tensorboard",
        "eval_every", "test_batch", "test_prob_batch", "test_gal_batch", "device", "data_dir", "exp_dir",
        "init_from"}  # added since: a resumed run continues from its own checkpoint
    saved = {"matcher": "qaconv", "lr": 0.005}  # an older version: matcher, few options
    assert resume_changes(saved, TrainConfig(method="qaconv")) == {}
    assert resume_changes(saved, TrainConfig(method="qaconv", seed=3)) == {"seed": [0, 3]}


def test_every_option_has_one_owner_a_flag_and_a_known_group():
    names = [f.name for cls in OPTION_CLASSES for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names)) == len(dataclasses.fields(TrainConfig))
    # the engine's groups, and those the methods' own options declare (DINO's are pretrain's)
    method_groups = {f.metadata["group"] for name in method_names() if get_method(name).options
                     for f in dataclasses.fields(get_method(name).options)}
    assert {"DINO", "unlabelled images: CFS list"} <= method_groups
    for field in dataclasses.fields(TrainConfig):
        assert field.metadata["group"] in set(TRAIN_GROUPS) | method_groups, field.name
    # Every command takes the engine's and the model's options; each method's own options are
    # flags of the command that trains it (DINO's: pretrain).
    parsers = build_parser().commands
    shared = {f.name for cls in OPTION_CLASSES[:2] for f in dataclasses.fields(cls)}
    for command in ("train", "pretrain"):
        own = {f.name for name in method_names() if get_method(name).options
               and get_method(name).command == command for f in dataclasses.fields(get_method(name).options)}
        assert {a.dest for a in parsers[command]._actions} >= shared | own, command


def test_loss_choices_are_the_methods_losses():
    assert all_losses()[:4] == ("pairwise", "triplet", "softmax_triplet", "dino")  # then any added method's
    for name in method_names():
        assert set(get_method(name).losses) <= set(all_losses())
    with pytest.raises(ValueError, match=r"loss must be one of \('pairwise', 'triplet', 'softmax_triplet', 'dino'"):
        TrainConfig(loss="arcface")


def test_field_checks_run_for_every_method_and_normalise():
    with pytest.raises(ValueError, match="dino_out_dim must be a positive integer, got 0"):
        TrainConfig(dino_out_dim=0)  # a DINO option is still checked under another method
    with pytest.raises(ValueError, match="keep_num .* and keep_ratio .* exclude each other"):
        TrainConfig(filter_list="a.txt", keep_num=3, keep_ratio=0.5)
    with pytest.raises(ValueError, match="erasing_p must be a probability"):
        TrainConfig(method="transreid", erasing_p=1.5)
    with pytest.raises(ValueError, match="neck_feat must be one of"):
        TrainConfig(neck_feat="middle")
    assert TrainConfig(dino_global_scale=[0.5, 1]).dino_global_scale == (0.5, 1.0)


# --- the generic module, on a small options class -----------------------------------------------
@dataclasses.dataclass
class _Toy:
    name: str = options.option("x", group="a", help="a name")
    size: int = options.option(2, flags=("-s", "--size"), group="b", type=options.positive_int_arg,
                               check=options.positive_int, resume_may_change=True)
    width: Optional[int] = options.option(None, group="a", type=options.optional_positive_int_arg,
                                          after="name", help="a width")
    fast: bool = options.option(False, group="b", switch="pair", help="go fast")
    kind: str = options.option("p", group="b", choices=("p", "q"), renamed_from=("sort",))
    scale: tuple = options.option((0.1, 0.2), group="b", type=float, nargs=2, check=options.area_range)
    start: bool = options.option(False, group="b", switch="on", start=True)
    hidden: int = options.option(7)  # no group: no flag

    def __post_init__(self):
        options.check_values(self)


def _toy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    options.add_arguments(parser, dataclasses.fields(_Toy), ("a", "b"), defaults={"size": 3})
    return parser


def test_arguments_are_generated_from_the_fields():
    parser = _toy_parser()
    titles = [g.title for g in parser._action_groups]
    assert titles[-2:] == ["a", "b"]
    a_group = parser._action_groups[-2]
    assert [x.dest for x in a_group._group_actions] == ["name", "width"]  # width placed after name
    args = parser.parse_args(["-s", "5", "--no-fast", "--kind", "q", "--scale", "0.2", "0.9", "--width", "none"])
    assert vars(args) == {"name": "x", "size": 5, "width": None, "fast": False, "kind": "q",
                          "scale": [0.2, 0.9], "start": False}
    assert parser.parse_args([]).size == 3  # the given default wins over the field's
    assert "hidden" not in vars(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["--kind", "r"])


def test_yaml_values_are_typed_like_their_flags_and_errors_name_file_and_key():
    actions = _toy_parser()._actions

    def as_bool(value, where):
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: not a boolean")

    typed = options.typed_values(actions, {"size": "4", "fast": True, "scale": [0.3, 1], "width": None},
                                 "run.yaml", as_bool)
    assert typed == {"size": 4, "fast": True, "scale": [0.3, 1.0], "width": None}
    for values, message in (({"size": 0}, "--config run.yaml: size: invalid value 0"),
                            ({"kind": "r"}, "--config run.yaml: kind: invalid choice 'r'"),
                            ({"size": [1, 2]}, "--config run.yaml: size: expects one value"),
                            ({"fast": "maybe"}, "--config run.yaml: fast: not a boolean")):
        with pytest.raises(ValueError, match=message):
            options.typed_values(actions, values, "run.yaml", as_bool)


def test_flat_upgrade_changes_and_checks():
    toy = _Toy(scale=[0.1, 0.5])
    assert toy.scale == (0.1, 0.5)  # normalised by its check
    assert options.flat(toy) == {"name": "x", "size": 2, "width": None, "fast": False, "kind": "p",
                                 "scale": (0.1, 0.5), "hidden": 7}
    assert options.from_flat(_Toy, {"sort": "q"}).kind == "q"  # an older name
    assert options.from_flat(_Toy, {"sort": "q", "kind": "p"}).kind == "p"  # the new name wins
    with pytest.raises(ValueError, match=r"unknown toy options \['bogus'\]"):
        options.from_flat(_Toy, {"bogus": 1}, "toy options")
    with pytest.raises(ValueError, match="size must be a positive integer, got 0"):
        _Toy(size=0)
    with pytest.raises(ValueError, match=r"kind must be one of \('p', 'q'\), got 'r'"):
        _Toy(kind="r")
    assert options.changes({"size": 2, "start": True}, _Toy(size=4, start=False), _Toy()) == {"size": [2, 4]}
    assert options.changes({}, _Toy(hidden=8), _Toy()) == {"hidden": [7, 8]}  # missing: the default
    assert options.resume_may_change(_Toy) == {"size"}


def test_the_yaml_error_of_a_training_option_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("batch_size: many\n")
    parser = build_parser()
    argv = ["train", "--config", str(path)]
    with pytest.raises(UserError, match=rf"--config {path}: batch_size: invalid value 'many'"):
        _apply_config(parser, parser.parse_args(argv), argv)
