"""What every command module shares: the program name, the help formatter, the option types
(positive ints, ``none`` for unset), the choices table of the fixed-set options and the
two-line argparse error."""

from __future__ import annotations

import argparse
import copy
import re
import sys

from ..engine.validate import UserError  # noqa: F401  (the commands' bad-input error)
from ..options import optional_positive_int_arg, optional_str_arg, positive_int_arg

PROG = "transmatcher-fast"
# Namespace entries that are not options of the command's engine configuration.
_NOT_OPTIONS = ("command", "run", "config", "debug")
EVAL_AMP_CHOICES = ("auto", "bf16", "fp16", "fp32", "none")
# The CMC is measured to this rank (engine.metrics.RankingMetrics' max_rank).
MAX_RANK = 50


# The option types of the training options' fields, shared by every command.
_positive_int, _optional_int, _optional_str = positive_int_arg, optional_positive_int_arg, optional_str_arg


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Plain-text help that shows every option's default once: none is added where the help
    already says it (``default ...``), an option without help gets one; ``code`` markup is
    dropped; a flag pair shows which of its two forms is the default."""

    _NO_HELP = "\0"

    def _format_text(self, text):
        return super()._format_text(text.replace("``", ""))

    def _format_action(self, action):
        if not action.help and action.option_strings and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)
            action.help = self._NO_HELP
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = (action.help or "").replace(self._NO_HELP, "").replace("``", "")
        if (action.default is argparse.SUPPRESS or not action.option_strings or action.required
                or "%(default)" in text or re.search(r"\bdefault\b", text, re.IGNORECASE)):
            return text
        default = action.default
        if isinstance(action, argparse.BooleanOptionalAction):
            shown = next((o for o in action.option_strings if o.startswith("--no-") != bool(default)),
                         str(default))
        elif action.nargs == 0 and isinstance(default, bool):
            shown = "on" if default != isinstance(action, argparse._StoreFalseAction) else "off"
        elif default is None:
            shown = "none"
        elif isinstance(default, (list, tuple)):
            shown = " ".join(map(str, default))
        else:
            shown = str(default)
        return (text + " " if text else "") + f"(default: {shown.replace('%', '%%')})"


class RawDescriptionHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """:class:`HelpFormatter` that keeps the description's line breaks (the top-level help)."""


def _rank(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_RANK:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_RANK} (the CMC is measured to rank "
                                         f"{MAX_RANK}), got {value}")
    return value


class _NoneChoices(tuple):
    """Choices where ``none`` stands for None (the parsed value of ``_optional_str``)."""

    def __contains__(self, value):
        return tuple.__contains__(self, "none" if value is None else value)


def _choices() -> dict:
    """dest -> argparse choices of the options that name one of a fixed set (one table for
    every command, so train, eval, extract and visualize agree)."""
    from ..data import dataset_names
    from ..methods import method_names
    from ..models.resnet import DEPTHS, STRIDES
    from ..models.vit import ARCHS as VIT_ARCHS

    return {"dataset": tuple(dataset_names()), "method": tuple(method_names()),
            "arch": tuple(f"resnet{d}" for d in DEPTHS) + tuple(VIT_ARCHS),
            "ibn": _NoneChoices(("b", "none")), "final_layer": tuple(STRIDES)[1:]}


def _workers_count(text: str) -> int:
    """``-j``/``--workers``: data loader worker processes, 0 = load in the main process."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (load in the main process) or more, got {value}")
    return value


def _set_choices(parser: argparse.ArgumentParser) -> None:
    """Gives the options of :func:`_choices` their choices where they have none, and ``-j`` a
    non-negative type, so that bad values fail in argparse (and --help lists them)."""
    table = _choices()
    for action in parser._actions:
        if action.dest in table and action.choices is None and action.nargs is None:
            action.choices = table[action.dest]
        if action.dest == "workers" and action.type is int:
            action.type = _workers_count


class _Parser(argparse.ArgumentParser):
    """argparse with a two-line error (what is wrong; where the help is) instead of the whole
    usage; the subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message}\nsee: {self.prog} --help\n")


def _warnings_as_notes(where: str):
    """A ``warnings.showwarning`` that prints a warning as the command's own one-line note,
    ``transmatcher-fast <command>: note: <first line>``, without the source path and line."""
    def show(message, category, filename, lineno, file=None, line=None):
        text = (str(message).strip().splitlines() or [category.__name__])[0]
        print(f"{where}: note: {text}", file=sys.stderr if file is None else file)
    return show


def add_extraction_options(parser, *, batch_size: int,
                           amp_help: str = "autocast dtype; auto: bf16 on CUDA, none on CPU") -> None:
    """How a checkpoint's features are extracted (eval, extract, visualize, search)."""
    parser.add_argument("--height", type=_optional_int, default=None, help="input height (default: the checkpoint's)")
    parser.add_argument("--width", type=_optional_int, default=None, help="input width (default: the checkpoint's)")
    parser.add_argument("-b", "--batch-size", dest="batch_size", type=_positive_int, default=batch_size,
                        help="feature extraction batch")
    parser.add_argument("-j", "--workers", type=_workers_count, default=2, help="data loader workers")
    parser.add_argument("--device", type=_optional_str, default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--amp", choices=EVAL_AMP_CHOICES, default="auto", help=amp_help)
