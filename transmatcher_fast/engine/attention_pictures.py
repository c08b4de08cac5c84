"""Attention pictures of ViT models (TransReID, TransReID-SSL, DINO), over the input image.

For each image one row of panels, each the image with a heat map laid over it:

- ``rollout``: attention rollout of the cls token through every layer (Abnar & Zuidema 2020);
- ``head h``: the last layer's attention of the cls token over the patches, per head; with
  ``keep=0.6`` (DINO's view) each head shows only the patches that together hold 60 % of its
  attention mass, the rest dimmed;
- ``JPM groups`` (TransReID with JPM): which patches each of JPM's k local groups holds, one
  colour per group.

Models draw when they have ``attention_maps(x, cam_label, view_label)`` returning
``(cls_attention [B, heads, N], rollout [B, N])`` over a ``num_y x num_x`` grid (``grid``); a
model with ``patch_groups()`` (token indices ``[k, P + 1]``, or None) gets the groups panel.
Files follow :mod:`.visualize`'s scheme: ``attention_q<i>_pid<p>.png``; a comparison of several
models (pre-trained vs fine-tuned): ``attention_compare_q<i>_pid<p>.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from ..data.images import open_image
from .drawing import BACKGROUND, LABEL_HEIGHT, PANEL_GAP, TEXT_COLOR, get_colormap, id_label, label_font

ATTENTION_NAME = "attention_q{index}_pid{pid}.png"
COMPARE_NAME = "attention_compare_q{index}_pid{pid}.png"
# Distinct colours of JPM's groups (tab10's first ones).
GROUP_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def draws_attention(model: nn.Module) -> bool:
    """Whether ``model`` gives attention maps (a ViT-based model)."""
    return callable(getattr(model, "attention_maps", None)) and grid_of(model) is not None


def grid_of(model: nn.Module) -> Optional[Tuple[int, int]]:
    """The ``(num_y, num_x)`` patch grid of a ViT model (``model.base`` or the model itself)."""
    for m in (getattr(model, "base", None), model):
        if m is not None and hasattr(m, "num_y") and hasattr(m, "num_x"):
            return int(m.num_y), int(m.num_x)
    return None


def keep_mass(attention: np.ndarray, fraction: float = 0.6) -> np.ndarray:
    """The smallest set of locations holding ``fraction`` of the attention mass (DINO's
    ``th_attn``): a boolean mask of ``attention``'s shape, last axis normalised first."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    a = np.asarray(attention, dtype=np.float64)
    a = a / np.clip(a.sum(-1, keepdims=True), 1e-12, None)
    order = np.argsort(-a, axis=-1, kind="stable")
    sorted_mass = np.take_along_axis(a, order, -1)
    # Keep a location while the mass before it is below the fraction.
    before = np.cumsum(sorted_mass, -1) - sorted_mass
    keep_sorted = before < fraction - 1e-12
    mask = np.zeros_like(keep_sorted)
    np.put_along_axis(mask, order, keep_sorted, -1)
    return mask


def overlay(image: Image.Image, values: np.ndarray, *, cmap: Any = "inferno", alpha: float = 0.55,
            mask: Optional[np.ndarray] = None) -> Image.Image:
    """``image`` with ``values [num_y, num_x]`` (min-max normalised) as a colour map on top,
    resized bilinearly to the image; where ``mask`` is False the picture is dimmed instead."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = np.nanmin(values), np.nanmax(values)
    norm = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    colors = (np.asarray(get_colormap(cmap)(norm))[..., :3] * 255).astype(np.uint8)
    heat = Image.fromarray(colors).resize(image.size, Image.BILINEAR)
    out = Image.blend(image.convert("RGB"), heat, alpha)
    if mask is not None:
        keep = Image.fromarray((np.asarray(mask, dtype=np.uint8) * 255)).resize(image.size, Image.NEAREST)
        out = Image.composite(out, Image.blend(image.convert("RGB"), Image.new("RGB", image.size), 0.7), keep)
    return out


def groups_picture(image: Image.Image, groups: Tensor, grid: Tuple[int, int],
                   alpha: float = 0.5) -> Image.Image:
    """Each patch of JPM's groups (``groups [k, P + 1]`` token indices, column 0 the cls token,
    patch ``t`` at token ``t + 1``) tinted with its group's colour; patches in no group stay
    plain."""
    num_y, num_x = grid
    cell_w, cell_h = image.width / num_x, image.height / num_y
    tint = Image.new("RGB", image.size)
    draw = ImageDraw.Draw(tint)
    covered = Image.new("L", image.size, 0)
    mark = ImageDraw.Draw(covered)
    for g, row in enumerate(groups.tolist()):
        for token in row[1:]:
            y, x = divmod(token - 1, num_x)
            box = [x * cell_w, y * cell_h, (x + 1) * cell_w - 1, (y + 1) * cell_h - 1]
            draw.rectangle(box, fill=GROUP_COLORS[g % len(GROUP_COLORS)])
            mark.rectangle(box, fill=255)
    blended = Image.blend(image.convert("RGB"), tint, alpha)
    return Image.composite(blended, image.convert("RGB"), covered)


def _labelled(panels: Sequence[Tuple[str, Image.Image]], title: Optional[str] = None) -> Image.Image:
    font = label_font()
    width = sum(p.width for _, p in panels) + PANEL_GAP * (len(panels) - 1)
    top = LABEL_HEIGHT if title else 0
    height = top + LABEL_HEIGHT + max(p.height for _, p in panels)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 2), title, fill=TEXT_COLOR, font=font)
    x = 0
    for label, panel in panels:
        draw.text((x + 2, top + 2), label, fill=TEXT_COLOR, font=font)
        canvas.paste(panel, (x, top + LABEL_HEIGHT))
        x += panel.width + PANEL_GAP
    return canvas


def attention_panels(image: Image.Image, cls_attention: np.ndarray, rollout: np.ndarray,
                     grid: Tuple[int, int], *, keep: Optional[float] = None,
                     groups: Optional[Tensor] = None) -> list:
    """``[(label, picture)]``: the image, the rollout, each head (``keep``: DINO's thresholded
    view), and JPM's groups when given. ``cls_attention [heads, N]``, ``rollout [N]``."""
    num_y, num_x = grid
    heads = np.asarray(cls_attention).reshape(-1, num_y, num_x)
    panels = [("image", image), ("rollout", overlay(image, np.asarray(rollout).reshape(num_y, num_x)))]
    masks = keep_mass(heads.reshape(len(heads), -1), keep).reshape(heads.shape) if keep else [None] * len(heads)
    for h, (values, mask) in enumerate(zip(heads, masks)):
        panels.append((f"head {h + 1}" + (f", {int(keep * 100)} % mass" if keep else ""),
                       overlay(image, values, mask=mask)))
    if groups is not None:
        panels.append((f"JPM {len(groups)} groups", groups_picture(image, groups, grid)))
    return panels


@torch.no_grad()
def model_attention(model: nn.Module, items: Sequence[Sequence[Any]], transform,
                    views: Optional[Sequence[int]] = None, device=None) -> Tuple[np.ndarray, np.ndarray]:
    """``(cls_attention [B, heads, N], rollout [B, N])`` of ``items`` (``(path, pid, camid)``)
    through ``transform``, in eval mode (the model's mode is restored); SIE models get the
    items' cameras and ``views``."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    images = torch.stack([transform(open_image(item[0])) for item in items]).to(device)
    cams = torch.tensor([int(item[2]) for item in items], device=device)
    views = torch.tensor(list(views) if views is not None else [0] * len(items), device=device)
    was_training = model.training
    model.eval()
    try:
        maps = model.attention_maps(images, cam_label=cams, view_label=views)
    finally:
        model.train(was_training)
    return maps.cls_attention.float().cpu().numpy(), maps.rollout.float().cpu().numpy()


def _groups(model: nn.Module) -> Optional[Tensor]:
    """The model's groups of patches to draw (``patch_groups()``: TransReID's JPM), if it has any."""
    groups = getattr(model, "patch_groups", None)
    return groups() if callable(groups) else None


def save_attention_pictures(folder: Union[str, Path], model: nn.Module, items: Sequence[Sequence[Any]],
                            transform, *, views: Optional[Sequence[int]] = None,
                            size: Tuple[int, int] = (256, 128), keep: Optional[float] = None,
                            indices: Optional[Sequence[int]] = None, camera_base: int = 0) -> list:
    """One picture per item (see the module docstring), named by ``indices`` (the items'
    positions in their split; default 0, 1, ...). ``size`` = (height, width) of each panel;
    cameras are labelled ``camid + camera_base`` (the dataset's ``camera_base``)."""
    if not draws_attention(model):
        raise TypeError(f"{type(model).__name__} gives no attention maps (a ViT model does)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    grid = grid_of(model)
    cls_attention, rollout = model_attention(model, items, transform, views)
    indices = list(indices) if indices is not None else list(range(len(items)))
    written = []
    for i, item in enumerate(items):
        image = open_image(item[0]).resize((size[1], size[0]), Image.BICUBIC)
        panels = attention_panels(image, cls_attention[i], rollout[i], grid, keep=keep, groups=_groups(model))
        path = folder / ATTENTION_NAME.format(index=indices[i], pid=int(item[1]))
        label = f"query {indices[i]}  {id_label(item[1], item[2], camera_base)}  {Path(item[0]).name}"
        _labelled(panels, label).save(path)
        written.append(path)
    return written


def save_attention_comparison(folder: Union[str, Path], models: Mapping[str, Tuple[nn.Module, Any]],
                              items: Sequence[Sequence[Any]], *, views: Optional[Sequence[int]] = None,
                              size: Tuple[int, int] = (256, 128), keep: Optional[float] = 0.6,
                              indices: Optional[Sequence[int]] = None) -> list:
    """Several models side by side per item (e.g. ``{"pre-trained": (dino, transform),
    "fine-tuned": (transreid, transform)}``): one row of panels per model, DINO's thresholded
    view by default."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    maps: Dict[str, Tuple[np.ndarray, np.ndarray, Tuple[int, int], Optional[Tensor]]] = {}
    for name, (model, transform) in models.items():
        if not draws_attention(model):
            raise TypeError(f"models[{name!r}] ({type(model).__name__}) gives no attention maps")
        maps[name] = (*model_attention(model, items, transform, views), grid_of(model), _groups(model))
    indices = list(indices) if indices is not None else list(range(len(items)))
    written = []
    for i, item in enumerate(items):
        image = open_image(item[0]).resize((size[1], size[0]), Image.BICUBIC)
        rows = [_labelled(attention_panels(image, a[i], r[i], grid, keep=keep, groups=groups), name)
                for name, (a, r, grid, groups) in maps.items()]
        canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)
                                   + PANEL_GAP * (len(rows) - 1)), BACKGROUND)
        y = 0
        for row in rows:
            canvas.paste(row, (0, y))
            y += row.height + PANEL_GAP
        path = folder / COMPARE_NAME.format(index=indices[i], pid=int(item[1]))
        canvas.save(path)
        written.append(path)
    return written
