"""Backend registry and selection for the fused ops.

A backend is a named pair of functions (forward, backward) for some device types. The op picks one
per call from the device of its inputs: the user's choice when one is set (``set_backend`` or the
``TRANSMATCHER_FAST_BACKEND`` environment variable), else the first available backend in the
device's preference list.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from . import precision, tuning

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
ENV_BACKEND = "TRANSMATCHER_FAST_BACKEND"
ENV_POISON = "TRANSMATCHER_FAST_POISON"

# Default order per device type; the first registered, available one that serves the device wins.
_PREFERENCE = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: Optional[frozenset]  # None: any device
    forward: Callable
    backward: Callable
    is_available: Callable[[], bool] = lambda: True
    dtypes: Optional[frozenset] = None  # input dtypes it computes; None: all the op accepts

    def serves(self, device_type: str, dtype: Optional[torch.dtype] = None) -> bool:
        return (self.device_types is None or device_type in self.device_types) and (
            dtype is None or self.dtypes is None or dtype in self.dtypes
        )


_registry: dict[str, Backend] = {}
_choice: Optional[str] = None


def register_backend(backend: Backend) -> None:
    if backend.name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend name {backend.name!r}; expected one of {BACKEND_NAMES}")
    _registry[backend.name] = backend


def _check_name(name: Optional[str], source: str) -> Optional[str]:
    if name is None or name == "auto":
        return None
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"{source}: unknown backend {name!r}; expected 'auto' or one of {BACKEND_NAMES}"
        )
    return name


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every call (``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``), or
    return to automatic choice with ``None``/``"auto"``."""
    global _choice
    _choice = _check_name(name, "set_backend")


def get_backend() -> str:
    """The forced backend's name, or ``"auto"``."""
    return _choice or "auto"


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """``set_backend`` for the duration of a ``with`` block."""
    previous = _choice
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def available_backends(device_type: Optional[str] = None) -> list[str]:
    """Names of the registered, available backends (for ``device_type`` when given)."""
    return [
        name
        for name, backend in _registry.items()
        if backend.is_available() and (device_type is None or backend.serves(device_type))
    ]


def by_name(name: str) -> Backend:
    """A registered backend by name."""
    if name not in _registry:
        raise RuntimeError(f"transmatcher_fast: backend {name!r} is not registered here; "
                           f"registered: {sorted(_registry)}")
    return _registry[name]


def select(device: torch.device, dtype: Optional[torch.dtype] = None,
           num_pairs: Optional[int] = None) -> Backend:
    """The backend that runs a call on ``device`` with ``dtype`` inputs (float64 on a GPU, for
    instance, falls back to ``reference``). For a call of ``num_pairs`` image pairs on CUDA, the
    committed launch table (``tuning``) may name the faster backend for its shape class."""
    kind = device.type
    if _choice is not None:
        backend = _registry.get(_choice)
        if backend is None or not backend.is_available() or not backend.serves(kind, dtype):
            raise RuntimeError(
                f"transmatcher_fast: backend {_choice!r} cannot run on {kind} tensors of dtype "
                f"{dtype} here; available for {kind}: {available_backends(kind)}"
            )
        return backend
    preference = _PREFERENCE.get(kind, ())
    if kind == "cuda" and num_pairs is not None and dtype is not None:
        tf32 = dtype == torch.float32 and precision.float32_matmul_allows_tf32()
        measured = tuning.entry(num_pairs, dtype, tf32, device).get("backend")
        if measured is not None:
            preference = (measured,) + preference
    for name in preference + ("reference",):
        backend = _registry.get(name)
        if backend is not None and backend.is_available() and backend.serves(kind, dtype):
            return backend
    raise RuntimeError(f"transmatcher_fast: no backend for {kind} tensors of dtype {dtype}")


# Tests set TRANSMATCHER_FAST_POISON=1 (or poison_outputs(True)): kernels then receive outputs
# filled with NaN / -1, so an element a kernel forgets to write fails the comparison.
_poison = os.environ.get(ENV_POISON, "0") == "1"


def poison_outputs(enabled: bool) -> None:
    global _poison
    _poison = bool(enabled)


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised kernel output (poisoned when testing)."""
    if not _poison:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


try:
    set_backend(os.environ.get(ENV_BACKEND) or None)
except ValueError as error:  # a typo in the environment must not make the package unimportable
    warnings.warn(f"{ENV_BACKEND} ignored: {error}", stacklevel=2)
