"""Ranking a gallery folder: its features kept in an index on disk, ranked shard by shard.

A gallery of ``N`` images holds ``N`` feature maps (a TransMatcher feature is 192 x 512 floats,
384 KiB: a 100k-image gallery is ~39 GB), so it is never held whole:

- :class:`GalleryIndex` keeps the features in shard files of bounded size beside an
  ``index.json`` that records, per image, its size and modification time (and the checkpoint's
  fingerprint for the whole index). :meth:`GalleryIndex.update` extracts only the images that are
  new or changed since the last run (all of them when the checkpoint or input size changed);
  unchanged images keep their stored features, removed ones are dropped.
- :func:`stream_topk` ranks queries against the shards one at a time through the engine's
  blocked matching (``matching.match`` with ``topk``), merging each shard's candidates into a
  running top-k per query: memory follows one shard plus ``Nq x k``, whatever the gallery size.
- :class:`Ranking` is the result (gallery indices, paths and distances per query) and
  :func:`write_ranking` writes it as CSV (``query,rank,gallery,distance``) or JSON lines.

Shards are written and read through ``weights_io`` (weights-only loading: an index folder from
elsewhere cannot run code).
"""

from __future__ import annotations

import csv
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import weights_io
from .features import Features
from .matching import TopK, match

PathLike = Union[str, os.PathLike]
INDEX_FORMAT = "transmatcher_fast.search_index/1"
INDEX_NAME = "index.json"
# A shard holds about this many bytes of features (one is loaded at a time while ranking).
SHARD_BYTES = 256 * 2 ** 20
DISTANCE_COLUMN = "distance"


def shard_images(bytes_per_image: int, limit: int = SHARD_BYTES) -> int:
    """Images per shard so that a shard holds about ``limit`` bytes (at least one image)."""
    return max(1, int(limit) // max(1, int(bytes_per_image)))


def _key(path: str) -> str:
    """An image's entry in the index: its absolute path (the same file whatever the working
    folder or the spelling of the gallery path)."""
    return os.path.abspath(path)


def _stat(path: str) -> Tuple[int, int]:
    info = os.stat(path)
    return int(info.st_size), int(info.st_mtime_ns)


@dataclass
class IndexUpdate:
    """What :meth:`GalleryIndex.update` did: ``reused`` images kept their stored features,
    ``extracted`` were (re-)extracted, ``removed`` left the gallery; ``rebuilt`` is the reason
    the whole index was rebuilt (no index yet, another checkpoint, ...) or None; ``skipped``
    lists ``(path, error)`` of unreadable images left out (``skip_bad_images``)."""
    reused: int = 0
    extracted: int = 0
    removed: int = 0
    rebuilt: Optional[str] = None
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        why = f" ({self.rebuilt})" if self.rebuilt else ""
        if not self.extracted and not self.removed and not self.rebuilt:
            return f"reused the stored features of all {self.reused} gallery images (unchanged)"
        return (f"reused {self.reused} stored gallery features, extracted {self.extracted} "
                f"(new or changed), dropped {self.removed} removed{why}")


class GalleryIndex:
    """The stored features of the images of one gallery folder, for one model.

    ``folder``: where ``index.json`` and the shards live (created when needed). ``model_key``: a
    JSON-able dict that identifies the features (the checkpoint's fingerprint, the input size,
    the autocast): an index made with another key is rebuilt. After :meth:`update`, ``paths``
    are the gallery's readable images in sorted order; a ranked index is a position in it."""

    def __init__(self, folder: PathLike, model_key: Dict[str, Any]):
        self.folder = Path(folder)
        self.model_key = json.loads(json.dumps(model_key))  # as it reads back from the file
        self.paths: List[str] = []
        # absolute path -> size, mtime_ns, shard, row, error
        self._entries: Dict[str, Dict[str, Any]] = {}
        self._shards: Dict[str, int] = {}  # shard file name -> rows
        self._next_shard = 0
        self._stale: Optional[str] = None  # why the stored index cannot be used
        self._read()

    # --- the index file --------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.folder / INDEX_NAME

    def _read(self) -> None:
        if not self.index_path.is_file():
            self._stale = "no index yet"
            return
        try:
            stored = json.loads(self.index_path.read_text())
        except (OSError, ValueError):
            self._stale = f"{self.index_path} could not be read"
            return
        if not isinstance(stored, dict) or stored.get("format") != INDEX_FORMAT:
            self._stale = f"{self.index_path} is not an index of this version"
            return
        if stored.get("model") != self.model_key:
            self._stale = "built with another checkpoint or input size"
            self._shards = dict(stored.get("shards", {}))  # deleted by the rebuild
            return
        self._entries = dict(stored.get("files", {}))
        self._shards = dict(stored.get("shards", {}))
        self._next_shard = int(stored.get("next_shard", len(self._shards)))
        missing = [name for name in self._shards if not (self.folder / name).is_file()]
        if missing:
            self._stale = f"shard {missing[0]} is missing"
            self._entries = {}

    def _write(self) -> None:
        record = {"format": INDEX_FORMAT, "model": self.model_key, "shards": self._shards,
                  "next_shard": self._next_shard, "files": self._entries}
        weights_io.atomic_write(self.index_path, lambda f: json.dump(record, f), "w")

    def _drop_unused_shards(self) -> None:
        used = {e["shard"] for e in self._entries.values() if e.get("shard") is not None}
        for name in [n for n in self._shards if n not in used]:
            (self.folder / name).unlink(missing_ok=True)
            del self._shards[name]

    # --- updating --------------------------------------------------------------------------
    def changed(self, paths: Sequence[str]) -> List[str]:
        """The images of ``paths`` whose features are not stored (new, changed, or every one
        when the index is stale), in the order given."""
        if self._stale:
            return list(paths)
        out = []
        for path in paths:
            entry = self._entries.get(_key(path))
            if entry is None or [entry["size"], entry["mtime_ns"]] != list(_stat(path)):
                out.append(path)
        return out

    def update(self, paths: Sequence[str], extract: Callable[[List[str]], Features], *,
               per_shard: Union[int, Callable[[], int]], on_shard: Optional[Callable[[int], None]] = None,
               skipped: Sequence[Tuple[str, str]] = ()) -> IndexUpdate:
        """Bring the index up to date with the gallery images ``paths`` (sorted; each path as
        it will be reported): the new and changed images are extracted ``per_shard`` at a time
        with ``extract(paths) -> Features`` (rows for the readable ones, ``Features.skipped``
        the others; ``per_shard`` may be a function, called only when there is something to
        extract) and each shard is saved, with the index, as soon as it is done (an
        interrupted update keeps what it finished). ``skipped``: unreadable images found
        beforehand, recorded as such (not retried until they change). ``on_shard(images)``
        is called after each shard (progress)."""
        paths = [str(p) for p in paths]
        report = IndexUpdate(rebuilt=self._stale)
        if self._stale:
            self._entries = {}
            self._drop_unused_shards()
            self._stale = None
        current = {_key(p) for p in paths}
        removed = [p for p in self._entries if p not in current]
        for path in removed:
            del self._entries[path]
        report.removed = len(removed)
        bad = dict(skipped)
        todo = self.changed(paths)
        for path in todo:
            self._entries.pop(_key(path), None)
        report.reused = sum(1 for p in paths if self._entries.get(_key(p), {}).get("shard") is not None)
        for path, error in bad.items():
            if _key(path) in current:
                self._entries[_key(path)] = self._entry(path, error=error)
        todo = [p for p in todo if p not in bad]
        # Each image's size and time as they were before it was read: an image rewritten while
        # it is being extracted does not match them, and is extracted again next time.
        seen = {path: _stat(path) if os.path.exists(path) else (-1, -1) for path in todo}
        self.folder.mkdir(parents=True, exist_ok=True)
        if callable(per_shard):
            per_shard = per_shard() if todo else 1
        for start in range(0, len(todo), per_shard):
            chunk = todo[start:start + per_shard]
            features = extract(chunk)
            for path, error in features.skipped:
                self._entries[_key(path)] = self._entry(path, error=error, stat=seen.get(path))
            if len(features):
                # A name no other process can also choose: two searches updating one index
                # never overwrite each other's shards (the last index.json names its own).
                name = f"shard-{self._next_shard:05d}-{uuid.uuid4().hex[:8]}.pt"
                self._next_shard += 1
                weights_io.save_atomic({"features": features.features.contiguous()}, self.folder / name)
                self._shards[name] = len(features)
                rows = range(len(chunk)) if features.indices is None else features.indices.tolist()
                for row, position in enumerate(rows):
                    self._entries[_key(chunk[position])] = self._entry(chunk[position], shard=name, row=row,
                                                                       stat=seen[chunk[position]])
            report.extracted += len(features)
            report.skipped += list(features.skipped)
            self._write()
            if on_shard is not None:
                on_shard(len(chunk))
        report.skipped = [(p, bad[p]) for p in paths if p in bad] + report.skipped
        if report.rebuilt or report.removed or todo or bad or not self.index_path.is_file():
            self._drop_unused_shards()
            self._write()  # an unchanged gallery leaves the index file as it was
        self.paths = [p for p in paths if self._entries[_key(p)].get("shard") is not None]
        return report

    @staticmethod
    def _entry(path: str, shard: Optional[str] = None, row: int = 0, error: Optional[str] = None,
               stat: Optional[Tuple[int, int]] = None):
        if stat is None:
            stat = _stat(path) if os.path.exists(path) else (-1, -1)
        size, mtime = stat
        entry = {"size": size, "mtime_ns": mtime, "shard": shard, "row": row}
        if error is not None:
            entry["error"] = error
        return entry

    def unreadable(self, paths: Sequence[str]) -> List[Tuple[str, str]]:
        """``(path, error)`` of the images of ``paths`` recorded as unreadable and unchanged."""
        return [(p, self._entries[_key(p)]["error"]) for p in paths
                if "error" in self._entries.get(_key(p), {})]

    # --- reading ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.paths)

    def _load_shard(self, name: str) -> Tensor:
        return weights_io.load(self.folder / name, mmap=True)["features"]

    def shards(self) -> Iterator[Tuple[Tensor, Tensor]]:
        """``(features [n, ...], positions [n])`` of each shard in turn: the stored rows of the
        gallery's current images and their positions in :attr:`paths`."""
        by_shard: Dict[str, Tuple[List[int], List[int]]] = {}
        for position, path in enumerate(self.paths):
            entry = self._entries[_key(path)]
            rows, positions = by_shard.setdefault(entry["shard"], ([], []))
            rows.append(entry["row"])
            positions.append(position)
        for name in sorted(by_shard):
            rows, positions = by_shard[name]
            stored = self._load_shard(name)
            yield stored[torch.tensor(rows)], torch.tensor(positions, dtype=torch.int64)

    def features_of(self, positions: Iterable[int]) -> Tensor:
        """The stored features of the gallery images at ``positions`` (in that order)."""
        positions = [int(p) for p in positions]
        loaded: Dict[str, Tensor] = {}
        rows = []
        for position in positions:
            entry = self._entries[_key(self.paths[position])]
            if entry["shard"] not in loaded:
                loaded[entry["shard"]] = self._load_shard(entry["shard"])
            rows.append(loaded[entry["shard"]][entry["row"]])
        return torch.stack(rows)


# ----------------------------------------------------------------------------- ranking

def merge_topk(best: Optional[TopK], new: TopK, k: int) -> TopK:
    """The ``k`` nearest of two candidate lists per query (``index`` global gallery positions),
    nearest first; equal distances keep the lower gallery position first, so the result does
    not depend on how the gallery was cut into shards."""
    if best is not None:
        new = TopK(torch.cat((best.dist, new.dist), 1), torch.cat((best.index, new.index), 1))
    by_index = new.index.argsort(dim=1, stable=True)
    dist, index = new.dist.gather(1, by_index), new.index.gather(1, by_index)
    order = dist.argsort(dim=1, stable=True)[:, :k]
    return TopK(dist.gather(1, order), index.gather(1, order))


@torch.no_grad()
def stream_topk(matcher: nn.Module, query: Tensor, shards: Iterable[Tuple[Tensor, Tensor]], topk: int, *,
                device=None, amp=None, probe_chunk: Optional[int] = None,
                gallery_chunk: Optional[int] = None) -> TopK:
    """The ``topk`` nearest gallery images of each query over ``shards`` of ``(features,
    positions)`` (see :meth:`GalleryIndex.shards`), one shard at a time through
    ``matching.match``: the result's ``index`` holds gallery positions, its ``dist`` the
    matcher's distances (lower = closer). Equals ranking the whole gallery at once."""
    best = None
    for features, positions in shards:
        if not len(features):
            continue
        part = match(matcher, query, features, device=device, amp=amp, probe_chunk=probe_chunk,
                     gallery_chunk=gallery_chunk, topk=min(topk, len(features)))
        best = merge_topk(best, TopK(part.dist, positions[part.index]), topk)
    if best is None:
        raise ValueError("the gallery has no images to rank")
    return best


@dataclass
class Ranking:
    """The nearest gallery images of each query, nearest first.

    ``indices`` ``[Nq, k]`` int64: positions in the gallery (``gallery_paths`` when the gallery
    was files); ``distances`` ``[Nq, k]`` float32, lower = closer (``distance_name`` says which
    distance: the fused matchers' ``1 - sigmoid(score / 10)``, the embeddings' Euclidean or
    cosine); ``query_paths`` / ``gallery_paths`` the images' files (None for images given as
    PIL images or tensors). ``index_update``: what the gallery index reused and extracted."""
    indices: Tensor
    distances: Tensor
    query_paths: Optional[List[str]] = None
    gallery_paths: Optional[List[str]] = None
    distance_name: str = ""
    index_update: Optional[IndexUpdate] = None
    kind = "distance"  # what the values are (all our comparers rank by a distance)

    @property
    def topk(self) -> int:
        return int(self.indices.shape[1])

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def paths(self) -> List[List[str]]:
        """Per query, the ranked gallery files (or ``"#<position>"`` without files)."""
        return [[self.gallery_name(g) for g in row] for row in self.indices.tolist()]

    def gallery_name(self, position: int) -> str:
        return self.gallery_paths[position] if self.gallery_paths is not None else f"#{position}"

    def query_name(self, query: int) -> str:
        return self.query_paths[query] if self.query_paths is not None else f"#{query}"

    def records(self) -> Iterator[Dict[str, Any]]:
        """One ``{"query", "rank", "gallery", "distance"}`` per query and rank (rank from 1)."""
        for qi, (row, values) in enumerate(zip(self.indices.tolist(), self.distances.tolist())):
            for rank, (g, value) in enumerate(zip(row, values), start=1):
                yield {"query": self.query_name(qi), "rank": rank, "gallery": self.gallery_name(g),
                       self.kind: value}


def write_ranking(path: PathLike, ranking: Ranking) -> Path:
    """``ranking`` as CSV (columns ``query,rank,gallery,distance``, one row per query and rank)
    or, for a ``.jsonl`` / ``.json`` name, JSON lines (one object per query: ``query`` and
    ``ranked``, a list of ``{rank, gallery, distance}``); written atomically. Values print
    with ``repr`` precision (they read back exactly)."""
    path = Path(path)
    as_json = path.suffix.lower() in (".jsonl", ".json")

    def write(file) -> None:
        if as_json:
            for qi, row in enumerate(ranking.indices.tolist()):
                values = ranking.distances[qi].tolist()
                ranked = [{"rank": r, "gallery": ranking.gallery_name(g), ranking.kind: v}
                          for r, (g, v) in enumerate(zip(row, values), start=1)]
                file.write(json.dumps({"query": ranking.query_name(qi), "ranked": ranked}) + "\n")
            return
        writer = csv.writer(file)
        writer.writerow(["query", "rank", "gallery", ranking.kind])
        for record in ranking.records():
            writer.writerow([record["query"], record["rank"], record["gallery"], repr(record[ranking.kind])])

    return weights_io.atomic_write(path, write, "w")
