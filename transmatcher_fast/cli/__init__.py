"""Command-line interface ``transmatcher-fast <command>``: thin command modules over the engine.

One module per command, each with ``add_<command>_parser(commands)`` and ``run_<command>(args)``:
``demo``, ``op_demo``, ``synth``, ``train``, ``pretrain`` (shares train's entry), ``cfs``,
``eval`` (also the checkpoint and dataset options of ``extract`` and ``visualize``), ``extract``,
``visualize``, ``search``, ``export``. :mod:`.common` holds the option types and the help
formatter, :mod:`.config` the
``--config`` YAML. A new command goes in a new module here, registered in :func:`build_parser`;
it holds no model code and no engine logic (those go in models/, methods/ or engine/).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Optional, Sequence

from .. import __version__
from .cfs import add_cfs_parser, run_cfs  # noqa: F401
from .common import PROG, HelpFormatter, RawDescriptionHelpFormatter, UserError, _Parser, _set_choices  # noqa: F401
from .common import _warnings_as_notes
from .config import _apply_config, load_config  # noqa: F401
from .demo import add_demo_parser, run_end_to_end_demo  # noqa: F401
from .eval import add_eval_parser, run_eval  # noqa: F401
from .export import add_export_parser, run_export  # noqa: F401
from .extract import add_extract_parser, run_extract  # noqa: F401
from .op_demo import add_op_demo_parser, run_op_demo  # noqa: F401
from .pretrain import add_pretrain_parser, run_pretrain  # noqa: F401
from .search import add_search_parser, run_search  # noqa: F401
from .synth import add_synth_parser, run_synth  # noqa: F401
from .train import add_train_parser, run_train, train_entry  # noqa: F401
from .visualize import add_visualize_parser, run_visualize  # noqa: F401

# The top-level --help's description.
DESCRIPTION = """Command-line interface: ``transmatcher-fast <command>``.

``demo`` is the built-in end-to-end run: synthetic persons, an untrained small model evaluated,
trained on the CPU for a few minutes, evaluated again; results and pictures in ``./demo_out/``.

``op-demo`` matches random query features against random gallery features with the fused op and
with upstream's materialised reference, and prints shapes, time, peak memory and agreement.

``synth`` writes a procedural synthetic person dataset in Market-1501 layout.

``train`` trains a method (``--method transmatcher | qaconv | transreid``) with its upstream
recipe (``--config file.yaml`` sets any option; flags given on the command line win). Under
``torchrun`` it trains on every rank.

``eval`` evaluates a checkpoint with upstream's protocol (CMC, mAP, mINP; top-k and re-ranking
options), ``extract`` writes features, ``visualize`` draws ranked lists, local correspondences
and training curves.

``search`` ranks a folder of your own images (any file names) for query images with a trained
checkpoint: ``--out ranked.csv``, ``--index DIR`` keeps the gallery's features for the next search.

``export --format onnx`` writes a checkpoint as ONNX: features.onnx, matcher.onnx (fused
matchers) and export.json.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=DESCRIPTION, formatter_class=RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error (also accepted after the command)")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (add_demo_parser, add_op_demo_parser, add_synth_parser, add_train_parser,
                add_pretrain_parser, add_cfs_parser, add_eval_parser, add_extract_parser,
                add_visualize_parser, add_search_parser, add_export_parser):
        add(commands)
    parser.commands = commands.choices  # name -> subparser, for --config defaults
    for sub in parser.commands.values():
        _set_choices(sub)
        sub.formatter_class = HelpFormatter  # every command's help shows its defaults, plainly
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show the traceback of an error")
    return parser


def _debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line. Bad input ends in one or two lines on stderr, ``transmatcher-fast
    <command>: <message>``, and exit status 1 (2 for a malformed command line); anything
    unexpected in a one-line summary; ``--debug`` shows the traceback instead. Ctrl-C exits 130.
    Warnings print as one-line notes (with their source only under ``--debug``)."""
    from ..engine.validate import error_message, is_user_error

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    parser = build_parser()
    command = next((a for a in argv if a in parser.commands), None)
    where = f"{PROG} {command}" if command else PROG
    shown_before = warnings.showwarning
    if not debug:
        warnings.showwarning = _warnings_as_notes(where)
    try:
        args = parser.parse_args(argv)
        where = f"{PROG} {args.command}"
        if getattr(args, "config", None):
            args = _apply_config(parser, args, argv)
        return args.run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{where}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        if debug:
            raise
        if is_user_error(error):
            raise SystemExit(f"{where}: {error_message(error)}") from None
        first = (str(error).strip().splitlines() or [""])[0][:300]
        raise SystemExit(f"{where}: unexpected {type(error).__name__}: {first}\n"
                         "run with --debug for the traceback") from None
    finally:
        warnings.showwarning = shown_before
