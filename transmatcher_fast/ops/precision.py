"""torch's float32 matmul precision setting, read the way that works with both of its APIs.

torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` ("ieee" / "tf32" / "none" =
inherit from ``torch.backends.fp32_precision``). Once it has been set, reading the legacy
``allow_tf32`` flag or ``torch.get_float32_matmul_precision()`` raises ("mix of the legacy and new
APIs"), so the new API is read first and the legacy flags only where it is unset or absent.
"""

from __future__ import annotations

import torch

_UNSET = (None, "none")


def float32_matmul_allows_tf32() -> bool:
    """Whether float32 matmuls on CUDA may use TF32 tensor cores, as torch.matmul decides."""
    setting = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if setting in _UNSET:
        setting = getattr(torch.backends, "fp32_precision", None)
    if setting not in _UNSET:
        return setting == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32
                or torch.get_float32_matmul_precision() != "highest")
