"""Options declared once, as dataclass fields, and everything generated from them.

A field made by :func:`option` carries beside its default what the other places need: its
command-line flags, help text, argparse type, choices, help group, the check of its value and
whether a resumed run may change it. From these fields come

- the argparse arguments of a command (:func:`add_arguments`), grouped and ordered as declared;
- the typing of ``--config`` YAML values, through the same types and choices as the flags
  (:func:`typed_values`; the values then become the parser's defaults, as timm's ``--config``);
- the checks of a constructed options object (:func:`check_values`);
- the flat ``{name: value}`` mapping of ``config.yaml`` and back (:func:`flat`,
  :func:`upgrade`), and the differences a resume compares (:func:`changes`).

This module imports nothing of the package, so that methods and engine both declare options.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

Check = Callable[[str, Any], Any]


def option(default: Any = dataclasses.MISSING, *, help: Optional[str] = None,
           flags: Sequence[str] = (), group: Optional[str] = None, type: Optional[Callable] = None,
           choices: Optional[Sequence[Any]] = None, check: Optional[Check] = None,
           switch: Optional[str] = None, nargs: Any = None, metavar: Any = None,
           after: Optional[str] = None, exclusive: Optional[str] = None,
           resume_may_change: bool = False, start: bool = False,
           renamed_from: Sequence[str] = ()) -> Any:
    """A dataclass field with what the command line, YAML and resume need to know of it.

    ``flags``: the option strings (default ``--name-with-dashes``); ``group``: the help group
    (None: no flag); ``type``: argparse's conversion of a flag's text; ``choices``: the allowed
    values (argparse's and :func:`check_values`'); ``check(name, value)`` returns the value
    (possibly normalised) or raises a ValueError naming the option; ``switch``: ``"pair"``
    (``--x/--no-x``) or ``"on"`` (``--x`` sets it); ``after``: the option it follows in --help
    (default: declaration order); ``exclusive``: flags in the same exclusive set exclude each
    other; ``resume_may_change``: a resumed run may give another value; ``start``: how a run
    starts, never compared nor recorded; ``renamed_from``: older names of the option."""
    metadata = {"help": help, "flags": tuple(flags), "group": group, "type": type,
                "choices": None if choices is None else tuple(choices), "check": check,
                "switch": switch, "nargs": nargs, "metavar": metavar, "after": after,
                "exclusive": exclusive, "resume_may_change": resume_may_change, "start": start,
                "renamed_from": tuple(renamed_from)}
    return dataclasses.field(default=default, metadata=metadata)


def copy_field(field: dataclasses.Field) -> dataclasses.Field:
    """A fresh field like ``field`` (a Field object belongs to one dataclass)."""
    return dataclasses.field(default=field.default, default_factory=field.default_factory,
                             metadata=field.metadata)


# --- value checks: (name, value) -> value, or a ValueError naming the option ---------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(name: str, value: Any) -> Any:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def non_negative_int(name: str, value: Any) -> Any:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def optional_positive_int(name: str, value: Any) -> Any:
    if value is not None and (not _is_int(value) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return value


def positive(name: str, value: Any) -> Any:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return value


def non_negative(name: str, value: Any) -> Any:
    if not value >= 0:
        raise ValueError(f"{name} must be non-negative, got {value!r}")
    return value


def probability(name: str, value: Any) -> Any:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return value


def unit_interval(name: str, value: Any) -> Any:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return value


def optional_fraction(name: str, value: Any) -> Any:
    if value is not None and not 0 < value <= 1:
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}")
    return value


def area_range(name: str, value: Any) -> Any:
    """A pair (min, max) of crop areas in (0, 1], as a tuple whatever the source (CLI list, YAML
    list, default tuple): a resume compares it."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (min, max) of crop areas, got {value!r}") from None
    if not 0 < low <= high <= 1:
        raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {value!r}")
    return (low, high)


def check_values(options: Any) -> None:
    """Every field's declared choices and check, in declaration order; a check's normalised
    value replaces the given one."""
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        choices = field.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ValueError(f"{field.name} must be one of {choices}, got {value!r}")
        check = field.metadata.get("check")
        if check is not None:
            checked = check(field.name, value)
            if checked is not value:
                setattr(options, field.name, checked)


# --- argparse types: a flag's text -> value ----------------------------------------------------
def positive_int_arg(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int_arg(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def optional_positive_int_arg(text: str):
    return None if text.lower() == "none" else positive_int_arg(text)


def optional_str_arg(text: str):
    return None if text.lower() == "none" else text


# --- argparse arguments -----------------------------------------------------------------------
def help_order(fields: Iterable[dataclasses.Field]) -> List[dataclasses.Field]:
    """``fields`` in declaration order, each one with ``after`` moved behind that option."""
    ordered: List[dataclasses.Field] = []
    for field in fields:
        anchor = field.metadata.get("after")
        names = [f.name for f in ordered]
        ordered.insert(names.index(anchor) + 1 if anchor in names else len(ordered), field)
    return ordered


def add_arguments(parser: argparse.ArgumentParser, fields: Iterable[dataclasses.Field],
                  groups: Sequence[str], *, defaults: Optional[Mapping[str, Any]] = None,
                  help_suffix: Callable[[str], Optional[str]] = lambda name: None) -> None:
    """One argparse group per title of ``groups`` (in that order) holding the fields of that
    group, in :func:`help_order`; fields of other groups get no flag. A flag's default is
    ``defaults[name]`` or the field's; ``help_suffix(name)``, when not None, ends its help."""
    fields, defaults = help_order(fields), defaults or {}
    for title in groups:
        group = parser.add_argument_group(title)
        exclusive: Dict[str, Any] = {}
        for field in fields:
            meta = field.metadata
            if meta.get("group") != title:
                continue
            target = group
            if meta["exclusive"] is not None:
                if meta["exclusive"] not in exclusive:
                    exclusive[meta["exclusive"]] = group.add_mutually_exclusive_group()
                target = exclusive[meta["exclusive"]]
            flags = meta["flags"] or ("--" + field.name.replace("_", "-"),)
            default = defaults.get(field.name, field.default)
            kwargs: Dict[str, Any] = {"dest": field.name,
                                      "default": list(default) if meta["nargs"] else default}
            help_text = meta["help"]
            suffix = help_suffix(field.name)
            if suffix is not None:
                help_text = f"{help_text or ''} ({suffix})".strip()
            if help_text is not None:
                kwargs["help"] = help_text
            if meta["switch"] == "pair":
                kwargs["action"] = argparse.BooleanOptionalAction
            elif meta["switch"] == "on":
                kwargs["action"] = "store_true"
            else:
                for key in ("type", "choices", "nargs", "metavar"):
                    if meta[key] is not None:
                        kwargs[key] = meta[key]
            target.add_argument(*flags, **kwargs)


# --- YAML values ------------------------------------------------------------------------------
def typed_values(actions: Iterable[argparse.Action], values: Mapping[str, Any], path: str,
                 as_bool: Callable[[Any, str], bool]) -> Dict[str, Any]:
    """YAML values through the same type and choices as their flags (``actions``: the parser's):
    ``lr: 1e-3`` is a float, a bad choice an error, and a switch takes what ``as_bool(value,
    where)`` reads as a boolean; anything else is a ValueError ``--config PATH: KEY: ...`` naming
    the file and the key, never a truthy string. ``values``' keys must be dests of ``actions``."""
    by_dest = {action.dest: action for action in actions}
    typed = {}
    for key, value in values.items():
        action = by_dest[key]
        where = f"--config {path}: {key}"
        if action.nargs == 0:  # a switch: store_true / store_false / --x/--no-x
            typed[key] = as_bool(value, where)
            continue
        many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
        items = value if many and isinstance(value, list) else [value]
        if not many and isinstance(value, (list, dict)):
            raise ValueError(f"{where}: expects one value, got {value!r}")
        converted = []
        for item in items:
            if isinstance(item, bool) or isinstance(item, (list, dict)):
                raise ValueError(f"{where}: expects a value like its flag --{key.replace('_', '-')}, got {item!r}")
            if item is None:  # YAML null: unset, as the flag's "none"
                converted.append(None)
                continue
            try:
                result = action.type(str(item)) if action.type is not None else str(item)
            except (argparse.ArgumentTypeError, TypeError, ValueError) as error:
                raise ValueError(f"{where}: invalid value {item!r} ({error})") from None
            if action.choices is not None and result not in action.choices:
                raise ValueError(f"{where}: invalid choice {item!r} (choose from "
                                 f"{', '.join(map(str, action.choices))})")
            converted.append(result)
        typed[key] = converted if many else converted[0]
    return typed


# --- flat mappings (config.yaml, checkpoints) and resume -----------------------------------------
def flat(options: Any) -> Dict[str, Any]:
    """``{name: value}`` of every field but the start options (what config.yaml records)."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
            if not f.metadata.get("start")}


def upgrade(cls: type, values: Mapping[str, Any]) -> Dict[str, Any]:
    """``values`` with every older name of a field (``renamed_from``) renamed; a value given
    under the new name wins."""
    values = dict(values)
    for field in dataclasses.fields(cls):
        for old in field.metadata.get("renamed_from", ()):
            if old in values:
                legacy = values.pop(old)
                values.setdefault(field.name, legacy)
    return values


def from_flat(cls: type, values: Mapping[str, Any], what: str = "options") -> Any:
    """``cls(**values)`` with older names upgraded and unknown names refused in one line."""
    values = upgrade(cls, values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {sorted(known)}")
    return cls(**values)


def resume_may_change(cls: type) -> frozenset:
    """The names of the fields a resumed run may change."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("resume_may_change"))


def changes(saved: Mapping[str, Any], current: Any, defaults: Any) -> Dict[str, List[Any]]:
    """``{name: [saved value, current value]}`` for every field (start options excepted) whose
    value in ``current`` differs from ``saved``'s; a name ``saved`` lacks (an older version
    wrote it) counts as its value in ``defaults``."""
    saved = upgrade(type(current), saved)
    found = {}
    for field in dataclasses.fields(current):
        if field.metadata.get("start"):
            continue
        old = saved.get(field.name, getattr(defaults, field.name))
        new = getattr(current, field.name)
        if old != new:
            found[field.name] = [old, new]
    return found
