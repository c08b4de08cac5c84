"""Pictures of local correspondences: which gallery location each probe location matched, read
from the argmax indices of ``max_sim`` computed exactly as the matcher scores the pair (the
matcher's ``correspondences``; so the picture shows what the score is made of); one panel per
decoder layer (the match's ``label``: "layer n", or "QAConv" for QAConv's one panel), a header with
the pair's score, same / different identity and the probe's and gallery image's labels, and under
each panel a colour bar from its lowest to its highest location score. File names:
:func:`.visualize.correspondence_name`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from .drawing import (BACKGROUND, COLORBAR_HEIGHT, LABEL_HEIGHT, PANEL_GAP, TEXT_COLOR, TEXT_PAD, ImageLike,
                      as_numpy, check_nonneg, check_positive, check_size, colormap_rgb, draw_centered_text,
                      format_values, get_colormap, label_font, load_cell_image, stack_images)


def draws_correspondences(matcher: Any) -> bool:
    """Whether ``matcher`` can say where locations matched (it has ``correspondences``: the fused
    TransMatcher and QAConv do, embedding distances do not)."""
    return callable(getattr(matcher, "correspondences", None))


def correspondences(matcher: Any, probe_features: Tensor, gallery_features: Tensor) -> list[dict]:
    """Per decoder layer (a one-layer matcher: one), where each location of one probe image
    found its best match in one gallery image, as ``matcher.correspondences`` reports it: the
    argmax indices of ``max_sim`` on the features projected and gated exactly as the matcher
    scores them.

    Features are one image each, shaped as the matcher takes them (its ``feature_layout``).
    Returns one dict per layer with numpy arrays ``q_index`` / ``q_best`` ``[L]`` (best gallery
    location and its score per probe location), ``g_index`` / ``g_best`` ``[L]`` (best probe
    location per gallery location), the grid ``height`` / ``width`` (location ``l`` is row
    ``l // width``, column ``l % width``), and what made it: ``matcher`` (the matcher's
    ``label``), ``layer`` (the decoder layer from 1; None for a one-layer matcher) and
    ``label``, the panel title. The matcher runs in eval mode; its modes are restored.
    """
    if not draws_correspondences(matcher):
        raise TypeError(f"matcher must be a matcher with correspondences() (a fused matcher of "
                        f"transmatcher_fast), got {type(matcher).__name__}")
    return [{"q_index": c.q_index.cpu().numpy().astype(np.int64), "q_best": c.q_best.float().cpu().numpy(),
             "g_index": c.g_index.cpu().numpy().astype(np.int64), "g_best": c.g_best.float().cpu().numpy(),
             "height": int(c.height), "width": int(c.width), "matcher": matcher.label, "layer": c.layer,
             "label": c.label}
            for c in matcher.correspondences(probe_features, gallery_features)]


def _check_match(match: dict) -> tuple[int, int]:
    keys = ("q_index", "q_best", "g_index", "g_best", "height", "width")
    missing = [k for k in keys if k not in match]
    if missing:
        raise ValueError(f"match is missing {missing} (use correspondences(...) to make it)")
    h, w = int(match["height"]), int(match["width"])
    if h < 1 or w < 1:
        raise ValueError(f"match height/width must be positive, got {h} x {w}")
    for key in ("q_index", "q_best", "g_index", "g_best"):
        shape = as_numpy(match[key]).shape
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
    score = as_numpy(match["q_best" if direction == "probe" else "g_best"]).astype(np.float64)
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
    check_positive(width=width)
    colormap = get_colormap(cmap)
    bar = Image.new("RGB", (width, COLORBAR_HEIGHT + LABEL_HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(bar)
    font = label_font()
    if value_range is None:
        draw.rectangle([0, 0, width - 1, COLORBAR_HEIGHT - 1], fill=(160, 160, 160))
        draw_centered_text(draw, font, "no finite scores", 0, width, COLORBAR_HEIGHT)
        return bar
    for x in range(width):
        draw.line([(x, 0), (x, COLORBAR_HEIGHT - 1)],
                  fill=colormap_rgb(colormap, x / (width - 1) if width > 1 else 1.0))
    lo, hi = format_values(list(value_range))
    y = COLORBAR_HEIGHT + 2
    draw.text((1, y), lo, fill=TEXT_COLOR, font=font)
    draw.text((max(1, width - 1 - draw.textlength(hi, font=font)), y), hi, fill=TEXT_COLOR,
              font=font)
    lo_w, hi_w = draw.textlength(lo, font=font), draw.textlength(hi, font=font)
    if draw.textlength(caption, font=font) + lo_w + hi_w + 12 <= width:
        draw_centered_text(draw, font, caption, 0, width, COLORBAR_HEIGHT)
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
        check_nonneg(top=top)
    check_positive(line_width=line_width)
    height, width = check_size("size", size)
    h, w = _check_match(match)
    colormap = get_colormap(cmap)
    key = "q" if direction == "probe" else "g"
    index = as_numpy(match[f"{key}_index"]).astype(np.int64)
    score = as_numpy(match[f"{key}_best"]).astype(np.float64)
    if index.size and (index.min() < 0 or index.max() >= h * w):
        raise ValueError(f"match[{key + '_index'!r}] must be in [0, {h * w}), got values in "
                         f"[{index.min()}, {index.max()}]")

    canvas = Image.new("RGB", (2 * width, height), BACKGROUND)
    canvas.paste(load_cell_image(probe_image, (height, width)), (0, 0))
    canvas.paste(load_cell_image(gallery_image, (height, width)), (width, 0))
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
        color = colormap_rgb(colormap, norm[loc])
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
    font = label_font()
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
        draw_centered_text(ImageDraw.Draw(panel), font, str(match.get("label", f"layer {n}")), 0,
                       image.width, 0)
        panels.append(panel)
    body = stack_images(panels, vertical=False, gap=PANEL_GAP)
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
