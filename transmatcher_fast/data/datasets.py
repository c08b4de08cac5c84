"""Person re-ID datasets read from their public folder layouts.

Every dataset exposes ``train``, ``query`` and ``gallery`` as lists of ``(path, pid, camid)`` with an
absolute path, cameras 0-based and training identities relabelled to ``0..N-1``. Query and gallery
keep the identities written in the file names, so that the evaluation can compare them.

Conventions follow upstream's (open-reid derived) ``reid/datasets``:

* junk images (pid -1) are dropped everywhere;
* distractors (pid 0, Market-1501 style ``0000_...``) stay in query/gallery as pid 0, where the
  evaluation counts them as negatives; they are not an identity, so they never enter ``train``;
* MSMT17 trains on ``list_train`` + ``list_val``; RandPerson is a training set only.

``build_dataset(name, root)`` looks the class up in the registry.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Type

Item = Tuple[str, int, int]  # (absolute image path, pid, camid)

JUNK_PID = -1
DISTRACTOR_PID = 0
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


class DatasetLayoutError(ValueError):
    """A dataset folder is missing or holds a file the parser cannot read."""


_REGISTRY: Dict[str, Type["ReidDataset"]] = {}


def register_dataset(*names: str) -> Callable[[Type["ReidDataset"]], Type["ReidDataset"]]:
    def add(cls):
        for name in names:
            if name in _REGISTRY:
                raise ValueError(f"dataset name {name!r} is already registered to {_REGISTRY[name].__name__}")
            _REGISTRY[name] = cls
        return cls
    return add


def dataset_names() -> List[str]:
    return sorted(_REGISTRY)


def build_dataset(name: str, root, **kwargs) -> "ReidDataset":
    """``name`` is a registry key (``dataset_names()``); ``root`` the dataset's own folder."""
    try:
        cls = _REGISTRY[name.lower()]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}") from None
    return cls(root, **kwargs)


class ReidDataset:
    """Base class: subclasses fill ``train``, ``query`` and ``gallery`` in ``__init__``."""

    name = "dataset"
    layout = ""  # the expected layout, quoted in every error message

    def __init__(self, root):
        self.root = Path(root).expanduser()
        self.train: List[Item] = []
        self.query: List[Item] = []
        self.gallery: List[Item] = []

    # --- helpers shared by the parsers -------------------------------------------------------
    def _error(self, what: str) -> DatasetLayoutError:
        return DatasetLayoutError(f"{self.name}: {what}\nexpected layout:\n{self.layout}")

    def _find_root(self, required: Sequence[str], aliases: Sequence[str] = ()) -> Path:
        """``root`` itself or one of the folder names the dataset is distributed under, whichever
        holds every entry of ``required``."""
        candidates = [self.root] + [self.root / a for a in aliases]
        for candidate in candidates:
            if all((candidate / r).exists() for r in required):
                return candidate
        if not self.root.is_dir():
            raise self._error(f"folder {self.root} does not exist")
        missing = [str(self.root / r) for r in required if not (self.root / r).exists()]
        raise self._error(f"missing {', '.join(missing)}"
                          + (f" (also looked in {', '.join(aliases)} under it)" if aliases else ""))

    def _list_images(self, folder: Path, extensions: Iterable[str]) -> List[Path]:
        if not folder.is_dir():
            raise self._error(f"folder {folder} does not exist")
        extensions = tuple(extensions)
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in extensions and p.is_file())

    # --- statistics -------------------------------------------------------------------------
    @property
    def num_train_ids(self) -> int:
        return len({pid for _, pid, _ in self.train})

    @staticmethod
    def stats(items: Sequence[Item]) -> Tuple[int, int, int]:
        """(# ids, # images, # cameras)."""
        return len({p for _, p, _ in items}), len(items), len({c for _, _, c in items})

    def summary(self) -> str:
        """A torchreid-style table of ids, images and cameras per split."""
        rule = "  " + "-" * 40
        lines = [f"=> Loaded {type(self).__name__} from {self.root}", rule,
                 "  subset   | # ids | # images | # cameras", rule]
        for split in ("train", "query", "gallery"):
            ids, images, cams = self.stats(getattr(self, split))
            lines.append(f"  {split:<8} | {ids:5d} | {images:8d} | {cams:9d}")
        lines.append(rule)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r})"


def relabel(items: Sequence[Item]) -> List[Item]:
    """Training ids -> 0..N-1 in increasing order of the original pid."""
    mapping = {pid: i for i, pid in enumerate(sorted({pid for _, pid, _ in items}))}
    return [(path, mapping[pid], cam) for path, pid, cam in items]


# --- Market-1501 style file names: <pid>_c<cam>... ------------------------------------------------

_PID_CAM = re.compile(r"^(-?\d+)_c(\d+)")


class _PidCamFolders(ReidDataset):
    """Datasets whose file names start with ``<pid>_c<cam>`` (cameras numbered from 1)."""

    extensions: Tuple[str, ...] = (".jpg",)
    aliases: Tuple[str, ...] = ()
    splits = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}

    def __init__(self, root):
        super().__init__(root)
        base = self._find_root(list(self.splits.values()), self.aliases)
        self.root = base
        for split, folder in self.splits.items():
            items = self._parse_folder(base / folder, is_train=split == "train")
            setattr(self, split, relabel(items) if split == "train" else items)

    def _parse_folder(self, folder: Path, is_train: bool, cam_base: int = 1) -> List[Item]:
        items = []
        for path in self._list_images(folder, self.extensions):
            match = _PID_CAM.match(path.name)
            if match is None:
                raise self._error(f"cannot read <pid>_c<cam> from the file name {path}")
            pid, cam = int(match.group(1)), int(match.group(2))
            if pid == JUNK_PID or (is_train and pid == DISTRACTOR_PID):
                continue
            if pid < JUNK_PID or cam < cam_base:
                raise self._error(f"bad pid {pid} or camera {cam} (cameras start at {cam_base}) in {path}")
            items.append((str(path), pid, cam - cam_base))
        return items


_MARKET_LAYOUT = """  <root>/bounding_box_train/<pid>_c<cam>s<session>_<frame>_<box>.jpg   e.g. 0002_c1s1_000451_03.jpg
  <root>/query/...jpg
  <root>/bounding_box_test/...jpg   (pid -1 = junk, dropped; 0000 = distractor, gallery only)"""


@register_dataset("market1501", "market")
class Market1501(_PidCamFolders):
    name = "Market-1501"
    aliases = ("Market-1501-v15.09.15", "market1501/Market-1501-v15.09.15")
    layout = _MARKET_LAYOUT


@register_dataset("dukemtmcreid", "duke")
class DukeMTMCreID(_PidCamFolders):
    name = "DukeMTMC-reID"
    aliases = ("DukeMTMC-reID", "dukemtmc-reid/DukeMTMC-reID")
    layout = _MARKET_LAYOUT.replace("0002_c1s1_000451_03.jpg", "0001_c2_f0046182.jpg").replace(
        "<pid>_c<cam>s<session>_<frame>_<box>.jpg", "<pid>_c<cam>_f<frame>.jpg")


class _CUHK03NP(_PidCamFolders):
    extensions = (".png",)
    subset = ""

    def __init__(self, root):
        self.aliases = (f"cuhk03-np/{self.subset}", self.subset)
        self.layout = (f"  <root>/bounding_box_train/<pid>_c<cam>_<n>.png   e.g. 0001_c1_1.png\n"
                       f"  <root>/query/*.png\n  <root>/bounding_box_test/*.png\n"
                       f"  (or those three under <root>/cuhk03-np/{self.subset}/ or <root>/{self.subset}/)")
        super().__init__(root)


@register_dataset("cuhk03_np_detected", "cuhk03-np-detected")
class CUHK03NPDetected(_CUHK03NP):
    name = "CUHK03-NP (detected)"
    subset = "detected"


@register_dataset("cuhk03_np_labeled", "cuhk03-np-labeled")
class CUHK03NPLabeled(_CUHK03NP):
    name = "CUHK03-NP (labeled)"
    subset = "labeled"


@register_dataset("folder", "generic")
class PidCamFolder(_PidCamFolders):
    """Any folder of ``<pid>_c<cam>*.{jpg,jpeg,png,bmp}`` images.

    With split folders (``train`` or ``bounding_box_train``; ``query``; ``gallery`` or
    ``bounding_box_test``) each present one is read; otherwise every image directly under ``root``
    is a training image. ``cam_base`` is the number of the first camera in the names (1 as in
    Market-1501, or 0).
    """

    name = "generic <pid>_c<cam> folder"
    extensions = IMAGE_EXTENSIONS
    layout = """  <root>/train/<pid>_c<cam>*.jpg (or bounding_box_train/), <root>/query/..., <root>/gallery/...
  (or bounding_box_test/); or just <root>/<pid>_c<cam>*.jpg, which all go to train"""
    _split_folders = {"train": ("train", "bounding_box_train"), "query": ("query",),
                      "gallery": ("gallery", "bounding_box_test")}

    def __init__(self, root, cam_base: int = 1):
        ReidDataset.__init__(self, root)
        if cam_base not in (0, 1):
            raise ValueError(f"cam_base must be 0 or 1, got {cam_base}")
        if not self.root.is_dir():
            raise self._error(f"folder {self.root} does not exist")
        found = {split: next((self.root / n for n in names if (self.root / n).is_dir()), None)
                 for split, names in self._split_folders.items()}
        if not any(found.values()):
            found = {"train": self.root, "query": None, "gallery": None}
        for split, folder in found.items():
            if folder is not None:
                items = self._parse_folder(folder, is_train=split == "train", cam_base=cam_base)
                setattr(self, split, relabel(items) if split == "train" else items)
        if not (self.train or self.query or self.gallery):
            raise self._error(f"no images in {self.root}")


# --- MSMT17: list files ---------------------------------------------------------------------------

@register_dataset("msmt17", "msmt")
class MSMT17(ReidDataset):
    """MSMT17 V1 (``train/``, ``test/``) or V2 (``mask_train_v2/``, ``mask_test_v2/``) with the list
    files ``list_{train,val,query,gallery}.txt`` whose lines read ``0000/0000_000_01_0303morning_0015_0.jpg 0``
    (path relative to the train/test folder; a leading ``train/`` or ``test/`` is accepted too).
    The camera is the third ``_`` field of the file name, from 1. ``combine_all`` appends query and
    gallery to ``train`` as extra identities (upstream's MSMT_all)."""

    name = "MSMT17"
    layout = """  <root>/list_train.txt list_val.txt list_query.txt list_gallery.txt   lines '<relpath> <pid>'
  <root>/train/<pid>/<pid>_<n>_<cam>_<date><time>_<n>_<n>.jpg and <root>/test/... (V1),
  or mask_train_v2/ and mask_test_v2/ (V2); <root> may also hold them under MSMT17_V1/ or MSMT17_V2/"""
    _versions = (("train", "test"), ("mask_train_v2", "mask_test_v2"))
    _lists = ("list_train.txt", "list_query.txt", "list_gallery.txt")

    def __init__(self, root, combine_all: bool = False):
        super().__init__(root)
        base = None
        for sub in ("", "MSMT17_V1", "MSMT17_V2"):
            for train_dir, test_dir in self._versions:
                candidate = self.root / sub if sub else self.root
                if all((candidate / n).exists() for n in self._lists + (train_dir, test_dir)):
                    base, dirs = candidate, (train_dir, test_dir)
                    break
            if base is not None:
                break
        if base is None:  # name what is missing, for the V1 layout
            self._find_root(self._lists + self._versions[0])
        self.root = base
        train_dir, test_dir = base / dirs[0], base / dirs[1]
        train = self._read_list(base / "list_train.txt", train_dir)
        if (base / "list_val.txt").exists():
            train += self._read_list(base / "list_val.txt", train_dir)
        self.query = self._read_list(base / "list_query.txt", test_dir)
        self.gallery = self._read_list(base / "list_gallery.txt", test_dir)
        if combine_all:  # test identities are distinct people: offset them past the training ids
            offset = max(pid for _, pid, _ in train) + 1
            train += [(p, pid + offset, c) for p, pid, c in self.query + self.gallery]
        self.train = relabel(train)

    def _read_list(self, list_file: Path, image_dir: Path) -> List[Item]:
        items = []
        prefix = image_dir.name + "/"
        for number, line in enumerate(list_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                relpath, pid = fields[0], int(fields[1])
                cam = int(os.path.basename(relpath).split("_")[2])
            except (IndexError, ValueError):
                raise self._error(f"cannot read '<relpath> <pid>' with a camera in the name from "
                                  f"line {number} of {list_file}: {line!r}") from None
            if pid == JUNK_PID:
                continue
            if cam < 1:
                raise self._error(f"camera {cam} (cameras start at 1) on line {number} of {list_file}")
            relpath = relpath[len(prefix):] if relpath.startswith(prefix) else relpath
            items.append((str(image_dir / relpath), pid, cam - 1))
        return items


# --- RandPerson ------------------------------------------------------------------------------------

_RANDPERSON = re.compile(r"^(\d+)_s(\d+)_c(\d+)_f(\d+)")


@register_dataset("randperson")
class RandPerson(ReidDataset):
    """RandPerson subset: ``<root>/randperson_subset/<pid>_s<scene>_c<cam>_f<frame>.jpg`` (upstream's
    comment: ``id6_s2_c2_f6``). Cameras are numbered from 0 within a scene; upstream's per-scene
    offsets turn (scene, cam) into 19 global cameras. Training only: query and gallery are empty."""

    name = "RandPerson"
    layout = """  <root>/randperson_subset/<pid>_s<scene>_c<cam>_f<frame>.jpg   e.g. 000000_s00_c00_f000000.jpg
  (scenes 0..10, cameras from 0 within a scene)"""
    camera_offset = (0, 2, 4, 6, 8, 9, 10, 12, 13, 14, 15)  # upstream reid/datasets/randperson.py

    def __init__(self, root):
        super().__init__(root)
        folder = self._find_root(["randperson_subset"]) / "randperson_subset"
        items = []
        for path in self._list_images(folder, IMAGE_EXTENSIONS):
            match = _RANDPERSON.match(path.name)
            if match is None:
                raise self._error(f"cannot read <pid>_s<scene>_c<cam>_f<frame> from the file name {path}")
            pid, scene, cam = (int(g) for g in match.groups()[:3])
            if scene >= len(self.camera_offset):
                raise self._error(f"scene {scene} is beyond the {len(self.camera_offset)} known scenes in {path}")
            items.append((str(path), pid, self.camera_offset[scene] + cam))
        self.train = relabel(items)
