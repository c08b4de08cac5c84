"""Training checkpoints: written atomically, read without running code, RNG state included.

A checkpoint is a dict of tensors and plain Python values, so ``torch.load(weights_only=True)``
reads it: a file from elsewhere cannot execute anything. It is written to a temporary file in the
same folder, flushed to disk and renamed over the old one, so a run killed at any moment leaves
either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import glob
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]


# The temporary of a save is ``.<name>.<random>.tmp`` beside the checkpoint.
_TMP_PREFIX, _TMP_SUFFIX = ".{name}.", ".tmp"


def temporaries(path: PathLike) -> List[Path]:
    """The temporaries that killed :func:`save_atomic` calls to ``path`` left beside it. Only the
    process that owns ``path`` (a training run holding its folder's lock) may remove them: a save
    in progress has one too."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = f"{_TMP_PREFIX.format(name=glob.escape(path.name))}*{_TMP_SUFFIX}"
    return sorted(p for p in path.parent.glob(pattern) if p.is_file())


def atomic_write(path: PathLike, write: Callable[[Any], Any], mode: str = "wb") -> Path:
    """``write(file)`` into a temporary file beside ``path`` (``.<name>.*.tmp``), flushed to
    disk and renamed over ``path``, then the folder entry synced: a reader, or a resumed run,
    sees the old file or the new one, never a torn one; a failed write leaves no temporary.
    Text modes write with ``newline=""`` (what the csv module expects)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX.format(name=path.name), suffix=_TMP_SUFFIX,
                                   dir=path.parent)
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


def load(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic` (``weights_only``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)


def rng_state() -> Dict[str, Any]:
    """Every global random stream a training step may touch (Python, NumPy, torch CPU and CUDA),
    as tensors and plain values so that ``weights_only`` loading accepts them."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy_key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
        "numpy_pos": int(numpy_state["state"]["pos"]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": state["numpy_key"].numpy().astype(np.uint32),
                                   "pos": state["numpy_pos"]},
                         "has_gauss": 0, "gauss": 0.0})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
