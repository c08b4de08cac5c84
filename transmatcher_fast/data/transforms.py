"""Image transforms and loaders (PIL/numpy/torch, no torchvision).

Upstream's training augmentation, in order: resize 384x128 bicubic, pad 10 (zeros) + random crop,
horizontal flip p=0.5, rotation within +-5 deg, colour jitter (brightness/contrast/saturation in
[0.5, 2], hue in [-0.1, 0.1]), one white square of side U{1..0.8*min(H, W) - 1} pasted at a random
place (always), to tensor. Upstream normalises nothing, and the models here expect RGB in [0, 1]
like upstream's checkpoints; ImageNet normalisation is available with ``normalize=True``.

Every random transform draws from an explicit ``random.Random`` (``rng``), so a seeded one repeats
exactly; ``Compose.reseed`` re-seeds them. A seeded loader (``make_loader(seed=...)``) re-seeds the
transform before every sample from a hash of (seed, stream, epoch, position in the epoch, index), in
whichever process loads it, so a sample's augmentation does not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _rng(rng: Optional[random.Random]) -> random.Random:
    return rng if rng is not None else random.Random()


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image):
        for transform in self.transforms:
            image = transform(image)
        return image

    def reseed(self, seed: int) -> None:
        """Seed every distinct ``rng`` of the transforms from ``seed`` (a DataLoader worker's seed)."""
        seen = []
        for transform in self.transforms:
            rng = getattr(transform, "rng", None)
            if rng is not None and all(rng is not r for r in seen):
                rng.seed(seed * 1000 + len(seen))
                seen.append(rng)

    def __repr__(self) -> str:
        return "Compose(\n" + "".join(f"  {t!r},\n" for t in self.transforms) + ")"


class Resize:
    def __init__(self, height: int, width: int, interpolation=Image.BICUBIC):
        self.size, self.interpolation = (width, height), interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.resize(self.size, self.interpolation)

    def __repr__(self) -> str:
        return f"Resize(height={self.size[1]}, width={self.size[0]})"


class Pad:
    def __init__(self, padding: int, fill: int = 0):
        self.padding, self.fill = padding, fill

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.expand(image, border=self.padding, fill=self.fill)


class RandomCrop:
    def __init__(self, height: int, width: int, rng: Optional[random.Random] = None):
        self.height, self.width, self.rng = height, width, _rng(rng)

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if w < self.width or h < self.height:
            raise ValueError(f"RandomCrop: image {w}x{h} is smaller than the crop {self.width}x{self.height}")
        top, left = self.rng.randint(0, h - self.height), self.rng.randint(0, w - self.width)
        return image.crop((left, top, left + self.width, top + self.height))


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5, rng: Optional[random.Random] = None):
        self.p, self.rng = p, _rng(rng)

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.transpose(Image.FLIP_LEFT_RIGHT) if self.rng.random() < self.p else image


class RandomRotation:
    """Rotation by U(-degrees, degrees) about the centre, same size, nearest, black corners
    (torchvision's defaults, which upstream uses)."""

    def __init__(self, degrees: float = 5.0, rng: Optional[random.Random] = None, fill=(0, 0, 0)):
        self.degrees, self.rng, self.fill = degrees, _rng(rng), fill

    def __call__(self, image: Image.Image) -> Image.Image:
        angle = self.rng.uniform(-self.degrees, self.degrees)
        return image.rotate(angle, resample=Image.NEAREST, expand=False, fillcolor=self.fill)


class ColorJitter:
    """Brightness, contrast and saturation factors and a hue shift drawn uniformly from the ranges,
    applied in a random order (as torchvision does)."""

    def __init__(self, brightness=(0.5, 2.0), contrast=(0.5, 2.0), saturation=(0.5, 2.0),
                 hue=(-0.1, 0.1), rng: Optional[random.Random] = None):
        if not -0.5 <= hue[0] <= hue[1] <= 0.5:
            raise ValueError(f"ColorJitter: hue range must lie in [-0.5, 0.5], got {hue}")
        self.ranges = {"brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue}
        self.rng = _rng(rng)

    def __call__(self, image: Image.Image) -> Image.Image:
        order = list(self.ranges)
        self.rng.shuffle(order)
        for name in order:
            low, high = self.ranges[name]
            factor = self.rng.uniform(low, high)
            if name == "hue":
                image = self._shift_hue(image, factor)
            else:
                enhancer = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
                            "saturation": ImageEnhance.Color}[name]
                image = enhancer(image).enhance(factor)
        return image

    @staticmethod
    def _shift_hue(image: Image.Image, shift: float) -> Image.Image:
        step = int(shift * 255) % 256
        if step == 0:  # the HSV round trip is lossy: skip it when nothing moves
            return image
        hsv = np.array(image.convert("HSV"))
        hsv[..., 0] += np.uint8(step)  # uint8 wrap-around = hue is circular
        return Image.fromarray(hsv, "HSV").convert("RGB")


class RandomOcclusion:
    """Upstream's RandomOcclusion: always pastes one square of colour ``fill`` (white) with side
    s ~ U{max(1, min_size*S) .. max_size*S - 1}, S = min(H, W), at a uniformly random place."""

    def __init__(self, min_size: float = 0.0, max_size: float = 0.8, rng: Optional[random.Random] = None,
                 fill=(255, 255, 255)):
        if not 0 <= min_size <= max_size <= 1:
            raise ValueError(f"RandomOcclusion: need 0 <= min_size <= max_size <= 1, got {min_size}, {max_size}")
        self.min_size, self.max_size, self.rng, self.fill = min_size, max_size, _rng(rng), fill

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.max_size == 0:
            return image
        w, h = image.size
        smallest = min(h, w)
        low, high = max(1, int(smallest * self.min_size)), int(smallest * self.max_size)
        if high <= low:
            return image
        side = self.rng.randrange(low, high)
        left, top = self.rng.randrange(w - side), self.rng.randrange(h - side)
        image = image.copy()
        image.paste(self.fill, (left, top, left + side, top + side))
        return image


class ToTensor:
    """PIL RGB -> float32 [3, H, W] in [0, 1]."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


class Normalize:
    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor - self.mean) / self.std


def build_train_transform(height: int = 384, width: int = 128, rng: Optional[random.Random] = None,
                          padding: int = 10, flip: float = 0.5, degrees: float = 5.0, jitter: bool = True,
                          occlusion: float = 0.8, normalize: bool = False) -> Compose:
    """Upstream's training augmentation; one shared ``rng`` drives every random step."""
    rng = _rng(rng)
    steps: List[Callable] = [Resize(height, width)]
    if padding:
        steps += [Pad(padding), RandomCrop(height, width, rng)]
    steps += [RandomHorizontalFlip(flip, rng), RandomRotation(degrees, rng)]
    if jitter:
        steps.append(ColorJitter(rng=rng))
    steps += [RandomOcclusion(0.0, occlusion, rng), ToTensor()]
    if normalize:
        steps.append(Normalize())
    return Compose(steps)


def build_test_transform(height: int = 384, width: int = 128, normalize: bool = False) -> Compose:
    """Resize (bicubic) + to tensor (+ ImageNet normalisation when asked; upstream has none)."""
    return Compose([Resize(height, width), ToTensor()] + ([Normalize()] if normalize else []))


def sample_seed(seed: int, stream: int, epoch: int, position: int, index: int) -> int:
    """The augmentation seed of one sample: a hash of (seed, stream, epoch, position, index), the
    same in every process (Python's ``hash`` is salted per process; this is not)."""
    key = f"{seed}:{stream}:{epoch}:{position}:{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


class ReidImageDataset(Dataset):
    """``items`` of (path, pid, camid) -> ``(transform(image), pid, camid, index)``.

    With ``seed``, a key ``(index, epoch, position)`` (what :class:`SampleKeys` yields) re-seeds
    the transform from :func:`sample_seed` before it runs, so the augmentation of a sample depends
    on (seed, stream, epoch, position, index) only, not on which worker loads it. ``stream``
    separates the ranks of a distributed run. A plain integer index is loaded as it is."""

    def __init__(self, items: Sequence[Tuple[str, int, int]], transform: Optional[Callable] = None, *,
                 seed: Optional[int] = None, stream: int = 0):
        self.items, self.transform = list(items), transform
        self.seed, self.stream, self.epoch = seed, stream, 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch that the next iteration of a seeded loader draws its augmentations for."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, epoch, position = key
            reseed = getattr(self.transform, "reseed", None)
            if self.seed is not None and reseed is not None:
                reseed(sample_seed(self.seed, self.stream, epoch, position, index))
        else:
            index = key
        path, pid, camid = self.items[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (OSError, ValueError, SyntaxError, EOFError) as error:  # PIL's ways to fail
            raise OSError(f"{path}: cannot read the image ({type(error).__name__}: {error})") from error
        if self.transform is not None:
            image = self.transform(image)
        return image, pid, camid, index


class SampleKeys(Sampler):
    """Wraps a sampler of indices: yields ``(index, epoch, position)``, the epoch being the
    dataset's at the start of the iteration (read in the main process, so workers that were
    forked earlier cannot see a stale one) and the position counting the samples of this
    iteration. ``len`` and ``set_epoch`` / ``state_dict`` go to the wrapped sampler."""

    def __init__(self, sampler, dataset: ReidImageDataset):
        self.sampler, self.dataset = sampler, dataset

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        epoch = self.dataset.epoch
        for position, index in enumerate(self.sampler):
            yield int(index), epoch, position

    def __getattr__(self, name):
        if name in ("sampler", "dataset"):  # not yet set (unpickling)
            raise AttributeError(name)
        return getattr(self.sampler, name)


def _reseed_worker(worker_id: int) -> None:
    """Workers start with copies of one transform state: give each its own stream, derived from
    the loader's seed, so augmentations differ across workers and epochs yet repeat run to run.
    (A seeded loader re-seeds per sample anyway; this covers unseeded ones.)"""
    info = torch.utils.data.get_worker_info()
    reseed = getattr(info.dataset.transform, "reseed", None)
    if reseed is not None:
        reseed(info.seed)


def make_loader(items, transform: Optional[Callable], batch_size: int, *, shuffle: bool = False,
                sampler=None, num_workers: int = 2, drop_last: bool = False, seed: Optional[int] = None,
                pin_memory: Optional[bool] = None, stream: int = 0) -> DataLoader:
    """A DataLoader over ``ReidImageDataset(items, transform)``; pinned memory when CUDA is there.

    ``seed`` fixes shuffling (``loader.generator``) and makes every sample's augmentation a
    function of (seed, stream, epoch, position, index) whatever ``num_workers`` is: the sampler
    is wrapped in :class:`SampleKeys` and ``loader.dataset.set_epoch(e)`` selects the epoch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    dataset = ReidImageDataset(items, transform, seed=seed, stream=stream)
    if seed is not None:
        if sampler is None:
            sampler = (RandomSampler(dataset, generator=generator) if shuffle
                       else SequentialSampler(dataset))
        sampler = SampleKeys(sampler, dataset)
    return DataLoader(dataset, batch_size=batch_size,
                      shuffle=shuffle if sampler is None else False, sampler=sampler,
                      num_workers=num_workers, drop_last=drop_last,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                      worker_init_fn=_reseed_worker if num_workers > 0 else None, generator=generator)
