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

TransReID's recipe (``build_transreid_train_transform`` / ``build_transreid_test_transform``,
upstream ``datasets/make_dataloader.py``): resize bicubic, flip, pad 10 + random crop, to tensor,
normalise (0.5, 0.5), then timm's ``RandomErasing`` in pixel mode; test: resize bilinear, to
tensor, normalise. The ops DINO's multi-crop needs (``RandomResizedCrop``, ``RandomApply``,
``RandomGrayscale``, ``GaussianBlur``, ``Solarize``) are here too; ``multicrop.py`` composes them.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from .images import open_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _rng(rng: Optional[random.Random]) -> random.Random:
    return rng if rng is not None else random.Random()


def _interpolation_name(interpolation) -> str:
    try:
        return Image.Resampling(interpolation).name.lower()
    except ValueError:
        return repr(interpolation)


def _check_p(name: str, p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}: probability must lie in [0, 1], got {p}")
    return float(p)


def _rngs(transforms: Sequence[Callable]):
    """The ``rng`` of each transform, depth first, through ``.transform`` / ``.transforms``."""
    for transform in transforms:
        rng = getattr(transform, "rng", None)
        if isinstance(rng, random.Random):
            yield rng
        inner = getattr(transform, "transform", None)
        if inner is not None:
            yield from _rngs([inner])
        yield from _rngs(getattr(transform, "transforms", ()))


class Compose:
    """Applies ``transforms`` in order; ``reseed(seed)`` re-seeds all their ``rng``."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image):
        for transform in self.transforms:
            image = transform(image)
        return image

    def reseed(self, seed: int) -> None:
        """Seed every distinct ``rng`` of the transforms from ``seed`` (a DataLoader worker's seed),
        nested ones too (a ``RandomApply``'s transform, a ``Compose`` inside), in a fixed order."""
        seen: List[random.Random] = []
        for rng in _rngs(self.transforms):
            if all(rng is not r for r in seen):
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
        return (f"Resize(height={self.size[1]}, width={self.size[0]}, "
                f"interpolation={_interpolation_name(self.interpolation)})")


class Pad:
    def __init__(self, padding: int, fill: int = 0):
        self.padding, self.fill = padding, fill

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.expand(image, border=self.padding, fill=self.fill)

    def __repr__(self) -> str:
        return f"Pad(padding={self.padding}, fill={self.fill})"


class RandomCrop:
    def __init__(self, height: int, width: int, rng: Optional[random.Random] = None):
        self.height, self.width, self.rng = height, width, _rng(rng)

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if w < self.width or h < self.height:
            raise ValueError(f"RandomCrop: image {w}x{h} is smaller than the crop {self.width}x{self.height}")
        top, left = self.rng.randint(0, h - self.height), self.rng.randint(0, w - self.width)
        return image.crop((left, top, left + self.width, top + self.height))

    def __repr__(self) -> str:
        return f"RandomCrop(height={self.height}, width={self.width})"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5, rng: Optional[random.Random] = None):
        self.p, self.rng = p, _rng(rng)

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.transpose(Image.FLIP_LEFT_RIGHT) if self.rng.random() < self.p else image

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomRotation:
    """Rotation by U(-degrees, degrees) about the centre, same size, nearest, black corners
    (torchvision's defaults, which upstream uses)."""

    def __init__(self, degrees: float = 5.0, rng: Optional[random.Random] = None, fill=(0, 0, 0)):
        self.degrees, self.rng, self.fill = degrees, _rng(rng), fill

    def __call__(self, image: Image.Image) -> Image.Image:
        angle = self.rng.uniform(-self.degrees, self.degrees)
        return image.rotate(angle, resample=Image.NEAREST, expand=False, fillcolor=self.fill)

    def __repr__(self) -> str:
        return f"RandomRotation(degrees={self.degrees})"


class ColorJitter:
    """Brightness, contrast and saturation factors and a hue shift drawn uniformly from the ranges,
    applied in a random order (as torchvision does)."""

    def __init__(self, brightness=(0.5, 2.0), contrast=(0.5, 2.0), saturation=(0.5, 2.0),
                 hue=(-0.1, 0.1), rng: Optional[random.Random] = None):
        if not -0.5 <= hue[0] <= hue[1] <= 0.5:
            raise ValueError(f"ColorJitter: hue range must lie in [-0.5, 0.5], got {hue}")
        self.ranges = {"brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue}
        self.rng = _rng(rng)

    @classmethod
    def from_strengths(cls, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0,
                       hue: float = 0.0, rng: Optional[random.Random] = None) -> "ColorJitter":
        """torchvision's way to say it: a strength ``s`` means factors in [max(0, 1 - s), 1 + s]
        (hue: a shift in [-s, s]); ``from_strengths(0.4, 0.4, 0.2, 0.1)`` is DINO's jitter."""
        for name, value in (("brightness", brightness), ("contrast", contrast),
                            ("saturation", saturation), ("hue", hue)):
            if value < 0:
                raise ValueError(f"ColorJitter: {name} strength must be >= 0, got {value}")
        factor = lambda s: (max(0.0, 1.0 - s), 1.0 + s)  # noqa: E731
        return cls(factor(brightness), factor(contrast), factor(saturation), (-hue, hue), rng)

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

    def __repr__(self) -> str:
        return "ColorJitter(" + ", ".join(f"{k}={tuple(v)}" for k, v in self.ranges.items()) + ")"

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

    def __repr__(self) -> str:
        return f"RandomOcclusion(min_size={self.min_size}, max_size={self.max_size}, fill={self.fill})"


class ToTensor:
    """PIL RGB -> float32 [3, H, W] in [0, 1]."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)

    def __repr__(self) -> str:
        return "ToTensor()"


class Normalize:
    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor - self.mean) / self.std

    def __repr__(self) -> str:
        return (f"Normalize(mean={tuple(round(v, 4) for v in self.mean.flatten().tolist())}, "
                f"std={tuple(round(v, 4) for v in self.std.flatten().tolist())})")


class RandomErasing:
    """timm's ``RandomErasing`` (0.3.2, as TransReID uses it: one box), on a normalised tensor.

    With probability ``p``, up to ``max_attempts`` times: area ``a ~ U(min_area, max_area) * H*W``,
    aspect ``r = exp(U(log min_aspect, log max_aspect))`` (``max_aspect`` defaults to
    ``1 / min_aspect``), ``h = round(sqrt(a*r))``, ``w = round(sqrt(a/r))`` (both round); the first
    box with ``h < H`` and ``w < W`` (strictly, as timm) is placed at ``top ~ U{0..H-h}``,
    ``left ~ U{0..W-w}`` and filled: ``mode='pixel'`` N(0, 1) per pixel and channel, ``'rand'``
    N(0, 1) per channel, ``'const'`` zeros. If no attempt fits, nothing is erased (timm too); on
    a tiny image a side may round to 0, and the box is then empty (timm too).

    All draws come from ``rng``; the noise from a ``torch.Generator`` seeded by one draw of it, so a
    seeded erasing repeats exactly and never touches torch's global generator. The input is not
    modified (timm erases in place; a copy costs little and spares callers a surprise). A 4-D
    batch is erased image by image."""

    MODES = ("pixel", "rand", "const")

    def __init__(self, p: float = 0.5, min_area: float = 0.02, max_area: float = 1 / 3,
                 min_aspect: float = 0.3, max_aspect: Optional[float] = None, mode: str = "pixel",
                 max_attempts: int = 10, rng: Optional[random.Random] = None):
        self.p = _check_p("RandomErasing", p)
        if not 0 < min_area <= max_area <= 1:
            raise ValueError(f"RandomErasing: need 0 < min_area <= max_area <= 1, got {min_area}, {max_area}")
        if min_aspect <= 0:
            raise ValueError(f"RandomErasing: min_aspect must be > 0, got {min_aspect}")
        max_aspect = max_aspect or 1 / min_aspect
        if not min_aspect <= max_aspect:
            raise ValueError(f"RandomErasing: need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        if mode not in self.MODES:
            raise ValueError(f"RandomErasing: mode must be one of {self.MODES}, got {mode!r}")
        self.min_area, self.max_area, self.mode = min_area, max_area, mode
        self.min_aspect, self.max_aspect = min_aspect, max_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.max_attempts, self.rng = int(max_attempts), _rng(rng)

    def sample_box(self, height: int, width: int) -> Optional[Tuple[int, int, int, int]]:
        """The draw of one call: ``(top, left, h, w)``, or None when this image is not erased."""
        if self.rng.random() >= self.p:
            return None
        area = height * width
        for _ in range(self.max_attempts):
            target_area = self.rng.uniform(self.min_area, self.max_area) * area
            aspect = math.exp(self.rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < width and h < height:
                return self.rng.randint(0, height - h), self.rng.randint(0, width - w), h, w
        return None

    def _fill(self, channels: int, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        if self.mode == "const":
            return torch.zeros((channels, 1, 1), dtype=dtype)
        generator = torch.Generator().manual_seed(self.rng.getrandbits(63))
        shape = (channels, h, w) if self.mode == "pixel" else (channels, 1, 1)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)

    def _erase(self, image: torch.Tensor) -> torch.Tensor:
        channels, height, width = image.shape
        box = self.sample_box(height, width)
        if box is None:
            return image
        top, left, h, w = box
        image = image.clone()
        image[:, top:top + h, left:left + w] = self._fill(channels, h, w, image.dtype)
        return image

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 3:
            return self._erase(tensor)
        if tensor.dim() == 4:
            return torch.stack([self._erase(image) for image in tensor])
        raise ValueError(f"RandomErasing: expected a [C, H, W] or [B, C, H, W] tensor, got {tuple(tensor.shape)}")

    def __repr__(self) -> str:
        return (f"RandomErasing(p={self.p}, area=({self.min_area}, {self.max_area:.4g}), "
                f"aspect=({self.min_aspect}, {self.max_aspect:.4g}), mode={self.mode!r}, "
                f"max_attempts={self.max_attempts})")


class RandomResizedCrop:
    """torchvision's ``RandomResizedCrop`` on PIL: up to ``attempts`` times draw an area fraction
    ``s ~ U(scale)`` and an aspect ``r = w/h = exp(U(log ratio))``, ``w = round(sqrt(s*A*r))``,
    ``h = round(sqrt(s*A/r))``; the first that fits (``0 < w <= W``, ``0 < h <= H``) is placed
    uniformly. Otherwise the fallback: a centre crop of the whole image clamped to the ratio range.
    The crop is then resized to ``height x width`` (bicubic by default, as DINO asks).

    ``ratio`` is width / height of the *crop*, before the resize. torchvision's default (3/4, 4/3)
    is what DINO and TransReID-SSL use even at 256x128: a roughly square region, squeezed to 1:2.
    On a person image (W/H = 1/2) an attempt fits only when ``s * r <= 1/2`` (about 19 % of the
    draws at DINO's global scale (0.4, 1)), so about 12.5 % of the global crops end in the
    fallback (the centre W x 4W/3), and the others have ``s <= 2/3``. Pass e.g.
    ``ratio=(3/8, 2/3)`` for crops shaped like the output."""

    def __init__(self, height: int, width: int, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), interpolation=Image.BICUBIC,
                 attempts: int = 10, rng: Optional[random.Random] = None):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"RandomResizedCrop: need 0 < scale[0] <= scale[1] <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"RandomResizedCrop: need 0 < ratio[0] <= ratio[1], got {ratio}")
        self.height, self.width = int(height), int(width)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.interpolation, self.attempts, self.rng = interpolation, int(attempts), _rng(rng)

    def get_params(self, width: int, height: int) -> Tuple[int, int, int, int]:
        """``(top, left, h, w)`` of the crop in an image of ``width x height``."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(self.attempts):
            target_area = area * self.rng.uniform(*self.scale)
            aspect = math.exp(self.rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return self.rng.randint(0, height - h), self.rng.randint(0, width - w), h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image) -> Image.Image:
        top, left, h, w = self.get_params(*image.size)
        crop = image.crop((left, top, left + w, top + h))
        return crop.resize((self.width, self.height), self.interpolation)

    def __repr__(self) -> str:
        return (f"RandomResizedCrop(height={self.height}, width={self.width}, scale={self.scale}, "
                f"ratio=({self.ratio[0]:.4g}, {self.ratio[1]:.4g}), "
                f"interpolation={_interpolation_name(self.interpolation)})")


class RandomApply:
    """Apply ``transform`` with probability ``p`` (torchvision's ``RandomApply`` of one transform)."""

    def __init__(self, transform: Callable, p: float = 0.5, rng: Optional[random.Random] = None):
        self.transform, self.p, self.rng = transform, _check_p("RandomApply", p), _rng(rng)

    def __call__(self, image):
        return self.transform(image) if self.rng.random() < self.p else image

    def __repr__(self) -> str:
        return f"RandomApply({self.transform!r}, p={self.p})"


class RandomGrayscale:
    """With probability ``p``: luma (PIL's ``convert('L')``, ITU-R 601-2) copied to three channels,
    as torchvision's ``RandomGrayscale`` does for an RGB image."""

    def __init__(self, p: float = 0.1, rng: Optional[random.Random] = None):
        self.p, self.rng = _check_p("RandomGrayscale", p), _rng(rng)

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.convert("L").convert("RGB") if self.rng.random() < self.p else image

    def __repr__(self) -> str:
        return f"RandomGrayscale(p={self.p})"


class GaussianBlur:
    """DINO's ``GaussianBlur``: with probability ``p``, PIL's ``ImageFilter.GaussianBlur`` with a
    radius ~ U(radius_min, radius_max)."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0,
                 rng: Optional[random.Random] = None):
        if not 0 <= radius_min <= radius_max:
            raise ValueError(f"GaussianBlur: need 0 <= radius_min <= radius_max, got {radius_min}, {radius_max}")
        self.p, self.rng = _check_p("GaussianBlur", p), _rng(rng)
        self.radius_min, self.radius_max = radius_min, radius_max

    def get_params(self) -> Optional[float]:
        """The draw of one call: the radius, or None when this image is not blurred."""
        if self.rng.random() >= self.p:  # DINO writes `random() <= p`: the same but on a null set
            return None
        return self.rng.uniform(self.radius_min, self.radius_max)

    def __call__(self, image: Image.Image) -> Image.Image:
        radius = self.get_params()
        return image if radius is None else image.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"GaussianBlur(p={self.p}, radius=({self.radius_min}, {self.radius_max}))"


class Solarize:
    """DINO's ``Solarization``: with probability ``p``, PIL's ``ImageOps.solarize`` (every value
    at or above ``threshold`` becomes 255 - value)."""

    def __init__(self, p: float = 0.2, threshold: int = 128, rng: Optional[random.Random] = None):
        self.p, self.threshold, self.rng = _check_p("Solarize", p), int(threshold), _rng(rng)

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image, self.threshold) if self.rng.random() < self.p else image

    def __repr__(self) -> str:
        return f"Solarize(p={self.p}, threshold={self.threshold})"


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


def build_transreid_train_transform(height: int = 256, width: int = 128, *, flip_p: float = 0.5,
                                    pad: int = 10, erasing_p: float = 0.5,
                                    mean: Sequence[float] = (0.5, 0.5, 0.5),
                                    std: Sequence[float] = (0.5, 0.5, 0.5),
                                    rng: Optional[random.Random] = None) -> Compose:
    """TransReID's training augmentation (upstream ``datasets/make_dataloader.py``), in its order:
    resize bicubic (``interpolation=3``), flip, pad ``pad`` zeros, random crop back to the size, to
    tensor, normalise (the configs' 0.5 / 0.5), then timm's pixel-mode ``RandomErasing`` with
    probability ``erasing_p`` (0.5; 0.8 in the DeiT / small configs), one box, area 2-33 %, aspect
    0.3-3.3. Erasing comes after normalising, so its N(0, 1) noise is in normalised units, as
    upstream. One shared ``rng`` drives every random step."""
    rng = _rng(rng)
    steps: List[Callable] = [Resize(height, width, Image.BICUBIC), RandomHorizontalFlip(flip_p, rng)]
    if pad:
        steps += [Pad(pad), RandomCrop(height, width, rng)]
    steps += [ToTensor(), Normalize(mean, std)]
    if erasing_p > 0:
        steps.append(RandomErasing(erasing_p, mode="pixel", rng=rng))
    return Compose(steps)


def build_transreid_test_transform(height: int = 256, width: int = 128,
                                   mean: Sequence[float] = (0.5, 0.5, 0.5),
                                   std: Sequence[float] = (0.5, 0.5, 0.5)) -> Compose:
    """TransReID's test transform: resize with torchvision's default, *bilinear* (upstream's
    ``T.Resize(cfg.INPUT.SIZE_TEST)`` passes no interpolation, unlike training's bicubic), to
    tensor, normalise. No flip at test time."""
    return Compose([Resize(height, width, Image.BILINEAR), ToTensor(), Normalize(mean, std)])


def sample_seed(seed: int, stream: int, epoch: int, position: int, index: int) -> int:
    """The augmentation seed of one sample: a hash of (seed, stream, epoch, position, index), the
    same in every process (Python's ``hash`` is salted per process; this is not)."""
    key = f"{seed}:{stream}:{epoch}:{position}:{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


class SeededDataset(Dataset):
    """What a dataset needs to augment a sample as a function of (seed, stream, epoch, position,
    index): with ``seed``, a key ``(index, epoch, position)`` (what :class:`SampleKeys` yields)
    re-seeds ``self.transform`` from :func:`sample_seed` before the sample is made. ``stream``
    separates the ranks of a distributed run. A plain integer index is loaded as it is."""

    transform: Optional[Callable] = None

    def __init__(self, seed: Optional[int] = None, stream: int = 0):
        self.seed, self.stream, self.epoch = seed, stream, 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch that the next iteration of a seeded loader draws its augmentations for."""
        self.epoch = int(epoch)

    def _index(self, key) -> int:
        """The index of ``key``, after re-seeding the transform when the key asks for it."""
        if not isinstance(key, tuple):
            return key
        index, epoch, position = key
        reseed = getattr(self.transform, "reseed", None)
        if self.seed is not None and reseed is not None:
            reseed(sample_seed(self.seed, self.stream, epoch, position, index))
        return index


class ReidImageDataset(SeededDataset):
    """``items`` of (path, pid, camid) -> ``(transform(image), pid, camid, index)``.

    With ``seed``, a key ``(index, epoch, position)`` (what :class:`SampleKeys` yields) re-seeds
    the transform from :func:`sample_seed` before it runs, so the augmentation of a sample depends
    on (seed, stream, epoch, position, index) only, not on which worker loads it. ``stream``
    separates the ranks of a distributed run. A plain integer index is loaded as it is."""

    def __init__(self, items: Sequence[Tuple[str, int, int]], transform: Optional[Callable] = None, *,
                 seed: Optional[int] = None, stream: int = 0):
        super().__init__(seed, stream)
        self.items, self.transform = list(items), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        index = self._index(key)
        path, pid, camid = self.items[index]
        image = open_image(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, pid, camid, index


class SampleKeys(Sampler):
    """Wraps a sampler of indices: yields ``(index, epoch, position)``, the epoch being the
    dataset's at the start of the iteration (read in the main process, so workers that were
    forked earlier cannot see a stale one) and the position counting the samples of this
    iteration. ``len`` and ``set_epoch`` / ``state_dict`` go to the wrapped sampler."""

    def __init__(self, sampler, dataset: SeededDataset):
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


def seeded_loader(dataset: SeededDataset, batch_size: int, *, shuffle: bool = False, sampler=None,
                  num_workers: int = 2, drop_last: bool = False, seed: Optional[int] = None,
                  pin_memory: Optional[bool] = None, collate_fn: Optional[Callable] = None) -> DataLoader:
    """A DataLoader over a :class:`SeededDataset` (``dataset.seed`` should be ``seed``): with
    ``seed`` the sampler (given, or random / sequential) is wrapped in :class:`SampleKeys` and
    shuffling uses ``loader.generator``, so each sample's augmentation ignores ``num_workers``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    if seed is not None:
        if sampler is None:
            sampler = (RandomSampler(dataset, generator=generator) if shuffle
                       else SequentialSampler(dataset))
        sampler = SampleKeys(sampler, dataset)
    return DataLoader(dataset, batch_size=batch_size,
                      shuffle=shuffle if sampler is None else False, sampler=sampler,
                      num_workers=num_workers, drop_last=drop_last, collate_fn=collate_fn,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                      worker_init_fn=_reseed_worker if num_workers > 0 else None, generator=generator)


def make_loader(items, transform: Optional[Callable], batch_size: int, *, shuffle: bool = False,
                sampler=None, num_workers: int = 2, drop_last: bool = False, seed: Optional[int] = None,
                pin_memory: Optional[bool] = None, stream: int = 0) -> DataLoader:
    """A DataLoader over ``ReidImageDataset(items, transform)``; pinned memory when CUDA is there.

    ``seed`` fixes shuffling (``loader.generator``) and makes every sample's augmentation a
    function of (seed, stream, epoch, position, index) whatever ``num_workers`` is: the sampler
    is wrapped in :class:`SampleKeys` and ``loader.dataset.set_epoch(e)`` selects the epoch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    dataset = ReidImageDataset(items, transform, seed=seed, stream=stream)
    return seeded_loader(dataset, batch_size, shuffle=shuffle, sampler=sampler, num_workers=num_workers,
                         drop_last=drop_last, seed=seed, pin_memory=pin_memory)
