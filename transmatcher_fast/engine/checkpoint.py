"""Training checkpoints: written atomically, read without running code, RNG state included.

A checkpoint is a dict of tensors and plain Python values, so a weights-only load
(``weights_io.load``) reads it: a file from elsewhere cannot execute anything. It is written to a
temporary file in the same folder, flushed to disk and renamed over the old one, so a run killed
at any moment leaves either the previous checkpoint or the new one, never a torn file.

These are the run's own checkpoints (``checkpoint.pt``). Upstream's ``checkpoint.pth.tar`` is read
by ``models/upstream_checkpoint.py``; a checkpoint the user names on the command line is read by
``validate.read_checkpoint``, which turns every problem with the file into a one-line
:class:`~.validate.UserError` (:func:`load` here raises the loader's own errors).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
import torch

from .. import weights_io

PathLike = Union[str, os.PathLike]

# Writing and reading live in ``weights_io`` (one module for every file of weights); these names
# stay here for the engine's callers.
temporaries = weights_io.temporaries
atomic_write = weights_io.atomic_write
save_atomic = weights_io.save_atomic


def load(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic` (``weights_only``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return weights_io.load(path, map_location=map_location)


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
