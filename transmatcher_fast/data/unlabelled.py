"""Unlabelled images for self-supervised pre-training (DINO on LUPerson in TransReID-SSL).

``images`` (alias ``unlabelled``) is a dataset of the registry: every image under a folder tree,
all in ``train`` with pid 0 and camera 0 (the labels DINO ignores, as upstream's ``ImageFolder``
gives label 0 to LUPerson's one folder), no query or gallery. LUPerson's layout is one folder of
``.jpg``: ``-d images --data-dir LUP`` reads ``LUP/images`` when it exists (``dataset_root``), as
upstream's ``--data_path LUP`` does.

:func:`restrict_to_list` keeps the training images a (CFS-ranked, already cut) list names, in
the list's order (TransReID-SSL's ``--filter_path`` / ``--keep_num``); it works on any dataset's
training split, so a labelled set's training images can be pre-trained on as unlabelled ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Sequence

from .datasets import Item, ReidDataset, register_dataset
from .multicrop import list_images

__all__ = ["UnlabelledImageFolder", "restrict_to_list", "UNLABELLED_DATASETS"]

UNLABELLED_DATASETS = ("images", "unlabelled")


@register_dataset(*UNLABELLED_DATASETS)
class UnlabelledImageFolder(ReidDataset):
    """Every ``.jpg`` / ``.jpeg`` / ``.png`` under ``root`` (recursively, sorted: the same order on
    every machine) as training items ``(path, 0, 0)``; ``query`` and ``gallery`` are empty."""

    name = "unlabelled images"
    layout = "  <root>/**/*.jpg (any folder tree of images; LUPerson: <root>/images/*.jpg)"

    def __init__(self, root):
        super().__init__(root)
        if not self.root.is_dir():
            raise self._error(f"folder {self.root} does not exist")
        try:
            paths = list_images(str(self.root))
        except FileNotFoundError as error:
            raise self._error(str(error)) from None
        self.train = [(path, 0, 0) for path in paths]

    def summary(self) -> str:
        lines = [f"=> Loaded {len(self.train):,} unlabelled images from {self.root}"]
        return "\n".join(lines + [f"  {note}" for note in self.notes])


def _relative_name(path: str, root: str) -> str:
    """``path`` relative to ``root`` with ``/`` separators (a string cut where it can be: 4 M
    ``os.path.relpath`` calls take a while)."""
    prefix = root.rstrip(os.sep) + os.sep
    relative = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)
    return relative.replace(os.sep, "/")


def restrict_to_list(dataset: ReidDataset, names: Sequence[str], source: str,
                     note: str = "") -> List[Item]:
    """The training items of ``dataset`` that ``names`` name, in that order, set as
    ``dataset.train`` (``note`` and the count go to its summary). A name is a path relative to
    ``dataset.root`` (what ``transmatcher-fast cfs --images ROOT`` writes; upstream's list is
    relative to LUPerson's ``images`` folder) or an absolute path. A name without a training image
    raises a FileNotFoundError naming ``source`` (the list file) and the first missing names."""
    root = os.path.abspath(dataset.root)
    # One key per image (LUPerson: 4 M): its name relative to the root; absolute names are cut.
    by_name = {_relative_name(os.path.abspath(item[0]), root): item for item in dataset.train}
    kept, missing = [], []
    for name in names:
        name = str(name)
        key = _relative_name(os.path.abspath(name), root) if os.path.isabs(name) else name.replace(os.sep, "/")
        item = by_name.get(key)
        if item is None:
            missing.append(name)
        else:
            kept.append(item)
    if missing:
        raise FileNotFoundError(
            f"{source}: {len(missing):,} of the {len(names):,} images it keeps are not training images "
            f"under {root} (first: {', '.join(missing[:3])}); its names must be relative to that folder "
            "(or absolute): give the --data-dir the list was scored in")
    dataset.train = kept
    dataset.notes.append(f"CFS list {Path(source).name}: {len(kept):,} images{' ' + note if note else ''}")
    return kept
