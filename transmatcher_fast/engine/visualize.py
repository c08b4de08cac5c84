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
  location each probe location matched, as the matcher reports it (``matcher.correspondences``);
  one panel per decoder layer; in :mod:`.correspondence_pictures`, re-exported here.
- ``plot_training_curves``: loss, accuracy, learning rate (and mAP / rank-k when evaluated) from
  the trainer's JSON-lines log (:mod:`.training_curves`, re-exported here).

This module is the pictures' one entry: callers use ``visualize.<name>`` for every picture, so the
drawing primitives (:mod:`.drawing`) and the two other kinds of picture are re-exported.

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

import math
import random
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

from .correspondence_pictures import (colorbar_image, correspondence_header, correspondence_image,
                                      correspondences, draws_correspondences, save_correspondences, score_range)
from .drawing import (BACKGROUND, COLORBAR_HEIGHT, CORRECT_COLOR, LABEL_HEIGHT, PANEL_GAP, QUERY_COLOR,
                      TEXT_COLOR, WRONG_COLOR, ImageLike, as_numpy, check_kind, check_nonneg, check_positive,
                      check_size, draw_centered_text, format_values, id_label, kind_header, label_font,
                      load_cell_image, padded_number, stack_images, value_labels)
from .training_curves import TRAINING_CURVE_NAME, plot_training_curves, run_name, training_curve_series

__all__ = [
    "LABEL_HEIGHT",
    "COLORBAR_HEIGHT",
    "PANEL_GAP",
    "BACKGROUND",
    "TEXT_COLOR",
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
    "picked_queries",
    "save_ranked_lists",
    "draws_correspondences",
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

OVERVIEW_ROWS_PER_PAGE = 50  # ranked-list rows per overview page of save_ranked_lists


# ----------------------------------------------------------------------------- file names

def ranked_list_name(query_index: int, pid: Any, num_query: int) -> str:
    """``ranked_q<query index>_pid<pid>.png``; the index padded to the digits of
    ``num_query - 1``."""
    return f"ranked_q{padded_number(query_index, num_query - 1)}_pid{int(pid)}.png"


def overview_name(page: int, num_pages: int) -> str:
    """``ranked_lists.png`` for a one-page overview, else ``ranked_lists_<page>.png`` with
    ``page`` from 1, padded to the digits of ``num_pages``."""
    if num_pages == 1:
        return "ranked_lists.png"
    return f"ranked_lists_{padded_number(page, num_pages)}.png"


def correspondence_name(query_index: int, query_pid: Any, gallery_index: int, gallery_pid: Any,
                        num_query: int, num_gallery: int) -> str:
    """``correspondence_q<query index>_pid<pid>_g<gallery index>_pid<pid>.png``; the indices
    padded to the digits of ``num_query - 1`` / ``num_gallery - 1``."""
    return (f"correspondence_q{padded_number(query_index, num_query - 1)}_pid{int(query_pid)}"
            f"_g{padded_number(gallery_index, num_gallery - 1)}_pid{int(gallery_pid)}.png")


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
    cell_h, cell_w = check_size("cell", cell)
    check_nonneg(pad=pad, border=border)
    check_kind(kind)
    if distances is not None:
        if values is not None:
            raise ValueError("give values or distances (the same thing), not both")
        values = distances
    gallery_paths, correct = list(gallery_paths), [bool(c) for c in correct]
    if len(gallery_paths) != len(correct):
        raise ValueError(f"gallery_paths and correct must have the same length, got "
                         f"{len(gallery_paths)} and {len(correct)}")
    if values is not None:
        values = [float(d) for d in as_numpy(values).reshape(-1)]
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
    font = label_font()
    if title is not None:
        draw.text((pad, pad + 2), title, fill=TEXT_COLOR, font=font)
    texts = value_labels(values, kind) if values is not None else None

    def tile(image: ImageLike, x: int, color: tuple[int, int, int],
             lines: Sequence[Optional[str]]) -> None:
        draw.rectangle([x, top, x + tile_w - 1, top + tile_h - 1], fill=color)
        canvas.paste(load_cell_image(image, (cell_h, cell_w)), (x + border, top + border))
        for n, line in enumerate(lines):
            if line:
                draw_centered_text(draw, font, line, x, tile_w, top + tile_h + n * LABEL_HEIGHT)

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
    check_positive(topk=topk)
    check_kind(kind)
    gallery_pids = as_numpy(gallery_pids).reshape(-1)
    gallery_camids = as_numpy(gallery_camids).reshape(-1)
    if gallery_pids.shape != gallery_camids.shape:
        raise ValueError(f"gallery_pids and gallery_camids must have the same length, got "
                         f"{gallery_pids.shape[0]} and {gallery_camids.shape[0]}")
    num_gallery = gallery_pids.shape[0]
    dist = as_numpy(distances).astype(np.float64, copy=False)
    if dist.ndim != 1:
        raise ValueError(f"distances must be one query's row (1-D), got shape {dist.shape}")
    if indices is None:
        if dist.shape[0] != num_gallery:
            raise ValueError(f"distances must have one value per gallery item ({num_gallery}), "
                             f"got shape {dist.shape}")
        candidates = np.arange(num_gallery)
    else:
        candidates = as_numpy(indices).astype(np.int64).reshape(-1)
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
        dist, index = (as_numpy(a) for a in dist_or_topk)
        if dist.ndim != 2 or dist.shape != index.shape or dist.shape[0] != num_query:
            raise ValueError(f"dist_or_topk = (topk_dist, topk_index) must both be [Nq, k] with "
                             f"Nq = {num_query}, got shapes {dist.shape} and {index.shape}")
        return dist, index
    dist = as_numpy(dist_or_topk)
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
    check_positive(num_queries=num_queries, topk=topk, rows_per_page=rows_per_page)
    check_kind(kind)
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
        stack_images(rows, vertical=True).save(path)
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
