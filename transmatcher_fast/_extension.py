"""Loads the compiled extension ``transmatcher_fast._C`` (C++ CPU kernels, CUDA kernels when built).

A missing or broken extension is a warning, not an import error: the pure-PyTorch ``reference``
backend (and Triton on GPUs) still work.
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Optional

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)


def _load() -> tuple[Optional[ModuleType], str]:
    try:
        from transmatcher_fast import _C  # noqa: F401  (importing registers the kernels)
    except ImportError as error:
        return None, str(error)
    return _C, ""


extension, load_error = _load()


def has_cpu_kernels() -> bool:
    return extension is not None


def has_cuda_kernels() -> bool:
    return extension is not None and bool(getattr(extension, "WITH_CUDA", 0))


def warn_if_missing(available: list[str]) -> None:
    if extension is None:
        warnings.warn(
            "transmatcher_fast: the compiled extension transmatcher_fast._C could not be loaded "
            f"({load_error}); available backends: {', '.join(available)}. Rebuild with "
            "`pip install --no-build-isolation .` to get the C++ kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
