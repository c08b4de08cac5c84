"""Feature extraction: a feature model over a loader, batched, under autocast on a GPU (the
feature models themselves are in ``models/``: ``matcher_features.py``, ``vit.py``, ...).

Features are kept in 16-bit or float32 on the device when they fit in a share of its free memory,
else in (pinned) host memory, and come back in dataset order with their ids and cameras.

Unreadable images (truncated or corrupt files, files that are not images, missing files) raise an
:class:`ImageReadError` naming the file. With ``skip_bad_images=True`` (:class:`CheckedImages`)
they are skipped instead: the features hold the readable images only, ``Features.indices`` says
which items they are and ``Features.skipped`` lists the ``(path, error)`` of the others, so a long
extraction does not stop at the ten-thousandth image.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from ..data.images import ImageReadError, open_image
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


SKIPPED_SHOWN = 5  # paths printed by skipped_summary


class CheckedImages(Dataset):
    """``items`` of ``(path, pid, camid)`` -> ``(transform(image), pid, camid, index)`` as
    ``data.ReidImageDataset`` gives them (the test-time case: no per-sample re-seeding), with
    images read by :func:`open_image`, so an unreadable file raises an error naming it.

    With ``skip_bad_images=True`` an unreadable file yields a :class:`BadImage` record instead;
    :func:`collate_checked` (the loader's ``collate_fn``) puts those aside, and
    :func:`extract_features` lists them in ``Features.skipped``."""

    def __init__(self, items: Sequence[Tuple[str, int, int]], transform: Optional[Callable] = None,
                 skip_bad_images: bool = False):
        self.items, self.transform, self.skip_bad_images = list(items), transform, bool(skip_bad_images)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, pid, camid = self.items[index]
        try:
            image = open_image(path)
        except ImageReadError as e:
            if not self.skip_bad_images:
                raise
            return BadImage(int(index), str(path), str(e))
        if self.transform is not None:
            image = self.transform(image)
        return image, pid, camid, index


@dataclass
class BadImage:
    """An item whose file could not be read: its position, path and the error message."""
    index: int
    path: str
    error: str


def collate_checked(samples):
    """``default_collate`` of the readable samples -> ``(images, pids, cams, indices, bad)``,
    ``bad`` the list of ``(index, path, error)`` of the unreadable ones; ``images`` etc. are
    None when the whole batch was unreadable."""
    good = [s for s in samples if not isinstance(s, BadImage)]
    bad = [(s.index, s.path, s.error) for s in samples if isinstance(s, BadImage)]
    if not good:
        return None, None, None, None, bad
    return (*default_collate(good), bad)


def checked_loader(items: Sequence[Tuple[str, int, int]], transform: Optional[Callable], batch_size: int, *,
                   num_workers: int = 2, skip_bad_images: bool = False,
                   pin_memory: Optional[bool] = None) -> DataLoader:
    """A sequential loader over :class:`CheckedImages` for extraction (dataset order, no
    shuffling, nothing dropped), batches as :func:`collate_checked` makes them."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return DataLoader(CheckedImages(items, transform, skip_bad_images), batch_size=batch_size,
                      shuffle=False, num_workers=num_workers, collate_fn=collate_checked,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory)


def skipped_summary(skipped: Sequence[Tuple[str, str]], shown: int = SKIPPED_SHOWN) -> str:
    """``"skipped 3 unreadable images: a.jpg, b.jpg, c.jpg"`` (the count, then the first
    ``shown`` paths and "..." when there are more); an empty string when nothing was skipped."""
    if not skipped:
        return ""
    paths = [str(p) for p, _ in skipped]
    more = ", ..." if len(paths) > shown else ""
    noun = "image" if len(paths) == 1 else "images"
    return f"skipped {len(paths)} unreadable {noun}: " + ", ".join(paths[:shown]) + more


@dataclass
class Features:
    """Extracted features in dataset order, with the items' ids and cameras (int64 tensors).

    ``paths``: the items' image paths when known (``evaluate.extract`` records them).
    ``indices``: the positions in the item list of the rows (None: every item, in order; set
    when unreadable images were skipped). ``skipped``: ``(path, error)`` of the items left out.
    ``provenance``: where they came from, when read from a feature file (``export.load_features``)."""
    features: Tensor
    pids: Tensor
    cams: Tensor
    paths: Optional[List[str]] = None
    indices: Optional[Tensor] = None
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    provenance: Optional[dict] = None

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
                     progress: bool = True, desc: str = "features",
                     views: Optional[Sequence[int]] = None) -> Features:
    """Run ``model`` (in eval mode; its mode is restored afterwards) over ``loader``, which yields
    ``(images, pids, cams, indices)`` as ``data.make_loader`` does, or ``(images, pids, cams,
    indices, bad)`` as :func:`checked_loader` does: the rows of the ``bad`` items (unreadable,
    skipped) are left out of the result, ``indices`` then says which items the rows are and
    ``skipped`` lists the bad ones' ``(path, error)``.

    ``amp``: autocast dtype (default bfloat16 on CUDA, none on CPU). ``storage_dtype``: dtype of the
    stored features (default: the autocast dtype, else float32). ``storage_device``: where they
    live (default: the device when they fit in half its free memory, else pinned host memory).

    A model with ``side_info`` true (TransReID with SIE) is called ``model(images,
    cam_label=cams, view_label=views)``, the views looked up in ``views`` (one per item of the
    loader's dataset; 0 when None)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    amp = parse_dtype(amp, "amp") if amp is not None else (torch.bfloat16 if device.type == "cuda" else None)
    storage_dtype = parse_dtype(storage_dtype, "storage_dtype") or amp or torch.float32
    count = len(loader.dataset)
    was_training = model.training
    model.eval()
    side_info = bool(getattr(model, "side_info", False))
    view_table = None if views is None else torch.as_tensor(list(views), dtype=torch.int64)
    store = pids = cams = None
    bad: List[Tuple[int, str, str]] = []
    try:
        for batch in tqdm(loader, desc=desc, disable=None if progress else True, leave=False):
            images, pid, cam, index = batch[:4]
            if len(batch) > 4:
                bad += batch[4]
            if images is None:  # every image of the batch was unreadable
                continue
            with autocast(device, amp):
                if side_info:
                    view = view_table[index] if view_table is not None else torch.zeros_like(cam)
                    out = model(images.to(device, non_blocking=True), cam_label=cam.to(device),
                                view_label=view.to(device))
                else:
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
        why = f" ({skipped_summary([(p, e) for _, p, e in bad])})" if bad else ""
        raise ValueError(f"{desc}: the loader yielded no images{why}")
    if not bad:
        return Features(store, pids, cams)
    bad.sort()
    keep = torch.ones(count, dtype=torch.bool)
    keep[torch.tensor([i for i, _, _ in bad], dtype=torch.int64)] = False
    indices = keep.nonzero().flatten()
    return Features(store[indices.to(store.device)], pids[indices], cams[indices], indices=indices,
                    skipped=[(p, e) for _, p, e in bad])
