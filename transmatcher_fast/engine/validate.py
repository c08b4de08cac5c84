"""Checks of user input that run before the long work, and what counts as a user's error.

Every check raises :class:`UserError` whose ``str`` is one line (at most two) naming the argument
or file, what is wrong and what to do. The command line prints such errors without a traceback;
see :func:`is_user_error` for the other exceptions it treats the same way.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import torch

from .. import weights_io
from ..data.datasets import DatasetLayoutError
from ..data.images import ImageReadError
from .rundir import RunDirError

PathLike = Union[str, os.PathLike]
_PACKAGE = str(Path(__file__).resolve().parent.parent)


class UserError(Exception):
    """Bad input: ``str(error)`` says which argument or file, what is wrong and what to do."""


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is the user's (bad input), not a bug: a :class:`UserError`, a
    :class:`~.rundir.RunDirError`, a :class:`~..data.DatasetLayoutError`, an unreadable image
    file (:class:`~..data.images.ImageReadError`, also from a loader worker), or a ValueError,
    KeyError or OSError (file not found, permission denied, ...) raised by this package's own
    code (its innermost frame is in ``transmatcher_fast``), which raises those for bad input."""
    if isinstance(error, (UserError, RunDirError, DatasetLayoutError, ImageReadError)):
        return True
    if not isinstance(error, (ValueError, KeyError, OSError)):
        return False
    tb = error.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and os.path.abspath(last.tb_frame.f_code.co_filename).startswith(_PACKAGE)


def error_message(error: BaseException) -> str:
    """One line (two for a dataset layout) for the command line."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    text = str(text).strip() or type(error).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) <= 2:
        return "\n".join(lines)
    if isinstance(error, DatasetLayoutError) and lines[1].strip().startswith("expected layout"):
        return lines[0] + "\nexpected layout: " + "; ".join(line.strip() for line in lines[2:])
    return lines[0] + " (run with --debug for the whole message)"


# --- values -----------------------------------------------------------------------------------
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_bool(value: Any, name: str = "value") -> bool:
    """A real boolean from ``true/false``, ``yes/no``, ``on/off``, ``1/0`` (any case; YAML
    booleans and the integers 0 and 1 too); anything else raises ValueError naming ``name``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be a boolean (true/false, yes/no, on/off, 1/0), got {value!r}")


def check_device(text: Optional[str], flag: str = "--device") -> torch.device:
    """``torch.device(text)`` (None: cuda if available, else cpu) that exists on this machine."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"{flag} {text}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {text}: CUDA is not available here (torch {torch.__version__}"
                            f"{'' if torch.version.cuda else ', a CPU-only build'}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {text}: this machine has {torch.cuda.device_count()} CUDA "
                            f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type not in ("cpu", "mps", "xpu", "meta"):
        raise UserError(f"{flag} {text}: unsupported device type {device.type!r}; use cpu or cuda")
    return device


# --- paths ------------------------------------------------------------------------------------
def _probe_writable(folder: Path, flag: str, shown: PathLike) -> None:
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UserError(f"{flag} {shown}: cannot write in {folder} ({error.strerror or error}); "
                        "choose a writable folder") from None


def check_input_file(path: PathLike, flag: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{flag} {path}: no such file")
    if not path.is_file():
        raise UserError(f"{flag} {path}: not a file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{flag} {path}: not readable (permission denied)")
    return path


def check_output_file(path: PathLike, flag: str) -> Path:
    """``path`` can be written: its folder exists and is writable, and it is not a folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise UserError(f"{flag} {path}: its folder {folder} {what}; create it or choose another path")
    _probe_writable(folder, flag, path)
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path}: the file exists and is read-only")
    return path


def check_output_dir(path: PathLike, flag: str) -> Path:
    """``path`` is a folder that exists or can be created, and it is writable; nothing is
    created here."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file, not a folder; choose a folder")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, so the folder cannot be created")
    _probe_writable(existing, flag, path)
    return path


def check_data_dir(path: PathLike, dataset: str, flag: str = "--data-dir") -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{flag} {path}: no such folder; give the folder of the {dataset} dataset "
                        "(or its parent), or write a synthetic one with: transmatcher-fast synth --out DIR")
    if not path.is_dir():
        raise UserError(f"{flag} {path}: is a file, not a folder")
    return path


def check_splits(dataset, splits: Sequence[str]) -> None:
    """The named splits of a built dataset hold images."""
    for split in splits:
        if not getattr(dataset, split):
            raise UserError(f"{type(dataset).__name__} at {dataset.root}: the {split} split has no "
                            "images; check --data-dir and --dataset")


def check_valid_queries(dataset) -> int:
    """How many queries have no valid gallery match (same id from another camera); raises
    when none has."""
    pairs = {}
    for _, pid, cam in dataset.gallery:
        pairs.setdefault(pid, set()).add(cam)
    invalid = sum(1 for _, pid, cam in dataset.query if not (pairs.get(pid, set()) - {cam}))
    if invalid == len(dataset.query):
        raise UserError(f"{type(dataset).__name__} at {dataset.root}: no query image has a gallery "
                        "image of its identity from another camera, so nothing can be evaluated")
    return invalid


# --- checkpoints ------------------------------------------------------------------------------
_GIVE_A_CHECKPOINT = ("give a complete checkpoint.pt of transmatcher-fast train or upstream's "
                      "checkpoint.pth.tar")


def read_checkpoint(path: PathLike, flag: str = "--checkpoint") -> dict:
    """The checkpoint's dict (``weights_only``), or a :class:`UserError` that says in one line
    what is wrong with the file (missing, empty, a text file, truncated or corrupt, holds
    code): for a file the user names (``flag``). The trainer's own reads of its run's
    checkpoint go through :func:`.checkpoint.load`."""
    path = check_input_file(path, flag)
    try:
        state = weights_io.load(path)
    except weights_io.WeightsFileError as error:
        advice = f"; {_GIVE_A_CHECKPOINT}" if error.kind in ("text", "format", "corrupt") else ""
        raise UserError(f"{flag} {path}: {error.problem}{advice}") from None
    if not isinstance(state, dict):
        raise UserError(f"{flag} {path}: holds a {type(state).__name__}, not a checkpoint dict")
    return state


def checkpoint_locations(state: dict) -> Tuple[Optional[int], Optional[str]]:
    """``(locations, final_layer)`` the checkpoint's matcher was trained for: its part
    ``matcher`` (ours) or upstream's ``criterion``, as the matcher classes read their own keys
    (:func:`~..models.matcher_locations`; None for embedding distances); ``final_layer`` from our
    config (None for upstream's)."""
    from ..models import criterion_matcher, matcher_locations

    if "matcher" in state and isinstance(state["matcher"], dict):
        matcher = state["matcher"]
    elif isinstance(state.get("criterion"), dict):
        matcher = criterion_matcher(state["criterion"])
    else:
        return None, None
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    return matcher_locations(matcher), config.get("final_layer")


def check_input_size(state: dict, height: Optional[int], width: Optional[int], path: PathLike) -> None:
    """``--height``/``--width`` give the feature map the checkpoint's matcher was trained for."""
    if height is None and width is None:
        return
    from ..models import feature_map_size

    locations, final_layer = checkpoint_locations(state)
    if locations is None:
        return
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    h_in = height or config.get("height", 384)
    w_in = width or config.get("width", 128)
    h, w = feature_map_size(h_in, w_in, final_layer or "layer3")
    if h * w != locations:
        trained = (f" (it was trained on {config['height']}x{config['width']} images)"
                   if "height" in config and "width" in config else "")
        raise UserError(f"--height {h_in} --width {w_in} give a {h}x{w} = {h * w}-location feature map, "
                        f"but the matcher in {path} has seq_len {locations}{trained}; "
                        "give the training size or leave --height/--width out")
