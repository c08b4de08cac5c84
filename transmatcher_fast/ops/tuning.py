"""The committed launch table: which CUDA backend, and which launch configuration, runs a call.

The GPU suite (benchmarks/gpu_suite.py) measures every backend and kernel variant and writes a
table in this format (``gpu_tuning_<device>.json``); the one committed as
``transmatcher_fast/ops/tuning.json`` is what ``dispatch`` reads. Format::

    {"format": 1, "device": "NVIDIA H200", "source": "benchmarks/results/...",
     "classes": {"<size>-<dtype>": {"backend": "triton" | "cuda",
                                    "triton": {ForwardConfig fields},
                                    "cuda": {"query_group": int}}}}

``size`` is ``small`` below ``LARGE_PAIRS`` image pairs per call (a training batch against
itself), else ``large`` (evaluation blocks); ``dtype`` is ``fp16``, ``bf16``, ``fp32-tf32`` or
``fp32-ieee``. A class, or a field, that the table does not name keeps the built-in default, and
so does a GPU whose name differs from the table's ``device``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Iterator, Optional

import torch

FORMAT = 1
LARGE_PAIRS = 65536
TABLE_PATH = Path(__file__).with_name("tuning.json")
ENV_TABLE = "TRANSMATCHER_FAST_TUNING"  # another table, e.g. one the suite has just written
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
# The CUDA forward launches the suite measures: 1 = gallery sweep, else query regions per gallery
# strip (0 = the kernel's default; orders only, mma.sync kernel); -1 = the wgmma (HGMMA) kernel
# for sm_90a (csrc/cuda/max_sim_forward_wgmma.cu, kForwardWgmma), which falls back to mma.sync
# where it cannot run.
CUDA_QUERY_GROUP_CANDIDATES = (1, 4, 8, 16, -1)
_override: Optional[dict] = None


def shape_class(num_pairs: int, dtype: torch.dtype, tf32: bool) -> str:
    size = "large" if num_pairs >= LARGE_PAIRS else "small"
    label = _DTYPES.get(dtype) or ("fp32-tf32" if tf32 else "fp32-ieee")
    return f"{size}-{label}"


def validate(table: dict, source: str) -> dict:
    """The table, or a ValueError naming the file and what is wrong."""
    if not isinstance(table, dict) or table.get("format") != FORMAT:
        raise ValueError(f"{source}: not a launch table of format {FORMAT}")
    classes = table.get("classes")
    if not isinstance(classes, dict):
        raise ValueError(f"{source}: 'classes' must be an object")
    for name, entry in classes.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: class {name!r} must be an object")
        if entry.get("backend", "triton") not in ("triton", "cuda"):
            raise ValueError(f"{source}: class {name!r}: backend must be 'triton' or 'cuda', "
                             f"got {entry.get('backend')!r}")
    return table


@functools.lru_cache(maxsize=None)
def load(path: Optional[str] = None) -> dict:
    path = path or os.environ.get(ENV_TABLE) or str(TABLE_PATH)
    with open(path) as f:
        return validate(json.load(f), path)


@contextlib.contextmanager
def use_table(table: dict) -> Iterator[None]:
    """Calls inside the block read ``table`` instead of the committed one (tests, the suite)."""
    global _override
    previous, _override = _override, validate(table, "use_table")
    try:
        yield
    finally:
        _override = previous


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def entry(num_pairs: int, dtype: torch.dtype, tf32: bool,
          device: Optional[torch.device] = None) -> dict:
    """The table's entry for a call's class ({} where it names none). A table measured on one
    GPU model (its "device") does not steer another: on a CUDA ``device`` of another name the
    built-in defaults apply."""
    table = _override if _override is not None else load()
    measured_on = table.get("device")
    if measured_on and device is not None and device.type == "cuda":
        if _device_name(device.index if device.index is not None else
                        torch.cuda.current_device()) != measured_on:
            return {}
    return table["classes"].get(shape_class(num_pairs, dtype, tf32), {})
