"""Drawing primitives shared by the pictures (:mod:`.visualize`'s ranked lists,
:mod:`.correspondence_pictures`, :mod:`.attention_pictures`): sizes and colours, the label font,
argument checks, image loading and stacking, matplotlib colour maps (imported only when needed: an
optional dependency), and the text under a cell (values with as many digits as it takes to tell
neighbours apart, identity and camera labels)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ..data.images import open_image

ImageLike = Union[str, Path, Image.Image]

LABEL_HEIGHT = 16  # px of a text line (title, value or id under a cell, panel title, header line)
COLORBAR_HEIGHT = 10  # px of the colour strip under a correspondence panel
QUERY_COLOR = (40, 90, 230)
CORRECT_COLOR = (0, 170, 0)
WRONG_COLOR = (220, 0, 0)
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)
PANEL_GAP = 8  # px between the per-layer panels of save_correspondences
TEXT_PAD = 4  # px left of a header line of save_correspondences
KINDS = ("distance", "score")
MIN_DIGITS, MAX_DIGITS = 3, 8  # significant digits format_values starts from / stops at


# ----------------------------------------------------------------------------- small helpers

def label_font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=11)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def check_size(name: str, value: Sequence[int]) -> tuple[int, int]:
    """A (height, width) pair of positive ints."""
    try:
        h, w = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (height, width), got {value!r}") from None
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be (height, width) of positive ints, got {value!r}")
    return int(h), int(w)


def check_nonneg(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")


def check_positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be 'distance' (lower = closer) or 'score' (higher = "
                         f"closer), got {kind!r}")
    return kind


def as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def load_cell_image(image: ImageLike, size_hw: tuple[int, int]) -> Image.Image:
    """An RGB copy of ``image`` (a path or a PIL image) resized to (height, width)."""
    if isinstance(image, Image.Image):
        rgb = image.convert("RGB")
    else:  # an unreadable file raises an ImageReadError naming it
        rgb = open_image(image)
    h, w = size_hw
    return rgb.resize((w, h), Image.Resampling.BILINEAR)


def draw_centered_text(draw: ImageDraw.ImageDraw, font, text: str, x: int, width: int, y: int) -> None:
    text_w = draw.textlength(text, font=font)
    draw.text((x + max(0, (width - text_w) / 2), y + 2), text, fill=TEXT_COLOR, font=font)


def stack_images(images: Sequence[Image.Image], vertical: bool, gap: int = 0) -> Image.Image:
    """Images one after the other on a white background (left-aligned / top-aligned)."""
    gaps = gap * (len(images) - 1)
    widths, heights = [im.width for im in images], [im.height for im in images]
    size = (max(widths), sum(heights) + gaps) if vertical else (sum(widths) + gaps, max(heights))
    out = Image.new("RGB", size, BACKGROUND)
    offset = 0
    for im in images:
        out.paste(im, (0, offset) if vertical else (offset, 0))
        offset += (im.height if vertical else im.width) + gap
    return out


def get_colormap(cmap: Any):
    try:
        import matplotlib
    except ImportError as e:  # an optional dependency
        raise ImportError("transmatcher_fast.engine.visualize needs matplotlib for colour maps "
                          "and curves: pip install matplotlib") from e
    if isinstance(cmap, str):
        try:
            return matplotlib.colormaps[cmap]
        except KeyError:
            raise ValueError(f"cmap {cmap!r} is not a matplotlib colormap name") from None
    return cmap


def colormap_rgb(colormap, x: float) -> tuple[int, int, int]:
    return tuple(int(round(255 * c)) for c in colormap(float(x))[:3])

# ----------------------------------------------------------------------------- text and names

def format_values(values: Sequence[float], *, min_digits: int = MIN_DIGITS,
                  max_digits: int = MAX_DIGITS) -> list[str]:
    """The values as text in Python's general format (``g``: fixed point, or an exponent for
    very large / small values) with one number of significant digits for all of them, trailing
    zeros kept so the row reads evenly: the fewest from ``min_digits`` on at which every two
    neighbouring values that differ also read differently, at most ``max_digits`` (values
    closer than that still read alike). Equal values read alike; NaN / infinities read ``nan``
    / ``inf`` / ``-inf``.

    >>> format_values([0.12341, 0.12346])
    ['0.1234', '0.1235']
    >>> format_values([0.5, 0.25])
    ['0.500', '0.250']
    """
    check_positive(min_digits=min_digits, max_digits=max_digits)
    if min_digits > max_digits:
        raise ValueError(f"min_digits ({min_digits}) must be <= max_digits ({max_digits})")
    values = [float(v) for v in as_numpy(values).reshape(-1)]
    for digits in range(min_digits, max_digits + 1):
        texts = [_general(v, digits) for v in values]
        if all(a != b or x == y or (math.isnan(x) and math.isnan(y))
               for a, b, x, y in zip(texts, texts[1:], values, values[1:])):
            return texts
    return texts


def _general(value: float, digits: int) -> str:
    """``value`` with ``digits`` significant digits, trailing zeros kept (``100.`` -> ``100``)."""
    text = f"{value:#.{digits}g}".replace(".e", "e")
    return text[:-1] if text.endswith(".") else text


def value_labels(values: Sequence[float], kind: str = "distance") -> list[str]:
    """What ranked lists write under each gallery image: ``d=<value>`` for a distance (lower =
    closer), ``s=<value>`` for a score (higher = closer), digits from ``format_values``."""
    prefix = "d=" if check_kind(kind) == "distance" else "s="
    return [prefix + text for text in format_values(values)]


def kind_header(kind: str = "distance") -> str:
    """``"distance (lower = closer)"`` or ``"score (higher = closer)"``: what a ranked list is
    ordered by, as its title says it."""
    return "distance (lower = closer)" if check_kind(kind) == "distance" else \
        "score (higher = closer)"


def id_label(pid: Any, camid: Any, camera_base: int = 0) -> str:
    """``"pid 12 c3"``: an image's identity and camera, ``camid + camera_base`` (the dataset's
    ``camera_base``: the camera as its file names number it)."""
    return f"pid {int(pid)} c{int(camid) + camera_base}"


def padded_number(number: int, largest: int) -> str:
    """``number`` zero-padded to the digits of ``largest`` (the pictures' one zero-padding rule,
    see :mod:`.visualize`)."""
    return f"{int(number):0{len(str(max(int(largest), 0)))}d}"
