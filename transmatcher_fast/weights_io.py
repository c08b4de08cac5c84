"""Weights in and out, in one place: every file of weights the package reads or writes goes through
this module.

- :func:`load` reads a checkpoint without running code: ``torch.load(weights_only=True)``, or
  safetensors when the file is one (the ``safetensors`` package is optional). Before reading, it
  looks at the file's first bytes, so a log, a config, an empty or a foreign file is named as
  such; a refused or unreadable file raises :class:`WeightsFileError` (a ValueError) whose
  ``problem`` says in one line what is wrong.
- :func:`strip_prefix` drops a wrapper's key prefix (DataParallel's ``module.``, ``base.``, ...);
  :func:`unwrap` finds the state_dict inside ``{"model": ...}``, ``{"state_dict": ...}`` and
  DINO's ``{"teacher": ...}``; :func:`select` takes the entries under one prefix.
- :func:`check_fits` compares a state_dict with a model's and raises one ValueError naming the
  file, the missing, unexpected and mis-shaped keys and both shapes; :func:`load_exactly` loads
  after that check.
- :func:`atomic_write` (and :func:`save_atomic`) write through a temporary and a rename, so a
  reader sees the old file or the new one, never a torn one.

It imports nothing of the package, so every layer (models, methods, engine, cli) may use it.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

PathLike = Union[str, os.PathLike]

# Plain-data classes that upstream checkpoints carry besides tensors (DINO's argparse.Namespace of
# options): a weights-only load may accept them.
PLAIN_DATA = (argparse.Namespace,)

# The wrappers a state_dict is found under, outermost first (timm / upstream training scripts).
WRAPPERS = ("model", "state_dict")


class WeightsFileError(ValueError):
    """A file that :func:`load` refuses or cannot read. ``problem`` is one line without the path
    (callers put their own argument name before it); ``kind`` is one of ``"empty"``,
    ``"text"``, ``"format"``, ``"safetensors"`` (the package is missing), ``"code"`` (it holds
    Python objects a weights-only load refuses) or ``"corrupt"``."""

    def __init__(self, path: PathLike, problem: str, kind: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem, self.kind = Path(path), problem, kind


# --- reading ----------------------------------------------------------------------------------
def file_format(path: PathLike) -> str:
    """What the file's first bytes say it is: ``"zip"`` (torch.save's format), ``"pickle"``
    (torch's legacy format), ``"safetensors"``, ``"text"`` (UTF-8 without NUL bytes: a log, a
    config, JSON), ``"empty"`` or ``"other"``."""
    with open(path, "rb") as file:
        head = file.read(4096)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"\x80"):
        return "pickle"
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if len(head) > 9 and head[8:10] in (b'{"', b"{ ", b"{}") \
            and 2 <= int.from_bytes(head[:8], "little") <= os.path.getsize(path) - 8:
        return "safetensors"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 4:  # not just a character cut at the end of the read
            return "other"
    return "other" if b"\x00" in head else "text"


def load(path: PathLike, *, map_location: Union[str, torch.device] = "cpu", mmap: bool = False,
         safe_globals: Sequence[type] = ()) -> Any:
    """The object in a checkpoint file, read without running code. ``safe_globals``: plain-data
    classes to accept besides tensors and Python values (:data:`PLAIN_DATA`).
    ``mmap`` maps a zip-format file instead of reading its tensors (ignored for other formats).
    Raises FileNotFoundError for a missing file and :class:`WeightsFileError` for one that is
    refused or cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    kind = file_format(path)
    if kind == "empty":
        raise WeightsFileError(path, "the file is empty", "empty")
    if kind == "text":
        what = "JSON" if path.read_bytes()[:1] in (b"{", b"[") else "text"
        raise WeightsFileError(path, f"is a {what} file, not a checkpoint", "text")
    if kind == "other":
        raise WeightsFileError(path, "is not a PyTorch checkpoint (neither torch.save's zip nor its "
                               "legacy format)", "format")
    if kind == "safetensors":
        return _load_safetensors(path, map_location)
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True,
                              mmap=mmap and kind == "zip")
    except Exception as error:  # torch.load raises many kinds for a bad file
        if "weights only" in str(error).lower() or "weights_only" in str(error):
            raise WeightsFileError(path, "holds Python objects that are not tensors or plain values; "
                                   "it is not loaded (it could run code)", "code") from None
        raise WeightsFileError(path, f"the checkpoint is truncated or corrupt ({type(error).__name__} "
                               "while reading it)", "corrupt") from None


def _load_safetensors(path: Path, map_location) -> Dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise WeightsFileError(path, "is a safetensors file; reading it needs the safetensors package "
                               "(pip install safetensors)", "safetensors") from None
    device = str(map_location) if not isinstance(map_location, dict) else "cpu"
    try:
        return load_file(str(path), device=device)
    except Exception as error:  # a cut or altered header
        raise WeightsFileError(path, f"the checkpoint is truncated or corrupt ({type(error).__name__} "
                               "while reading it)", "corrupt") from None


def file_sha256(path: PathLike, block: int = 2 ** 20) -> str:
    """The SHA-256 of a file's bytes: a checkpoint's fingerprint (a copy or a move of the same
    file keeps it, a retrained one does not)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- state_dict layouts -----------------------------------------------------------------------
def strip_prefix(state: Dict[str, Any], prefix: str = "module.", *, only_if_all: bool = False) -> Dict[str, Any]:
    """``state`` with ``prefix`` dropped from the keys that carry it (DataParallel's
    ``module.``); with ``only_if_all``, dropped only when every key carries it (a prefix that
    may also begin a real parameter name, such as ``base.``)."""
    if only_if_all and not (state and all(k.startswith(prefix) for k in state)):
        return dict(state)
    return {k.removeprefix(prefix): v for k, v in state.items()}


def unwrap(checkpoint: Any, wrappers: Iterable[str] = WRAPPERS) -> Any:
    """The state_dict inside ``checkpoint``: the entry under each of ``wrappers`` in turn, where
    present (``"model"``, ``"state_dict"``; ``"teacher"`` for a DINO checkpoint, whose
    DistributedDataParallel ``module.`` prefixes are dropped). Anything else comes back as it is."""
    for key in wrappers:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            if key == "teacher":
                checkpoint = strip_prefix(checkpoint)
    return checkpoint


def select(state: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    """The entries of ``state`` under ``prefix``, with the prefix dropped (a part of a model)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def is_state_dict(state: Any) -> bool:
    """Whether ``state`` is a mapping of names to tensors."""
    return isinstance(state, dict) and all(isinstance(v, Tensor) for v in state.values())


# --- fitting a model --------------------------------------------------------------------------
def _listing(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_fits(source: PathLike, own: Dict[str, Tensor], state: Dict[str, Tensor],
               optional: tuple = (), hint: str = "") -> None:
    """Raise a ValueError unless ``state`` has exactly the keys and shapes of ``own`` (a model's
    state_dict; keys starting with one of ``optional`` may be missing). The message names
    ``source`` (the file, and which part of it), ``hint`` (what was expected), and lists the
    missing, unexpected and mis-shaped keys, each with both shapes."""
    missing = [k for k in own if k not in state and not k.startswith(optional)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if shapes:
        more = f"; ... ({len(shapes) - 8} more)" if len(shapes) > 8 else ""
        parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:8])}{more}")
    if parts:
        raise ValueError(f"{source}: the weights do not fit the model" + (f" ({hint})" if hint else "")
                         + ": " + "; ".join(parts))


def load_exactly(module: nn.Module, state: Dict[str, Tensor], source: PathLike, hint: str = "") -> None:
    """``module.load_state_dict(state, strict=True)`` after :func:`check_fits`."""
    check_fits(source, module.state_dict(), state, hint=hint)
    module.load_state_dict(state, strict=True)


# --- writing ----------------------------------------------------------------------------------
# The temporary of an atomic write is ``.<name>.<random>.tmp`` beside the file.
_TMP_PREFIX, _TMP_SUFFIX = ".{name}.", ".tmp"


def temporaries(path: PathLike) -> List[Path]:
    """The temporaries that killed :func:`atomic_write` calls to ``path`` left beside it. Only the
    process that owns ``path`` (a training run holding its folder's lock) may remove them: a write
    in progress has one too."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = f"{_TMP_PREFIX.format(name=glob.escape(path.name))}*{_TMP_SUFFIX}"
    return sorted(p for p in path.parent.glob(pattern) if p.is_file())


def _umask() -> int:
    """The process's umask (read by setting it back at once: Python 3.11 has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[Any], Any], mode: str = "wb",
                 temporary: Optional[PathLike] = None) -> Path:
    """``write(file)`` into a temporary file beside ``path`` (``.<name>.*.tmp``, or
    ``temporary`` when given: a fixed name its owner knows to clean up), flushed to disk and
    renamed over ``path``, then the folder entry synced: a reader, or a resumed run, sees the old
    file or the new one, never a torn one; a failed write leaves no temporary. Text modes write
    with ``newline=""`` (what the csv module expects)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if temporary is None:
        handle, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX.format(name=path.name), suffix=_TMP_SUFFIX,
                                       dir=path.parent)
        # mkstemp makes the file private (0600); the written file gets what open() would give.
        os.fchmod(handle, 0o666 & ~_umask())
    else:
        tmp = Path(temporary)
        handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(handle, mode, **({"newline": ""} if "b" not in mode else {})) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename itself is durable only once the folder entry is on disk.
    try:
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)
    return path


def save_atomic(state: Dict[str, Any], path: PathLike) -> Path:
    """``torch.save(state)`` to ``path`` through :func:`atomic_write`."""
    return atomic_write(path, lambda file: torch.save(state, file))
