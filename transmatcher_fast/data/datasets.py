"""Person and vehicle re-ID datasets read from their public folder layouts.

Every dataset exposes ``train``, ``query`` and ``gallery`` as lists of ``(path, pid, camid)`` with an
absolute path, cameras 0-based and training identities relabelled to ``0..N-1``. Query and gallery
keep the identities written in the file names, so that the evaluation can compare them.

Side information and test protocols are generic, so that no caller branches on a dataset's name:

* ``train_views`` / ``query_views`` / ``gallery_views`` (or ``views_of(items)``) give a viewpoint
  per item, aligned with the split, or None when the dataset has no view labels (persons);
* ``num_train_cameras`` / ``num_train_views`` size TransReID's SIE tables from the training split;
* ``test_splits(trials, seed)`` gives the ``(query, gallery)`` pairs to evaluate and average: one
  fixed pair for most datasets, ``trials`` seeded random draws for VehicleID.

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
import warnings
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


def dataset_root(data_dir, dataset: str) -> Path:
    """``data_dir`` itself, or upstream's ``<data_dir>/<dataset>`` when that folder exists."""
    nested = Path(data_dir).expanduser() / dataset
    return nested if nested.is_dir() else Path(data_dir).expanduser()


def build_dataset(name: str, root, **kwargs) -> "ReidDataset":
    """``name`` is a registry key (``dataset_names()``); ``root`` the dataset's own folder."""
    try:
        cls = _REGISTRY[name.lower()]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}") from None
    return cls(root, **kwargs)


class ReidDataset:
    """Base class: subclasses fill ``train``, ``query`` and ``gallery`` in ``__init__``.

    A subclass with view labels fills ``_views`` (absolute image path -> view, 0-based) for every
    image it keeps; one whose test protocol draws random query/gallery splits overrides
    :meth:`test_splits` and sets ``default_trials``. ``notes`` are lines :meth:`summary` prints
    under its table (where views came from, what was skipped, the test protocol).
    """

    name = "dataset"
    layout = ""  # the expected layout, quoted in every error message
    default_trials = 1  # how many (query, gallery) splits test_splits() gives by default
    # camid + camera_base is the camera as the dataset's own names number it (Market-1501's
    # 0001_c1s1_... is camid 0, camera 1): what pictures and exports show a person.
    camera_base = 0

    def __init__(self, root):
        self.root = Path(root).expanduser()
        self.train: List[Item] = []
        self.query: List[Item] = []
        self.gallery: List[Item] = []
        self._views: Optional[Dict[str, int]] = None
        self.notes: List[str] = []

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

    def drop_train_images(self, paths: Iterable[str]) -> None:
        """Leave the training images at ``paths`` out (unreadable files, ``--skip-bad-images``);
        identities are renumbered 0..N-1 again if one loses all its images."""
        drop = {str(p) for p in paths}
        self.train = relabel([item for item in self.train if str(item[0]) not in drop])

    # --- views ------------------------------------------------------------------------------
    @property
    def has_views(self) -> bool:
        return self._views is not None

    def views_of(self, items: Sequence[Item]) -> Optional[List[int]]:
        """The view of each item (a list aligned with ``items``), or None when the dataset has no
        view labels. Works on any items of this dataset, e.g. those of :meth:`test_splits`."""
        if self._views is None:
            return None
        try:
            return [self._views[path] for path, _, _ in items]
        except KeyError as error:
            raise KeyError(f"{self.name}: no view label for {error.args[0]} (not an image of this "
                           f"dataset)") from None

    @property
    def train_views(self) -> Optional[List[int]]:
        return self.views_of(self.train)

    @property
    def query_views(self) -> Optional[List[int]]:
        return self.views_of(self.query)

    @property
    def gallery_views(self) -> Optional[List[int]]:
        return self.views_of(self.gallery)

    # --- test protocol ------------------------------------------------------------------------
    def test_splits(self, trials: Optional[int] = None, seed: int = 0) -> List[Tuple[List[Item], List[Item]]]:
        """The ``(query, gallery)`` pairs to evaluate; the reported metric is their mean.

        A dataset with a fixed split has exactly one, ``(self.query, self.gallery)``, whatever
        ``trials`` and ``seed``; datasets with a random protocol (VehicleID) override this."""
        self._check_trials(trials)
        return [(self.query, self.gallery)]

    @staticmethod
    def _check_trials(trials: Optional[int]) -> None:
        if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
            raise ValueError(f"trials must be a positive int or None, got {trials!r}")

    # --- statistics -------------------------------------------------------------------------
    @property
    def num_train_ids(self) -> int:
        return len({pid for _, pid, _ in self.train})

    @property
    def num_train_cameras(self) -> int:
        """Size of the camera table that the training camids index: highest camid + 1 (upstream
        counts distinct cameras, the same number when the ids have no gaps, as on every published
        set). 1 means no camera SIE (VehicleID); 0 for an empty training split."""
        return max((c for _, _, c in self.train), default=-1) + 1

    @property
    def num_train_views(self) -> int:
        """Size of the view table: highest training view + 1; 1 (one view for every image, no view
        SIE) when the dataset has no view labels, as for persons."""
        views = self.train_views
        if views is None:
            return 1
        return max(views, default=-1) + 1

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
        lines.append(f"  train camera ids: {self.num_train_cameras}, view ids: {self.num_train_views}"
                     + ("" if self.has_views else " (no view labels)"))
        lines += [f"  {note}" for note in self.notes]
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
    camera_base = 1
    splits = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}

    def __init__(self, root):
        super().__init__(root)
        base = self._find_root(list(self.splits.values()), self.aliases)
        self.root = base
        parsed = {split: self._parse_folder(base / folder, is_train=split == "train")
                  for split, folder in self.splits.items()}
        for split, items in self._select(parsed).items():
            setattr(self, split, relabel(items) if split == "train" else items)

    def _select(self, parsed: Dict[str, List[Item]]) -> Dict[str, List[Item]]:
        """Hook between parsing and relabelling (VeRi drops the images without a view here, so
        that the training ids stay contiguous)."""
        return parsed

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


@register_dataset("occluded_duke", "occ_duke")
class OccludedDuke(DukeMTMCreID):
    """Occluded-Duke (Miao et al. ICCV 2019): DukeMTMC-reID images re-split so that the query holds
    occluded people; same file names and parsing as Duke (cameras 1-8 -> 0-7)."""

    name = "Occluded-Duke"
    aliases = ("Occluded_Duke",)
    layout = DukeMTMCreID.layout + "\n  (or those three under <root>/Occluded_Duke/)"


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
        self.camera_base = cam_base
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

    camera_base = 1  # the list files' names number cameras from 1
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


# --- VeRi-776: <pid>_c<cam> names, viewpoints from the keypoint files ------------------------------

@register_dataset("veri", "veri776")
class VeRi776(_PidCamFolders):
    """VeRi-776 (Liu et al. ICME 2016): ``image_train``, ``image_query``, ``image_test`` of
    ``<pid>_c<cam>_<frame>_<n>.jpg`` (cameras 1-20 -> 0-19).

    Viewpoints (0-7) are the last column of upstream's ``keypoint_train.txt`` / ``keypoint_test.txt``
    (lines ``VeRi/image_test/<name>.jpg <40 keypoint coordinates> <view>``), looked up by the image's
    basename in either file, as upstream does. The files are read from ``keypoint_dir`` when given,
    otherwise from the first of the dataset folder, ``root`` and their ``datasets/`` sub-folders
    that holds them. Without them the views are unknown (``*_views`` are None, noted in
    :meth:`summary`), which is not an error.

    Images the files give no view are reported, never dropped silently: ``missing_views="skip"``
    drops them with a warning and a line in :meth:`summary` (upstream's behaviour, which only prints
    a count), ``"error"`` raises a :class:`DatasetLayoutError`. The report is kept in
    ``missing_views_report`` (split -> basenames).
    """

    name = "VeRi-776"
    aliases = ("VeRi",)
    splits = {"train": "image_train", "query": "image_query", "gallery": "image_test"}
    keypoint_files = ("keypoint_train.txt", "keypoint_test.txt")
    num_views = 8  # VeRi's orientation classes
    layout = """  <root>/image_train/<pid>_c<cam>_<frame>_<n>.jpg   e.g. 0001_c001_00016450_0.jpg
  <root>/image_query/...jpg   <root>/image_test/...jpg   (or those three under <root>/VeRi/)
  views (optional): keypoint_train.txt, keypoint_test.txt from upstream's datasets/ folder, in <root>,
  <root>/datasets/ or keypoint_dir; each line '<path> <40 keypoint coordinates> <view 0-7>'"""

    def __init__(self, root, keypoint_dir=None, missing_views: str = "skip"):
        if missing_views not in ("skip", "error"):
            raise ValueError(f"missing_views must be 'skip' or 'error', got {missing_views!r}")
        self.missing_views = missing_views
        self.keypoint_dir = None if keypoint_dir is None else Path(keypoint_dir).expanduser()
        self._given_root = Path(root).expanduser()
        self.missing_views_report: Dict[str, List[str]] = {}
        super().__init__(root)

    # --- keypoint files -------------------------------------------------------------------------
    def _find_keypoint_files(self) -> Optional[Tuple[Path, Path]]:
        """Both keypoint files, or None when neither is found; one without the other is an error."""
        if self.keypoint_dir is not None:
            if not self.keypoint_dir.is_dir():
                raise self._error(f"keypoint folder {self.keypoint_dir} does not exist")
            missing = [str(self.keypoint_dir / n) for n in self.keypoint_files
                       if not (self.keypoint_dir / n).is_file()]
            if missing:
                raise self._error(f"missing {', '.join(missing)}")
            return tuple(self.keypoint_dir / n for n in self.keypoint_files)
        folders = self._keypoint_folders()
        found = [next((f / n for f in folders if (f / n).is_file()), None) for n in self.keypoint_files]
        if found[0] is None and found[1] is None:
            return None
        if None in found:
            have, lack = (found[0], self.keypoint_files[1]) if found[1] is None else (found[1], self.keypoint_files[0])
            raise self._error(f"found {have} but no {lack} in {', '.join(map(str, folders))}; "
                              f"views need both files (or pass keypoint_dir=)")
        return found[0], found[1]

    def _keypoint_folders(self) -> List[Path]:
        """Where the keypoint files are looked for without ``keypoint_dir``, in order."""
        folders: List[Path] = []
        for folder in (self.root, self._given_root, self.root / "datasets", self._given_root / "datasets"):
            if folder not in folders:
                folders.append(folder)
        return folders

    def _read_keypoints(self, path: Path) -> Dict[str, int]:
        views = {}
        for number, line in enumerate(path.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) < 2:
                    raise ValueError
                view = int(fields[-1])
            except ValueError:
                raise self._error(f"cannot read '<path> ... <view>' from line {number} of {path}: "
                                  f"{line[:120]!r}") from None
            if not 0 <= view < self.num_views:
                raise self._error(f"view {view} (views are 0..{self.num_views - 1}) on line {number} of {path}")
            views[os.path.basename(fields[0])] = view
        return views

    # --- views ----------------------------------------------------------------------------------
    def _select(self, parsed: Dict[str, List[Item]]) -> Dict[str, List[Item]]:
        files = self._find_keypoint_files()
        if files is None:
            self.notes.append("views unknown: no " + " / ".join(self.keypoint_files) + " in "
                              + ", ".join(map(str, self._keypoint_folders())) + " (pass keypoint_dir=)")
            return parsed
        view_of: Dict[str, int] = {}
        for path in files:  # a basename in both files keeps its training view, as upstream
            for name, view in self._read_keypoints(path).items():
                view_of.setdefault(name, view)
        kept, missing = {}, {}
        for split, items in parsed.items():
            kept[split] = [item for item in items if os.path.basename(item[0]) in view_of]
            missing[split] = [os.path.basename(p) for p, _, _ in items if os.path.basename(p) not in view_of]
        self.missing_views_report = {split: names for split, names in missing.items() if names}
        total = sum(len(names) for names in missing.values())
        source = f"views from {files[0]} and {files[1]}"
        if total:
            report = f"{total} images without a view in the keypoint files ({self._describe(missing)})"
            if self.missing_views == "error":
                raise self._error(f"{report}; {source}. Pass missing_views='skip' to drop them "
                                  f"(upstream's behaviour)")
            warnings.warn(f"{self.name}: skipped {report}", stacklevel=4)
            self.notes.append(f"skipped {report}")
        self.notes.insert(0, source)
        self._views = {path: view_of[os.path.basename(path)] for items in kept.values() for path, _, _ in items}
        return kept

    @staticmethod
    def _describe(missing: Dict[str, List[str]], first: int = 5) -> str:
        parts = []
        for split, names in missing.items():
            if names:
                more = f", ... {len(names) - first} more" if len(names) > first else ""
                parts.append(f"{split} {len(names)}: {', '.join(names[:first])}{more}")
        return "; ".join(parts)


# --- VehicleID: list files, random gallery draws -------------------------------------------------

@register_dataset("vehicleid")
class VehicleID(ReidDataset):
    """VehicleID (Liu et al. CVPR 2016): ``train_test_split/train_list.txt`` and
    ``test_list_{800,1600,2400}.txt`` (small / medium / large test sets) of lines ``<name> <pid>``,
    images ``image/<name>.jpg``.

    There are no cameras: training images get camid 0 (``num_train_cameras`` is 1, so no camera
    SIE) and there are no view labels. The test protocol draws, for every test identity, one random
    image into the gallery (camid 1) and the rest into the query (camid 0), ``trials`` times (10 by
    default) from ``numpy.random.default_rng(seed)``; :meth:`test_splits` gives the draws and the
    reported metric is their mean. ``query`` / ``gallery`` hold the first draw of ``seed``, i.e.
    ``test_splits(seed=seed)[0]``. Test pids keep their original numbers.
    """

    name = "VehicleID"
    default_trials = 10
    test_sizes = (800, 1600, 2400)
    published_train_ids = 13164
    layout = """  <root>/image/<name>.jpg
  <root>/train_test_split/train_list.txt                      lines '<name> <pid>', e.g. '0001083 1'
  <root>/train_test_split/test_list_{800,1600,2400}.txt   (test_size=800 | 1600 | 2400)
  (or those under <root>/VehicleID_V1.0/)"""

    def __init__(self, root, test_size: int = 800, seed: int = 0):
        super().__init__(root)
        if test_size not in self.test_sizes:
            raise ValueError(f"test_size must be one of {self.test_sizes}, got {test_size!r}")
        self.test_size, self.seed = test_size, seed
        test_list = f"train_test_split/test_list_{test_size}.txt"
        base = self._find_root(["image", "train_test_split/train_list.txt", test_list],
                               aliases=("VehicleID_V1.0",))
        self.root = base
        self.image_dir = base / "image"
        self.train = relabel([(path, pid, 0) for path, pid in self._read_list(base / "train_test_split/train_list.txt")])
        groups: Dict[int, List[str]] = {}
        for path, pid in self._read_list(base / test_list):
            groups.setdefault(pid, []).append(path)
        self._test_groups = list(groups.items())  # identities in the order the list first names them
        self.query, self.gallery = self._draw(self._rng(seed))
        self.notes.append(f"test protocol: test_list_{test_size}.txt, {len(groups)} identities; "
                          f"{self.default_trials} random splits of one gallery image per identity "
                          f"(the rest query), averaged; the table shows the first draw of seed {seed}")
        if self.num_train_ids != self.published_train_ids or len(groups) != test_size:
            self.notes.append(f"note: {self.num_train_ids} train / {len(groups)} test identities "
                              f"(published: {self.published_train_ids} / {test_size})")

    def _read_list(self, list_file: Path) -> List[Tuple[str, int]]:
        entries = []
        for number, line in enumerate(list_file.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != 2:
                    raise ValueError
                name, pid = fields[0], int(fields[1])
            except ValueError:
                raise self._error(f"cannot read '<name> <pid>' from line {number} of {list_file}: "
                                  f"{line[:120]!r}") from None
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                name += ".jpg"
            entries.append((str(self.image_dir / name), pid))
        if not entries:
            raise self._error(f"{list_file} lists no images")
        return entries

    @staticmethod
    def _rng(seed: int):
        import numpy as np
        return np.random.default_rng(seed)

    def _draw(self, rng) -> Tuple[List[Item], List[Item]]:
        query, gallery = [], []
        for pid, paths in self._test_groups:
            pick = int(rng.integers(len(paths)))
            gallery.append((paths[pick], pid, 1))
            query.extend((path, pid, 0) for i, path in enumerate(paths) if i != pick)
        return query, gallery

    def test_splits(self, trials: Optional[int] = None, seed: int = 0) -> List[Tuple[List[Item], List[Item]]]:
        """``trials`` (default 10) random query/gallery splits, drawn in turn from one
        ``numpy.random.default_rng(seed)``: the same seed gives the same splits."""
        self._check_trials(trials)
        rng = self._rng(seed)
        return [self._draw(rng) for _ in range(self.default_trials if trials is None else trials)]
