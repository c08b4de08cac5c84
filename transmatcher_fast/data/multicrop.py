"""DINO's multi-crop augmentation for person images, as TransReID-SSL pre-trains on LUPerson
(``dino/main_dino.py``, ``DataAugmentationDINO``, at 256x128 / 128x64), without torchvision.

Each image gives 2 global crops then ``local_crops`` local crops. Every crop: RandomResizedCrop
(bicubic) -> flip p 0.5 -> colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1,
random order) with p 0.8 -> grayscale p 0.2 -> Gaussian blur, radius U(0.1, 2) (p 1.0 on global
1, 0.1 on global 2, 0.5 on the locals) -> solarise p 0.2 (global 2 only) -> to tensor ->
normalise (ImageNet statistics: DINO pre-training used them; TransReID-SSL's fine-tuning uses
0.5 / 0.5, a mismatch upstream lives with).

All random steps of one :class:`MultiCropTransform` draw from its one ``rng``, crop after crop, so
``reseed(seed)`` fixes the whole list; the loader re-seeds per sample as ``make_loader`` does
(:func:`~transmatcher_fast.data.transforms.sample_seed`), so the crops do not depend on the
number of workers.

Batch layout (:class:`MultiCropCollate`): DINO's loader yields a list with one tensor per crop,
``crops[i]`` = crop ``i`` of every image of the batch, ``[B, 3, h_i, w_i]``. Its student
concatenates consecutive crops of one resolution, ``[2B, 3, 256, 128]`` and ``[8B, 3, 128, 64]``,
in that crop-major order (all images' crop 0, then all images' crop 1, ...), and ``DINOLoss``
relies on it (``output.chunk(n_crops)``). ``by_resolution=False`` gives the former (DINO's
layout: ``crops[:2]`` are the teacher's input), ``by_resolution=True`` the latter, already
concatenated; both are crop-major.
"""

from __future__ import annotations

import os
import random
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image

from .images import open_image
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, ColorJitter, Compose, GaussianBlur, Normalize,
                         RandomApply, RandomGrayscale, RandomHorizontalFlip, RandomResizedCrop,
                         SeededDataset, Solarize, ToTensor, seeded_loader)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class MultiCropTransform:
    """PIL image -> list of ``2 + local_crops`` normalised float tensors: global crop 1, global
    crop 2, then the local crops (DINO's order). Sizes are ``(height, width)``.

    ``ratio`` is the crops' width / height range before the resize; upstream keeps
    torchvision's (3/4, 4/3) at 256x128 too (see :class:`RandomResizedCrop`)."""

    def __init__(self, global_size: Tuple[int, int] = (256, 128), local_size: Tuple[int, int] = (128, 64),
                 global_scale: Tuple[float, float] = (0.4, 1.0), local_scale: Tuple[float, float] = (0.05, 0.4),
                 local_crops: int = 8, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, rng: Optional[random.Random] = None, *,
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3)):
        if local_crops < 0:
            raise ValueError(f"MultiCropTransform: local_crops must be >= 0, got {local_crops}")
        self.rng = rng if rng is not None else random.Random()
        self.global_size, self.local_size = tuple(global_size), tuple(local_size)
        self.local_crops = int(local_crops)
        rng = self.rng

        def pipeline(size, scale, blur_p, solarize_p=0.0) -> Compose:
            steps: List[Callable] = [
                RandomResizedCrop(size[0], size[1], scale, ratio, Image.BICUBIC, rng=rng),
                RandomHorizontalFlip(0.5, rng),
                RandomApply(ColorJitter.from_strengths(0.4, 0.4, 0.2, 0.1, rng=rng), 0.8, rng),
                RandomGrayscale(0.2, rng),
                GaussianBlur(blur_p, 0.1, 2.0, rng),
            ]
            if solarize_p:
                steps.append(Solarize(solarize_p, 128, rng))
            return Compose(steps + [ToTensor(), Normalize(mean, std)])

        # DINO's asymmetry: global 1 always blurred, global 2 rarely but sometimes solarised.
        self.global1 = pipeline(self.global_size, global_scale, 1.0)
        self.global2 = pipeline(self.global_size, global_scale, 0.1, 0.2)
        self.local = pipeline(self.local_size, local_scale, 0.5)

    @property
    def num_crops(self) -> int:
        return 2 + self.local_crops

    def __call__(self, image: Image.Image) -> List[torch.Tensor]:
        crops = [self.global1(image), self.global2(image)]
        crops += [self.local(image) for _ in range(self.local_crops)]
        return crops

    def reseed(self, seed: int) -> None:
        """Seed the one ``rng`` every step draws from (a seeded loader calls this per sample)."""
        self.rng.seed(seed)

    def __repr__(self) -> str:
        indent = lambda t: repr(t).replace("\n", "\n  ")  # noqa: E731
        return (f"MultiCropTransform(local_crops={self.local_crops},\n  global1={indent(self.global1)},\n"
                f"  global2={indent(self.global2)},\n  local={indent(self.local)})")


def list_images(folder: str, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                keep: Union[None, int, Sequence[str]] = None) -> List[str]:
    """The image files under ``folder`` (recursively; LUPerson is one flat folder of .jpg), in
    sorted order: folders and names sorted, so the list, and a seeded run, is the same on every
    machine (``os.walk`` order is the file system's). Extensions match case-insensitively.

    ``keep``: None for all; an int ``K`` for the first K of the sorted list; or a sequence of
    paths relative to ``folder`` (such as TransReID-SSL's CFS-ranked list, ``names[:K]``) for
    those files in that order, every one of which must be there."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder of images")
    suffixes = tuple(e.lower() for e in extensions)
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()  # in place: os.walk descends in this order
        paths += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(suffixes)]
    if not paths:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(extensions)}) in it or below it")
    if keep is None:
        return paths
    if isinstance(keep, int):
        if keep < 0:
            raise ValueError(f"list_images: keep must be >= 0, got {keep}")
        return paths[:keep]
    found = {os.path.relpath(p, folder).replace(os.sep, "/"): p for p in paths}
    wanted = [str(name).replace(os.sep, "/") for name in keep]
    missing = [name for name in wanted if name not in found]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} of the {len(wanted)} listed images are not "
                                f"there (first: {', '.join(missing[:3])})")
    return [found[name] for name in wanted]


class UnlabelledImages(SeededDataset):
    """``paths`` -> ``(transform(image), index)``: the crop list of a :class:`MultiCropTransform`
    and the index in the place of DINO's ``ImageFolder`` label, so ``for crops, _ in loader``
    reads as upstream. With ``seed``, a key ``(index, epoch, position)`` re-seeds the transform
    first (as :class:`~transmatcher_fast.data.transforms.ReidImageDataset`). An unreadable file
    raises an OSError naming it."""

    def __init__(self, paths: Sequence[str], transform: Optional[Callable] = None, *,
                 seed: Optional[int] = None, stream: int = 0):
        super().__init__(seed, stream)
        self.paths, self.transform = [str(p) for p in paths], transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        index = self._index(key)
        image = open_image(self.paths[index])
        return (self.transform(image) if self.transform is not None else image), index

    def __repr__(self) -> str:
        return f"UnlabelledImages({len(self)} images, seed={self.seed}, transform={self.transform!r})"


class MultiCropCollate:
    """Batches samples ``(crops, index)`` into ``(crops, indices)``, crop-major.

    ``by_resolution=False`` (DINO's layout): one tensor per crop, ``crops[i]`` is ``[B, 3, h, w]``
    (crop i of every image). ``by_resolution=True``: consecutive crops of one size concatenated,
    e.g. ``[2B, 3, 256, 128]`` then ``[8B, 3, 128, 64]``; rows ``k*B .. (k+1)*B - 1`` of a group are
    its k-th crop of every image, as DINO's ``MultiCropWrapper`` builds it."""

    def __init__(self, by_resolution: bool = False):
        self.by_resolution = bool(by_resolution)

    def __call__(self, batch):
        crops_per_image = [crops for crops, _ in batch]
        n = len(crops_per_image[0])
        if any(len(crops) != n for crops in crops_per_image):
            raise ValueError(f"MultiCropCollate: samples have different numbers of crops: "
                             f"{sorted({len(c) for c in crops_per_image})}")
        per_crop = [torch.stack([crops[i] for crops in crops_per_image]) for i in range(n)]
        indices = torch.tensor([index for _, index in batch], dtype=torch.int64)
        if not self.by_resolution:
            return per_crop, indices
        groups: List[List[torch.Tensor]] = []
        for crop in per_crop:
            if groups and groups[-1][0].shape[1:] == crop.shape[1:]:
                groups[-1].append(crop)
            else:
                groups.append([crop])
        return [torch.cat(group) for group in groups], indices

    def __repr__(self) -> str:
        return f"MultiCropCollate(by_resolution={self.by_resolution})"


def make_multicrop_loader(paths: Sequence[str], transform: Callable, batch_size: int,
                          seed: Optional[int] = None, num_workers: int = 2, sampler=None, *,
                          shuffle: bool = True, drop_last: bool = True, by_resolution: bool = False,
                          pin_memory: Optional[bool] = None, stream: int = 0):
    """A DataLoader over ``UnlabelledImages(paths, transform)`` yielding ``(crops, indices)`` laid
    out by :class:`MultiCropCollate` (``by_resolution``). Shuffled with ``drop_last`` by default,
    as DINO's loader. With ``seed``, shuffling is fixed and each sample's crops are a function of
    (seed, stream, epoch, position, index) whatever ``num_workers`` is; call
    ``loader.dataset.set_epoch(e)`` each epoch (and ``sampler.set_epoch(e)`` for a
    ``DistributedSampler``, with ``stream`` = rank)."""
    dataset = UnlabelledImages(paths, transform, seed=seed, stream=stream)
    return seeded_loader(dataset, batch_size, shuffle=shuffle, sampler=sampler, num_workers=num_workers,
                         drop_last=drop_last, seed=seed, pin_memory=pin_memory,
                         collate_fn=MultiCropCollate(by_resolution))
