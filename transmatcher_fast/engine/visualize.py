"""Pictures for people who train and evaluate matchers: ranked lists, local correspondences and
training curves.

- ``ranked_list_image`` / ``save_ranked_lists``: a query and its nearest gallery images, framed
  green (same identity) or red, after removing same-identity-same-camera gallery images as the
  Market-1501 protocol does (``rank_gallery``); under each image its distance ("d=...", lower
  is closer) or score ("s=...", higher is closer; ``kind``) with as many digits as it takes for
  neighbouring values to read differently (``format_values``), and its pid and camera
  ("pid 12 c3", the camera as the dataset's file names number it: ``camera_base``); the overview
  of many queries is paginated.
- ``correspondences`` / ``correspondence_image`` / ``save_correspondences``: which gallery
  location each probe location matched, read from the argmax indices of ``max_sim`` computed
  exactly as the matcher scores the pair (so the picture shows what the score is made of); one
  panel per decoder layer ("layer n"; QAConv: one panel, "QAConv"), a header with the pair's
  score, same / different identity and the probe's and gallery image's labels, and under each
  panel a colour bar from its lowest to its highest location score.
- ``plot_training_curves``: loss, accuracy, learning rate (and mAP / rank-k when evaluated) from
  the trainer's JSON-lines log, against the global step, titled with the run's name.

File names (every writer here and in ``engine.demo`` uses them; ``*_name`` functions make them):

- ``ranked_q<query index>_pid<pid>.png``: one query's ranked list (``ranked_list_name``);
- ``ranked_lists.png``, or ``ranked_lists_<page>.png`` (page from 1) when the overview takes
  more than one page (``overview_name``);
- ``correspondence_q<query index>_pid<pid>_g<gallery index>_pid<pid>.png``: one probe /
  gallery pair (``correspondence_name``);
- ``training_curve.png`` (``TRAINING_CURVE_NAME``).

Indices are positions in the query / gallery list (from 0), pages count from 1. One
zero-padding rule for every such counter: it is padded to the number of digits of the largest
value it takes in that run (query indices of 1,000 queries: ``000``..``999``; 12 pages:
``01``..``12``), so that names sort in order. Pids are written as they are (no padding).

Image grids use Pillow; colour maps and curves use matplotlib, imported only when needed (it is
an optional dependency) and only through its object API with the Agg canvas, so a caller's
interactive backend is never switched.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ..models import QAConv, TransMatcher
from ..ops import max_sim
from ..data.images import open_image

__all__ = [
    "LABEL_HEIGHT",
    "COLORBAR_HEIGHT",
    "OVERVIEW_ROWS_PER_PAGE",
    "TRAINING_CURVE_NAME",
    "QUERY_COLOR",
    "CORRECT_COLOR",
    "WRONG_COLOR",
    "format_values",
    "value_labels",
    "kind_header",
    "id_label",
    "ranked_list_name",
    "overview_name",
    "correspondence_name",
    "ranked_list_image",
    "rank_gallery",
    "save_ranked_lists",
    "correspondences",
    "score_range",
    "colorbar_image",
    "correspondence_header",
    "correspondence_image",
    "save_correspondences",
    "run_name",
    "training_curve_series",
    "plot_training_curves",
]

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
OVERVIEW_ROWS_PER_PAGE = 50  # ranked-list rows per overview page of save_ranked_lists
TRAINING_CURVE_NAME = "training_curve.png"
KINDS = ("distance", "score")
MIN_DIGITS, MAX_DIGITS = 3, 8  # significant digits format_values starts from / stops at


# ----------------------------------------------------------------------------- small helpers

def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=11)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _check_size(name: str, value: Sequence[int]) -> tuple[int, int]:
    """A (height, width) pair of positive ints."""
    try:
        h, w = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (height, width), got {value!r}") from None
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be (height, width) of positive ints, got {value!r}")
    return int(h), int(w)


def _check_nonneg(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be 'distance' (lower = closer) or 'score' (higher = "
                         f"closer), got {kind!r}")
    return kind


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _load_image(image: ImageLike, size_hw: tuple[int, int]) -> Image.Image:
    """An RGB copy of ``image`` (a path or a PIL image) resized to (height, width)."""
    if isinstance(image, Image.Image):
        rgb = image.convert("RGB")
    else:  # an unreadable file raises an ImageReadError naming it
        rgb = open_image(image)
    h, w = size_hw
    return rgb.resize((w, h), Image.Resampling.BILINEAR)


def _centered_text(draw: ImageDraw.ImageDraw, font, text: str, x: int, width: int, y: int) -> None:
    text_w = draw.textlength(text, font=font)
    draw.text((x + max(0, (width - text_w) / 2), y + 2), text, fill=TEXT_COLOR, font=font)


def _stack(images: Sequence[Image.Image], vertical: bool, gap: int = 0) -> Image.Image:
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


def _colormap(cmap: Any):
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


def _rgb(colormap, x: float) -> tuple[int, int, int]:
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
    _check_positive(min_digits=min_digits, max_digits=max_digits)
    if min_digits > max_digits:
        raise ValueError(f"min_digits ({min_digits}) must be <= max_digits ({max_digits})")
    values = [float(v) for v in _to_numpy(values).reshape(-1)]
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
    prefix = "d=" if _check_kind(kind) == "distance" else "s="
    return [prefix + text for text in format_values(values)]


def kind_header(kind: str = "distance") -> str:
    """``"distance (lower = closer)"`` or ``"score (higher = closer)"``: what a ranked list is
    ordered by, as its title says it."""
    return "distance (lower = closer)" if _check_kind(kind) == "distance" else \
        "score (higher = closer)"


def id_label(pid: Any, camid: Any, camera_base: int = 0) -> str:
    """``"pid 12 c3"``: an image's identity and camera, ``camid + camera_base`` (the dataset's
    ``camera_base``: the camera as its file names number it)."""
    return f"pid {int(pid)} c{int(camid) + camera_base}"


def _padded(number: int, largest: int) -> str:
    """``number`` zero-padded to the digits of ``largest`` (the module's one padding rule)."""
    return f"{int(number):0{len(str(max(int(largest), 0)))}d}"


def ranked_list_name(query_index: int, pid: Any, num_query: int) -> str:
    """``ranked_q<query index>_pid<pid>.png``; the index padded to the digits of
    ``num_query - 1``."""
    return f"ranked_q{_padded(query_index, num_query - 1)}_pid{int(pid)}.png"


def overview_name(page: int, num_pages: int) -> str:
    """``ranked_lists.png`` for a one-page overview, else ``ranked_lists_<page>.png`` with
    ``page`` from 1, padded to the digits of ``num_pages``."""
    if num_pages == 1:
        return "ranked_lists.png"
    return f"ranked_lists_{_padded(page, num_pages)}.png"


def correspondence_name(query_index: int, query_pid: Any, gallery_index: int, gallery_pid: Any,
                        num_query: int, num_gallery: int) -> str:
    """``correspondence_q<query index>_pid<pid>_g<gallery index>_pid<pid>.png``; the indices
    padded to the digits of ``num_query - 1`` / ``num_gallery - 1``."""
    return (f"correspondence_q{_padded(query_index, num_query - 1)}_pid{int(query_pid)}"
            f"_g{_padded(gallery_index, num_gallery - 1)}_pid{int(gallery_pid)}.png")


# ----------------------------------------------------------------------------- ranked lists

def ranked_list_image(query_path: ImageLike, gallery_paths: Sequence[ImageLike],
                      correct: Sequence[bool], *, values: Optional[Sequence[float]] = None,
                      kind: str = "distance", distances: Optional[Sequence[float]] = None,
                      query_label: Optional[str] = None,
                      gallery_labels: Optional[Sequence[str]] = None,
                      title: Optional[str] = None, cell: tuple[int, int] = (128, 64),
                      pad: int = 4, border: int = 3) -> Image.Image:
    """One row: the query (blue frame), a gap, then the ranked gallery images framed green
    (``correct``) or red. Under the images, one text line each when given:

    - ``values``: each gallery image's distance (``kind="distance"``, written ``d=...``) or
      score (``kind="score"``, ``s=...``), digits from ``format_values``; "query" under the
      query. ``distances=`` is the same as ``values=`` (the older name);
    - ``gallery_labels`` / ``query_label``: e.g. ``id_label(pid, camid)`` = "pid 12 c3".

    ``cell`` is the (height, width) every image is resized to; the frame of ``border`` px goes
    around it, so a tile is ``(cell_h + 2*border, cell_w + 2*border)``. With ``k`` gallery images
    and ``tile_w``/``tile_h`` the tile size the picture is

        width  = 2*pad + tile_w + (4*pad + k*tile_w + (k-1)*pad  if k else 0)
        height = 2*pad + tile_h + LABEL_HEIGHT * ((title given) + (values given)
                                                  + (gallery_labels or query_label given))
    """
    cell_h, cell_w = _check_size("cell", cell)
    _check_nonneg(pad=pad, border=border)
    _check_kind(kind)
    if distances is not None:
        if values is not None:
            raise ValueError("give values or distances (the same thing), not both")
        values = distances
    gallery_paths, correct = list(gallery_paths), [bool(c) for c in correct]
    if len(gallery_paths) != len(correct):
        raise ValueError(f"gallery_paths and correct must have the same length, got "
                         f"{len(gallery_paths)} and {len(correct)}")
    if values is not None:
        values = [float(d) for d in _to_numpy(values).reshape(-1)]
        if len(values) != len(gallery_paths):
            raise ValueError(f"values (distances) must have one value per gallery image, got "
                             f"{len(values)} for {len(gallery_paths)} images")
    if gallery_labels is not None:
        gallery_labels = [str(label) for label in gallery_labels]
        if len(gallery_labels) != len(gallery_paths):
            raise ValueError(f"gallery_labels must have one label per gallery image, got "
                             f"{len(gallery_labels)} for {len(gallery_paths)} images")
    with_ids = gallery_labels is not None or query_label is not None
    k = len(gallery_paths)
    tile_w, tile_h = cell_w + 2 * border, cell_h + 2 * border
    gap = 4 * pad
    width = 2 * pad + tile_w + (gap + k * tile_w + (k - 1) * pad if k else 0)
    top = pad + (LABEL_HEIGHT if title is not None else 0)
    height = (top + tile_h + LABEL_HEIGHT * ((values is not None) + with_ids) + pad)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    if title is not None:
        draw.text((pad, pad + 2), title, fill=TEXT_COLOR, font=font)
    texts = value_labels(values, kind) if values is not None else None

    def tile(image: ImageLike, x: int, color: tuple[int, int, int],
             lines: Sequence[Optional[str]]) -> None:
        draw.rectangle([x, top, x + tile_w - 1, top + tile_h - 1], fill=color)
        canvas.paste(_load_image(image, (cell_h, cell_w)), (x + border, top + border))
        for n, line in enumerate(lines):
            if line:
                _centered_text(draw, font, line, x, tile_w, top + tile_h + n * LABEL_HEIGHT)

    def lines(value: Optional[str], label: Optional[str]) -> list[Optional[str]]:
        return ([value] if values is not None else []) + ([label] if with_ids else [])

    tile(query_path, pad, QUERY_COLOR, lines("query", query_label))
    for i, (path, ok) in enumerate(zip(gallery_paths, correct)):
        x = pad + tile_w + gap + i * (tile_w + pad)
        tile(path, x, CORRECT_COLOR if ok else WRONG_COLOR,
             lines(None if texts is None else texts[i],
                   None if gallery_labels is None else gallery_labels[i]))
    return canvas


def rank_gallery(distances: Any, query_pid: int, query_camid: int, gallery_pids: Any,
                 gallery_camids: Any, *, indices: Any = None, topk: int = 10,
                 kind: str = "distance") -> np.ndarray:
    """Gallery indices of the ``topk`` nearest images (lowest distance first; with
    ``kind="score"`` the values are scores and the highest comes first), without the gallery
    images of the query's identity taken by the query's camera (the Market-1501 protocol: they
    are too easy to count).

    ``distances`` is one query's dense row ``[Ng]``; or, with ``indices``, the distances ``[k]``
    of the candidates ``indices [k]`` (a top-k pair; negative indices are padding and dropped).
    Equal values keep the lower gallery index first (a stable sort), so the list is
    reproducible. NaN values sort last.
    """
    _check_positive(topk=topk)
    _check_kind(kind)
    gallery_pids = _to_numpy(gallery_pids).reshape(-1)
    gallery_camids = _to_numpy(gallery_camids).reshape(-1)
    if gallery_pids.shape != gallery_camids.shape:
        raise ValueError(f"gallery_pids and gallery_camids must have the same length, got "
                         f"{gallery_pids.shape[0]} and {gallery_camids.shape[0]}")
    num_gallery = gallery_pids.shape[0]
    dist = _to_numpy(distances).astype(np.float64, copy=False)
    if dist.ndim != 1:
        raise ValueError(f"distances must be one query's row (1-D), got shape {dist.shape}")
    if indices is None:
        if dist.shape[0] != num_gallery:
            raise ValueError(f"distances must have one value per gallery item ({num_gallery}), "
                             f"got shape {dist.shape}")
        candidates = np.arange(num_gallery)
    else:
        candidates = _to_numpy(indices).astype(np.int64).reshape(-1)
        if candidates.shape != dist.shape:
            raise ValueError(f"indices must match distances, got shapes {candidates.shape} and "
                             f"{dist.shape}")
        if (candidates >= num_gallery).any():
            raise ValueError(f"indices must be < the gallery size {num_gallery}, got "
                             f"{int(candidates.max())}")
        keep = candidates >= 0
        candidates, dist = candidates[keep], dist[keep]
        # Stable over (distance, gallery index), whatever order the candidates came in.
        by_index = np.argsort(candidates, kind="stable")
        candidates, dist = candidates[by_index], dist[by_index]
    valid = ~((gallery_pids[candidates] == query_pid) & (gallery_camids[candidates] == query_camid))
    candidates, dist = candidates[valid], dist[valid]
    order = np.argsort(dist if kind == "distance" else -dist, kind="stable")  # NaN stays last
    return candidates[order[:topk]]


def _split_dist(dist_or_topk: Any, num_query: int, num_gallery: int):
    """(dense [Nq, Ng], None) or (topk_dist [Nq, k], topk_index [Nq, k])."""
    if isinstance(dist_or_topk, tuple):
        if len(dist_or_topk) != 2:
            raise ValueError(f"dist_or_topk as a tuple must be (topk_dist, topk_index), got "
                             f"{len(dist_or_topk)} items")
        dist, index = (_to_numpy(a) for a in dist_or_topk)
        if dist.ndim != 2 or dist.shape != index.shape or dist.shape[0] != num_query:
            raise ValueError(f"dist_or_topk = (topk_dist, topk_index) must both be [Nq, k] with "
                             f"Nq = {num_query}, got shapes {dist.shape} and {index.shape}")
        return dist, index
    dist = _to_numpy(dist_or_topk)
    if dist.shape != (num_query, num_gallery):
        raise ValueError(f"dist_or_topk must be a dense [Nq, Ng] = [{num_query}, {num_gallery}] "
                         f"distance array or a (topk_dist, topk_index) tuple, got shape "
                         f"{dist.shape}")
    return dist, None


def picked_queries(num_query: int, num_queries: int, seed: int = 0) -> list:
    """The query indices :func:`save_ranked_lists` draws (``num_queries`` of ``num_query`` at
    random from ``seed``, in order), so other pictures can show the same queries."""
    return sorted(random.Random(seed).sample(range(num_query), min(num_queries, num_query)))


def save_ranked_lists(out_dir: Union[str, Path], query_items: Sequence[Sequence[Any]],
                      gallery_items: Sequence[Sequence[Any]], dist_or_topk: Any, *,
                      num_queries: int = 8, topk: int = 10, seed: int = 0,
                      kind: str = "distance", show_distances: bool = True,
                      show_ids: bool = True, cell: tuple[int, int] = (128, 64),
                      pad: int = 4, border: int = 3,
                      rows_per_page: int = OVERVIEW_ROWS_PER_PAGE,
                      camera_base: int = 0) -> list[Path]:
    """Ranked-list pictures of ``num_queries`` queries picked at random (``seed``, so the same
    queries come back run after run and models can be compared).

    ``query_items`` / ``gallery_items`` are ``(path, pid, camid)`` as the datasets give them;
    ``dist_or_topk`` is a dense ``[Nq, Ng]`` array or a tuple ``(topk_values [Nq, k],
    topk_index [Nq, k])`` of distances (``kind="distance"``, lower = closer: what
    ``evaluate`` gives) or matcher scores (``kind="score"``, higher = closer). Each row's title
    names the query (index, pid, camera) and what the numbers are; under each image its value
    (``show_distances``) and its pid and camera (``show_ids``). Cameras are shown as
    ``camid + camera_base`` (the dataset's ``camera_base``).

    Writes ``ranked_q<i>_pid<pid>.png`` per picked query (``i`` its index in ``query_items``;
    see the module docstring for the names) and an overview with the rows stacked, paginated
    at ``rows_per_page`` rows (default 50: 830 x 9,500 px with the default cell and topk=10):
    ``ranked_lists.png`` when the picked queries fit one page, else ``ranked_lists_<p>.png``
    for p = 1, 2, ..., each page in query order. Only one page of rows is held in memory at a
    time. Returns the per-query paths in query order, then the overview page paths in order.
    """
    _check_positive(num_queries=num_queries, topk=topk, rows_per_page=rows_per_page)
    _check_kind(kind)
    num_query, num_gallery = len(query_items), len(gallery_items)
    if num_query == 0:
        raise ValueError("query_items is empty: there is no query to draw")
    dist, index = _split_dist(dist_or_topk, num_query, num_gallery)
    gallery_pids = np.array([int(item[1]) for item in gallery_items], dtype=np.int64)
    gallery_camids = np.array([int(item[2]) for item in gallery_items], dtype=np.int64)
    picked = picked_queries(num_query, num_queries, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_pages = math.ceil(len(picked) / rows_per_page)
    paths, pages, rows = [], [], []

    def flush() -> None:
        path = out_dir / overview_name(len(pages) + 1, num_pages)
        _stack(rows, vertical=True).save(path)
        pages.append(path)
        rows.clear()

    for qi in picked:
        q_path, q_pid, q_cam = query_items[qi][:3]
        ranked = rank_gallery(dist[qi], int(q_pid), int(q_cam), gallery_pids, gallery_camids,
                              indices=None if index is None else index[qi], topk=topk, kind=kind)
        if index is None:
            shown = dist[qi][ranked]
        else:  # the value that came with each candidate
            lookup = dict(zip(index[qi].tolist(), dist[qi].tolist()))
            shown = [lookup[g] for g in ranked.tolist()]
        row = ranked_list_image(
            q_path, [gallery_items[g][0] for g in ranked],
            [int(gallery_pids[g]) == int(q_pid) for g in ranked],
            values=shown if show_distances else None, kind=kind,
            query_label=id_label(q_pid, q_cam, camera_base) if show_ids else None,
            gallery_labels=([id_label(gallery_pids[g], gallery_camids[g], camera_base) for g in ranked]
                            if show_ids else None),
            title=f"query {qi}  {id_label(q_pid, q_cam, camera_base)}  -  ranked by {kind_header(kind)}",
            cell=cell, pad=pad, border=border)
        path = out_dir / ranked_list_name(qi, q_pid, num_query)
        row.save(path)
        paths.append(path)
        rows.append(row)
        if len(rows) == rows_per_page:
            flush()
    if rows:
        flush()
    return paths + pages


# ----------------------------------------------------------------------------- correspondences

def _check_pair_features(probe: Tensor, gallery: Tensor, expected: str) -> None:
    for name, t in (("probe_features", probe), ("gallery_features", gallery)):
        if not isinstance(t, Tensor) or t.dim() != 4 or t.shape[0] != 1:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be one image's features {expected}, got {shape}")
    if probe.shape != gallery.shape:
        raise ValueError(f"probe_features and gallery_features must have the same shape "
                         f"{expected}, got {tuple(probe.shape)} and {tuple(gallery.shape)}")


def _match_dict(q_best: Tensor, g_best: Tensor, q_index: Tensor, g_index: Tensor,
                height: int, width: int, matcher: str, layer: Optional[int]) -> dict:
    return {"q_index": q_index[0, 0].cpu().numpy().astype(np.int64),
            "q_best": q_best[0, 0].float().cpu().numpy(),
            "g_index": g_index[0, 0].cpu().numpy().astype(np.int64),
            "g_best": g_best[0, 0].float().cpu().numpy(),
            "height": int(height), "width": int(width),
            "matcher": matcher, "layer": layer,
            "label": "QAConv" if layer is None else f"layer {layer}"}


def draws_correspondences(matcher: Any) -> bool:
    """Whether :func:`correspondences` can draw ``matcher`` (a fused TransMatcher or QAConv)."""
    return isinstance(matcher, (TransMatcher, QAConv))


def correspondences(matcher: Union[TransMatcher, QAConv], probe_features: Tensor,
                    gallery_features: Tensor) -> list[dict]:
    """Per decoder layer (QAConv: one), where each location of one probe image found its best
    match in one gallery image: the argmax indices of ``max_sim`` on the features projected
    exactly as the matcher scores them (TransMatcher: ``layer.project`` of each level, gated by
    ``sigmoid(layer.score_embed)``; QAConv: no projection, no gate).

    Features are one image each, shaped as the matcher takes them: TransMatcher
    ``[1, h, w, N*d_model]`` channels-last, QAConv ``[1, C, h, w]``. Returns one dict per layer
    with numpy arrays ``q_index`` / ``q_best`` ``[L]`` (best gallery location and its score per
    probe location), ``g_index`` / ``g_best`` ``[L]`` (best probe location per gallery location),
    the grid ``height`` / ``width`` (location ``l`` is row ``l // width``, column
    ``l % width``), and what made it: ``matcher`` ("TransMatcher" or "QAConv"), ``layer`` (the
    decoder layer from 1; None for QAConv) and ``label``, the panel title ("layer n" or
    "QAConv"). Runs in eval mode under ``no_grad``; every module's mode is restored.
    """
    if isinstance(matcher, TransMatcher):
        decoder = matcher.decoder
        expected = (f"[1, h, w, num_layers * d_model] = [1, h, w, {decoder.num_layers} * "
                    f"{matcher.d_model}] with h*w = seq_len = {matcher.seq_len}")
        _check_pair_features(probe_features, gallery_features, expected)
        _, h, w, c = probe_features.shape
        if h * w != matcher.seq_len or c != decoder.num_layers * matcher.d_model:
            raise ValueError(f"probe_features and gallery_features must be {expected}, got "
                             f"{tuple(probe_features.shape)}")
    elif isinstance(matcher, QAConv):
        expected = (f"[1, num_features, height, width] = [1, {matcher.num_features}, "
                    f"{matcher.height}, {matcher.width}]")
        _check_pair_features(probe_features, gallery_features, expected)
        if tuple(probe_features.shape[1:]) != (matcher.num_features, matcher.height, matcher.width):
            raise ValueError(f"probe_features and gallery_features must be {expected}, got "
                             f"{tuple(probe_features.shape)}")
        h, w = matcher.height, matcher.width
    else:
        raise TypeError(f"matcher must be a transmatcher_fast TransMatcher or QAConv, got "
                        f"{type(matcher).__name__}")

    modes = {m: m.training for m in matcher.modules()}
    matcher.eval()
    try:
        with torch.no_grad():
            if isinstance(matcher, QAConv):
                p = matcher._locations(probe_features, "probe_features")
                g = matcher._locations(gallery_features, "gallery_features")
                return [_match_dict(*max_sim(p, g, None, return_indices=True), h, w,
                                    "QAConv", None)]
            matches = []
            probe_parts = decoder.split(probe_features, "probe_features")
            gallery_parts = decoder.split(gallery_features, "gallery_features")
            for n, (layer, p, g) in enumerate(zip(decoder.layers, probe_parts, gallery_parts),
                                              start=1):
                pp = layer.project(p, "probe_features")
                gp = layer.project(g, "gallery_features")
                gate = layer.score_embed.view(layer.seq_len, layer.seq_len)
                matches.append(_match_dict(*max_sim(pp, gp, gate, return_indices=True), h, w,
                                           "TransMatcher", n))
            return matches
    finally:
        for module, mode in modes.items():
            module.training = mode


def _check_match(match: dict) -> tuple[int, int]:
    keys = ("q_index", "q_best", "g_index", "g_best", "height", "width")
    missing = [k for k in keys if k not in match]
    if missing:
        raise ValueError(f"match is missing {missing} (use correspondences(...) to make it)")
    h, w = int(match["height"]), int(match["width"])
    if h < 1 or w < 1:
        raise ValueError(f"match height/width must be positive, got {h} x {w}")
    for key in ("q_index", "q_best", "g_index", "g_best"):
        shape = _to_numpy(match[key]).shape
        if shape != (h * w,):
            raise ValueError(f"match[{key!r}] must be [height*width] = [{h * w}], got {shape}")
    return h, w


def _check_direction(direction: str) -> str:
    if direction not in ("probe", "gallery"):
        raise ValueError(f"direction must be 'probe' or 'gallery', got {direction!r}")
    return direction


def score_range(match: dict, direction: str = "probe") -> Optional[tuple[float, float]]:
    """``(lowest, highest)`` finite location score of one direction of a match (``q_best``
    for ``"probe"``, ``g_best`` for ``"gallery"``): the range ``correspondence_image``'s
    colours span (lowest = the colour map's first colour, highest = its last). None when no
    score is finite."""
    _check_direction(direction)
    _check_match(match)
    score = _to_numpy(match["q_best" if direction == "probe" else "g_best"]).astype(np.float64)
    finite = score[np.isfinite(score)]
    if finite.size == 0:
        return None
    return float(finite.min()), float(finite.max())


def colorbar_image(width: int, value_range: Optional[tuple[float, float]], *,
                   cmap: Any = "viridis", caption: str = "location score") -> Image.Image:
    """A colour bar ``width`` px wide: a strip of ``COLORBAR_HEIGHT`` px running through
    ``cmap`` from its first colour (column 0) to its last (column ``width - 1``), over a text
    line (``LABEL_HEIGHT`` px) with the lowest value of ``value_range`` at the left, the
    ``caption`` in the middle and the highest at the right (both from ``format_values``, so
    they differ when the values do). ``value_range=None`` (no finite score): a grey strip and
    "no finite scores". The picture is ``(width, COLORBAR_HEIGHT + LABEL_HEIGHT)``."""
    _check_positive(width=width)
    colormap = _colormap(cmap)
    bar = Image.new("RGB", (width, COLORBAR_HEIGHT + LABEL_HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(bar)
    font = _font()
    if value_range is None:
        draw.rectangle([0, 0, width - 1, COLORBAR_HEIGHT - 1], fill=(160, 160, 160))
        _centered_text(draw, font, "no finite scores", 0, width, COLORBAR_HEIGHT)
        return bar
    for x in range(width):
        draw.line([(x, 0), (x, COLORBAR_HEIGHT - 1)],
                  fill=_rgb(colormap, x / (width - 1) if width > 1 else 1.0))
    lo, hi = format_values(list(value_range))
    y = COLORBAR_HEIGHT + 2
    draw.text((1, y), lo, fill=TEXT_COLOR, font=font)
    draw.text((max(1, width - 1 - draw.textlength(hi, font=font)), y), hi, fill=TEXT_COLOR,
              font=font)
    lo_w, hi_w = draw.textlength(lo, font=font), draw.textlength(hi, font=font)
    if draw.textlength(caption, font=font) + lo_w + hi_w + 12 <= width:
        _centered_text(draw, font, caption, 0, width, COLORBAR_HEIGHT)
    return bar


def correspondence_image(probe_image: ImageLike, gallery_image: ImageLike, match: dict, *,
                         direction: str = "probe", top: Optional[int] = None,
                         size: tuple[int, int] = (256, 128), cmap: Any = "viridis",
                         line_width: int = 2) -> Image.Image:
    """Probe | gallery side by side (each resized to ``size`` = (height, width)), with a line
    from the centre of each probe location's cell to the centre of its best gallery location's
    cell (``direction="probe"``, ``q_index``; ``"gallery"``: from each gallery location to its
    best probe location, ``g_index``). Lines are coloured by their score through ``cmap``,
    normalised over the pair's scores of that direction (``score_range``: lowest = the map's
    first colour, highest = its last), strongest drawn last (on top); ``top=k`` draws only the
    k strongest (``top=0``: the plain side-by-side). Non-finite scores are not drawn. The
    picture is ``(height, 2 * width)``; ``save_correspondences`` adds the titles, the header
    and the colour bar.
    """
    _check_direction(direction)
    if top is not None:
        _check_nonneg(top=top)
    _check_positive(line_width=line_width)
    height, width = _check_size("size", size)
    h, w = _check_match(match)
    colormap = _colormap(cmap)
    key = "q" if direction == "probe" else "g"
    index = _to_numpy(match[f"{key}_index"]).astype(np.int64)
    score = _to_numpy(match[f"{key}_best"]).astype(np.float64)
    if index.size and (index.min() < 0 or index.max() >= h * w):
        raise ValueError(f"match[{key + '_index'!r}] must be in [0, {h * w}), got values in "
                         f"[{index.min()}, {index.max()}]")

    canvas = Image.new("RGB", (2 * width, height), BACKGROUND)
    canvas.paste(_load_image(probe_image, (height, width)), (0, 0))
    canvas.paste(_load_image(gallery_image, (height, width)), (width, 0))
    finite = np.flatnonzero(np.isfinite(score))
    if finite.size == 0 or top == 0:
        return canvas
    lo, hi = score[finite].min(), score[finite].max()
    norm = (score - lo) / (hi - lo) if hi > lo else np.ones_like(score)
    order = finite[np.argsort(score[finite], kind="stable")]  # weakest first
    if top is not None:
        order = order[-top:]

    def centre(location: int, x0: int) -> tuple[float, float]:
        row, col = divmod(int(location), w)
        return x0 + (col + 0.5) * width / w, (row + 0.5) * height / h

    draw = ImageDraw.Draw(canvas)
    source_x0, target_x0 = (0, width) if direction == "probe" else (width, 0)
    for loc in order:
        color = _rgb(colormap, norm[loc])
        start, end = centre(loc, source_x0), centre(index[loc], target_x0)
        draw.line([start, end], fill=color, width=line_width)
        for x, y in (start, end):
            r = line_width
            draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
    return canvas


def correspondence_header(*, score: Optional[float] = None, distance: Optional[float] = None,
                          same_identity: Optional[bool] = None,
                          probe_label: Optional[str] = None,
                          gallery_label: Optional[str] = None) -> list[str]:
    """The header lines of ``save_correspondences``: ``"score 12.35 (distance 0.2254) - same
    identity"`` (the parts given, 4 significant digits; ``different identity`` when
    ``same_identity`` is False),
    ``"probe: <probe_label>"``, ``"gallery: <gallery_label>"``; lines with nothing to say are
    left out."""
    first = []
    if score is not None:
        first.append(f"score {format_values([score], min_digits=4)[0]}")
    if distance is not None:
        text = f"distance {format_values([distance], min_digits=4)[0]}"
        first.append(f"({text})" if score is not None else text)
    if same_identity is not None:
        first.append(("- " if first else "") +
                     ("same identity" if same_identity else "different identity"))
    lines = [" ".join(first)] if first else []
    if probe_label is not None:
        lines.append(f"probe: {probe_label}")
    if gallery_label is not None:
        lines.append(f"gallery: {gallery_label}")
    return lines


def save_correspondences(out_path: Union[str, Path], probe_image: ImageLike,
                         gallery_image: ImageLike, matches: Sequence[dict], *,
                         score: Optional[float] = None, distance: Optional[float] = None,
                         same_identity: Optional[bool] = None, probe_label: Optional[str] = None,
                         gallery_label: Optional[str] = None, colorbar: bool = True,
                         **kw: Any) -> Path:
    """One ``correspondence_image`` panel per decoder layer, side by side (``PANEL_GAP`` px
    apart), each under its title (the match's ``label``: "layer n" for TransMatcher, "QAConv"
    for QAConv; "layer n" by position for a match without one) and over its colour bar
    (``colorbar_image`` of the panel's ``score_range``, with ``colorbar=True``); above them the
    header lines of ``correspondence_header`` (the pair's ``score`` / ``distance`` as the caller
    computed them, same / different identity, the probe's and gallery image's labels). ``kw``
    goes to ``correspondence_image`` (``direction``, ``cmap``, ``size``, ...). Writes a PNG of

        width  = max(n * 2*size_w + (n-1) * PANEL_GAP,  widest header line + 2*TEXT_PAD)
        height = LABEL_HEIGHT * (header lines) + LABEL_HEIGHT + size_h
                 + (COLORBAR_HEIGHT + LABEL_HEIGHT) * colorbar

    for ``n`` matches (panels left-aligned).
    """
    if len(matches) == 0:
        raise ValueError("matches is empty: pass the list correspondences(...) returns")
    direction = _check_direction(kw.get("direction", "probe"))
    cmap = kw.get("cmap", "viridis")
    font = _font()
    panels = []
    for n, match in enumerate(matches, start=1):
        image = correspondence_image(probe_image, gallery_image, match, **kw)
        bar = (colorbar_image(image.width, score_range(match, direction), cmap=cmap)
               if colorbar else None)
        panel = Image.new("RGB", (image.width, LABEL_HEIGHT + image.height
                                  + (bar.height if bar is not None else 0)), BACKGROUND)
        panel.paste(image, (0, LABEL_HEIGHT))
        if bar is not None:
            panel.paste(bar, (0, LABEL_HEIGHT + image.height))
        _centered_text(ImageDraw.Draw(panel), font, str(match.get("label", f"layer {n}")), 0,
                       image.width, 0)
        panels.append(panel)
    body = _stack(panels, vertical=False, gap=PANEL_GAP)
    lines = correspondence_header(score=score, distance=distance, same_identity=same_identity,
                                  probe_label=probe_label, gallery_label=gallery_label)
    if lines:
        measure = ImageDraw.Draw(body)
        text_w = max(math.ceil(measure.textlength(line, font=font)) for line in lines)
        out = Image.new("RGB", (max(body.width, text_w + 2 * TEXT_PAD),
                                LABEL_HEIGHT * len(lines) + body.height), BACKGROUND)
        draw = ImageDraw.Draw(out)
        for i, line in enumerate(lines):
            draw.text((TEXT_PAD, i * LABEL_HEIGHT + 2), line, fill=TEXT_COLOR, font=font)
        out.paste(body, (0, LABEL_HEIGHT * len(lines)))
        body = out
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    body.save(out_path)
    return out_path


# ----------------------------------------------------------------------------- training curves

def _read_log(log_path: Path) -> list[dict]:
    """The records of a JSON-lines log. A malformed last line is skipped (the trainer may be
    writing it); a malformed line elsewhere is an error."""
    if not log_path.is_file():
        raise ValueError(f"log_path {str(log_path)!r} does not exist or is not a file")
    lines = [(n, line) for n, line in enumerate(log_path.read_text().splitlines(), start=1)
             if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                continue
            raise ValueError(f"log_path {str(log_path)!r} line {n} is not JSON: {e}") from None
        if isinstance(record, dict):
            records.append(record)
    if not records:
        raise ValueError(f"log_path {str(log_path)!r} holds no records")
    return records


def _number(value: Any) -> Optional[float]:
    """A finite float, or None for missing / non-numeric / non-finite values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _series(records: Sequence[dict], x_of, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        x, y = x_of(r), _number(r.get(key))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


CURVE_PANELS = (("loss", "loss"), ("acc", "accuracy"), ("lr", "learning rate"))


def training_curve_series(records: Sequence[dict]) -> dict:
    """What ``plot_training_curves`` draws, from the log's records (dicts), as plain lists:

    ``{"x_label": "step" | "epochs completed",
       "panels": {key: {"step": (xs, ys), "epoch": (xs, ys)} for key in loss, acc, lr},
       "eval": {metric: (xs, ys)} for mAP and rank<k>}``

    x of a ``"step"`` record is its ``"step"``. An ``"epoch"`` or ``"eval"`` record with a
    ``"step"`` of its own (the global step when it was written) is placed there; without one, at
    the last step logged in that epoch (where the epoch ends), else at ``(epoch + 1) *
    steps_per_epoch`` estimated from the records that have both an epoch and a step. Without any
    step the x axis is the number of completed epochs (``epoch + 1``). Missing, non-numeric and
    non-finite values are skipped.
    """
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    evals = [r for r in records if r.get("kind") == "eval"]
    last_step: dict[int, float] = {}
    for r in steps + epochs + evals:
        e, s = _number(r.get("epoch")), _number(r.get("step"))
        if e is not None and s is not None:
            last_step[int(e)] = max(last_step.get(int(e), s), s)
    per_epoch = [s / (e + 1) for e, s in last_step.items()]
    steps_per_epoch = float(np.median(per_epoch)) if per_epoch else None
    by_step = steps_per_epoch is not None or any(_number(r.get("step")) is not None
                                                 for r in steps)

    def epoch_x(r: dict) -> Optional[float]:
        s = _number(r.get("step"))
        if s is not None and by_step:
            return s
        e = _number(r.get("epoch"))
        if e is None:
            return None
        if not by_step:
            return e + 1
        if int(e) in last_step:
            return last_step[int(e)]
        return None if steps_per_epoch is None else (e + 1) * steps_per_epoch

    def step_x(r: dict) -> Optional[float]:
        return _number(r.get("step"))

    eval_keys = sorted({k for r in evals for k in r
                        if (k == "mAP" or (k.startswith("rank") and k[4:].isdigit()))},
                       key=lambda k: (k != "mAP", int(k[4:]) if k != "mAP" else 0))
    return {"x_label": "step" if by_step else "epochs completed",
            "panels": {key: {"step": _series(steps, step_x, key),
                             "epoch": _series(epochs, epoch_x, key)}
                       for key, _ in CURVE_PANELS},
            "eval": {key: _series(evals, epoch_x, key) for key in eval_keys} if evals else {}}


def run_name(log_path: Union[str, Path]) -> str:
    """The run's name: the log's folder name (``runs/market_tm/log.jsonl`` -> ``market_tm``);
    the log's file stem when it has no folder name."""
    log_path = Path(log_path)
    parent = log_path.parent.name or log_path.resolve().parent.name
    return parent or log_path.stem


def plot_training_curves(log_path: Union[str, Path], out_path: Union[str, Path], *,
                         title: Optional[str] = None) -> Path:
    """Loss, accuracy and learning rate per step (thin, light) and per epoch (bold markers),
    against the global step, from the trainer's JSON-lines log; plus mAP / rank-k on the same
    axis when the log has ``"eval"`` records (placement: ``training_curve_series``). Unknown
    kinds and non-finite values are skipped. The figure is titled ``title``, by default the
    run's name (``run_name``: the log's folder). Writes a PNG (callers name it
    ``TRAINING_CURVE_NAME``).
    """
    log_path, out_path = Path(log_path), Path(out_path)
    records = _read_log(log_path)
    if not any(r.get("kind") in ("step", "epoch") for r in records):
        raise ValueError(f"log_path {str(log_path)!r} has no 'step' or 'epoch' records")
    series = training_curve_series(records)

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot_training_curves needs matplotlib: pip install matplotlib") from e

    evals = series["eval"]
    n_rows = len(CURVE_PANELS) + (1 if evals else 0)
    fig = Figure(figsize=(8, 2.6 * n_rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, 1, squeeze=False)[:, 0]
    x_label = series["x_label"]
    for ax, (key, label) in zip(axes, CURVE_PANELS):
        (xs, ys), (xe, ye) = series["panels"][key]["step"], series["panels"][key]["epoch"]
        if xs:
            ax.plot(xs, ys, color="tab:blue", alpha=0.35, linewidth=0.8, label="per step")
        if xe:
            ax.plot(xe, ye, color="tab:blue", linewidth=2.2, marker="o", markersize=4,
                    label="per epoch")
        values = ys + ye
        if key == "lr" and values and min(values) > 0 and max(values) / min(values) > 10:
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_xlabel(x_label)
        ax.grid(True, alpha=0.3)
        if xs or xe:
            ax.legend(loc="best", fontsize=8)
    if evals:
        ax = axes[-1]
        for key, (xs, ys) in evals.items():
            if xs:
                ax.plot(xs, ys, marker="o", linewidth=1.8, label=key)
        ax.set_xlabel(x_label)
        ax.set_ylabel("evaluation")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize=8)
    fig.suptitle(run_name(log_path) if title is None else title)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png")
    return out_path
