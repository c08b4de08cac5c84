"""Feature extraction: a feature model over a loader, batched, under autocast on a GPU.

Features are kept in 16-bit or float32 on the device when they fit in a share of its free memory,
else in (pinned) host memory, and come back in dataset order with their ids and cameras.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..models import memory

# Share of the device's free memory the stored features may take; the rest is left for matching.
FEATURE_MEMORY_SHARE = 0.5
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(value: Union[str, torch.dtype, None], name: str = "dtype") -> Optional[torch.dtype]:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16`` -> ``torch.bfloat16``; None/"none" -> None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if str(value).lower() in ("none", "off", "no"):
        return None
    try:
        return DTYPES[str(value).lower()]
    except KeyError:
        raise ValueError(f"{name} must be one of {sorted(DTYPES)} or none, got {value!r}") from None


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` for a 16-bit ``dtype``, a no-op context for None/float32."""
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@dataclass
class Features:
    """Extracted features in dataset order, with the items' ids and cameras (int64 tensors)."""
    features: Tensor
    pids: Tensor
    cams: Tensor

    def __len__(self) -> int:
        return self.features.shape[0]


def _storage_device(device: torch.device, total_bytes: int) -> torch.device:
    if device.type == "cuda" and total_bytes <= FEATURE_MEMORY_SHARE * memory.free_bytes(device):
        return device
    return torch.device("cpu")


@torch.no_grad()
def extract_features(model: nn.Module, loader, *, device: Union[str, torch.device, None] = None,
                     amp: Union[str, torch.dtype, None] = None,
                     storage_dtype: Union[str, torch.dtype, None] = None,
                     storage_device: Union[str, torch.device, None] = None,
                     progress: bool = True, desc: str = "features") -> Features:
    """Run ``model`` (in eval mode; its mode is restored afterwards) over ``loader``, which yields
    ``(images, pids, cams, indices)`` as ``data.make_loader`` does.

    ``amp``: autocast dtype (default bfloat16 on CUDA, none on CPU). ``storage_dtype``: dtype of the
    stored features (default: the autocast dtype, else float32). ``storage_device``: where they
    live (default: the device when they fit in half its free memory, else pinned host memory)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    amp = parse_dtype(amp, "amp") if amp is not None else (torch.bfloat16 if device.type == "cuda" else None)
    storage_dtype = parse_dtype(storage_dtype, "storage_dtype") or amp or torch.float32
    count = len(loader.dataset)
    was_training = model.training
    model.eval()
    store = pids = cams = None
    try:
        for images, pid, cam, index in tqdm(loader, desc=desc, disable=None if progress else True, leave=False):
            with autocast(device, amp):
                out = model(images.to(device, non_blocking=True))
            if store is None:  # the first batch tells the per-image shape
                per_image = out[0].numel() * torch.finfo(storage_dtype).bits // 8
                where = (torch.device(storage_device) if storage_device is not None
                         else _storage_device(device, count * per_image))
                store = torch.empty((count,) + tuple(out.shape[1:]), dtype=storage_dtype, device=where,
                                    pin_memory=where.type == "cpu" and torch.cuda.is_available())
                pids = torch.empty(count, dtype=torch.int64)
                cams = torch.empty(count, dtype=torch.int64)
            store[index.to(store.device)] = out.to(store.device, storage_dtype)
            pids[index], cams[index] = pid, cam
    finally:
        model.train(was_training)
    if store is None:
        raise ValueError(f"{desc}: the loader yielded no images")
    return Features(store, pids, cams)
