"""``--config FILE.yaml`` of any command: the YAML values, typed and checked like their flags,
become the command's defaults (flags on the command line still win)."""

from __future__ import annotations

import argparse
from typing import Sequence

from .common import UserError


def load_config(path: str) -> dict:
    """Training options from a YAML mapping; keys are option names (``batch_size`` or
    ``batch-size``)."""
    import yaml

    try:
        with open(path) as file:
            values = yaml.safe_load(file) or {}
    except OSError as error:
        raise UserError(f"--config {path}: cannot read it ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        raise UserError(f"--config {path}: not valid YAML"
                        + (f" (line {where.line + 1}, column {where.column + 1})" if where else "")) from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: must hold a mapping of option: value, got {type(values).__name__}")
    from ..engine.config import upgrade_options

    return upgrade_options({str(key).replace("-", "_"): value for key, value in values.items()})


def _apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  argv: Sequence[str]) -> argparse.Namespace:
    """YAML values of ``--config`` become the defaults; flags on the command line still win."""
    values = load_config(args.config)
    subparser = parser.commands[args.command]
    known = {action.dest for action in subparser._actions}
    if args.command in ("train", "pretrain"):
        values = _drop_other_commands_defaults(values, known, args)
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"--config {args.config}: unknown options {unknown}")
    subparser.set_defaults(**_typed_config(subparser, values, args.config))
    return parser.parse_args(argv)


def _drop_other_commands_defaults(values: dict, known: set, args) -> dict:
    """A run's config.yaml holds every training option; those without a flag in this command
    (DINO's in a ``train`` run) are dropped where they hold their default, and refused where
    they do not (they would be ignored)."""
    import dataclasses

    from ..engine.config import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    other = {k for k in values if k not in known and k in defaults}
    def plain(v):  # YAML has lists where the defaults have tuples
        return list(v) if isinstance(v, (list, tuple)) else v

    changed = sorted(k for k in other if plain(values[k]) != plain(defaults[k]))
    if changed:
        raise UserError(f"--config {args.config}: {changed} are not options of {args.command} "
                        f"(set them with the command that has them)")
    return {k: v for k, v in values.items() if k not in other}


def _typed_config(parser: argparse.ArgumentParser, values: dict, path: str) -> dict:
    """YAML values through the same type and choices as their flags (see
    :func:`..options.typed_values`): ``lr: 1e-3`` is a float, ``arch: resnet9`` an error, a
    switch like ``--freeze-bn`` takes a real boolean; a bad value is an error naming the file and
    the key."""
    from ..engine.validate import parse_bool
    from ..options import typed_values

    try:
        return typed_values(parser._actions, values, path, parse_bool)
    except ValueError as error:
        raise UserError(str(error)) from None
