"""Exports of an evaluation, and what every result says about where it came from.

- ``provenance``: the record every results dict / ``results.json`` of an evaluation carries:
  package and torch versions, the model configuration, the checkpoint, the dataset (name, root,
  counts of images / identities / cameras), the protocol and the date.
- ``save_matrix`` / ``load_matrix``: the query x gallery distances (or matcher scores) as an
  ``.npz``: a dense matrix, or a top-k list (values and gallery indices), with the items' paths,
  ids and cameras and the provenance. Read back with ``numpy.load(path)`` (no pickles).
- ``ranked_results`` / ``write_ranked_results``: per query its path, pid and camera, then its
  ``topk`` nearest gallery images (path, pid, camera, distance), after removing the gallery
  images of the query's identity and camera, as the protocol does; JSON lines (``.jsonl``, one
  query per line) or CSV (``.csv``, one row per query and rank).
- ``save_features`` / ``load_features``: the feature file that ``extract`` writes
  (``torch.save`` of tensors, strings and numbers; read with ``weights_only=True``), so that
  ``evaluate.evaluate_saved`` can evaluate without the images.
- ``write_results_json``: a results dict (one evaluation or several test sets) as JSON.

Distance and score: upstream's distance is ``d = 1 - sigmoid(score / 10)`` (lower = closer);
``kind="score"`` exports ``score = 10 * log((1 - d) / d)``, the matcher's logit (higher = closer).
After re-ranking the values are not ``1 - sigmoid`` distances any more, so they export as
distances only.
"""

from __future__ import annotations

import csv
import datetime as _datetime
import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .. import weights_io
from ..weights_io import atomic_write
from .features import Features
from .matching import TopK

Item = Tuple[str, int, int]
PathLike = Union[str, Path]
KINDS = ("distance", "score")
DISTANCE = "1 - sigmoid(score / 10)"
FEATURES_FORMAT = "transmatcher_fast.features/1"


# ----------------------------------------------------------------------------- provenance

def _version() -> str:
    from .._version import __version__
    return __version__


def _jsonable(value: Any) -> Any:
    """``value`` with paths, tuples, numpy and torch scalars made JSON (and weights_only) safe."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.generic, Tensor)) and getattr(value, "ndim", 0) == 0:
        return value.item()
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    for kind in (int, float, str):  # subclasses (torch's TorchVersion, enums) as the plain type
        if isinstance(value, kind):
            return kind(value)
    return str(value)


def split_counts(items: Sequence[Item]) -> Dict[str, int]:
    """``{"images", "ids", "cams"}`` of a list of ``(path, pid, camid)``."""
    items = list(items)
    return {"images": len(items), "ids": len({int(p) for _, p, _ in items}),
            "cams": len({int(c) for _, _, c in items})}


def dataset_info(dataset: Any = None, query: Optional[Sequence[Item]] = None,
                 gallery: Optional[Sequence[Item]] = None) -> Dict[str, Any]:
    """``{"name", "root", "query": counts, "gallery": counts}``. ``dataset``: a ``ReidDataset``
    (its class name and root), a name, a dict (kept, counts added) or None; the counts are of
    ``query`` / ``gallery`` (default: the dataset's) as evaluated."""
    if isinstance(dataset, Mapping):
        info = dict(dataset)
    elif isinstance(dataset, str) or dataset is None:
        info = {"name": dataset, "root": None}
    else:
        info = {"name": getattr(dataset, "name", type(dataset).__name__),
                "class": type(dataset).__name__, "root": str(getattr(dataset, "root", None))}
    for split, items in (("query", query), ("gallery", gallery)):
        if items is None:
            items = getattr(dataset, split, None) if not isinstance(dataset, (str, Mapping)) else None
        if items is not None:
            info[split] = split_counts(items)
    return _jsonable(info)


def protocol_info(protocol: str = "market", *, topk: Optional[int] = None, rerank: bool = False,
                  k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                  amp: Any = None, distance: str = DISTANCE) -> Dict[str, Any]:
    """The evaluation protocol as recorded: CMC/mAP variant, distance (the fused matchers' by
    default; a comparer's ``distance_name``), top-k, re-ranking."""
    return _jsonable({"name": protocol, "distance": distance, "same_id_same_camera_removed": True,
                      "topk": topk, "rerank": bool(rerank),
                      "rerank_params": {"k1": k1, "k2": k2, "lambda": lambda_value} if rerank else None,
                      "amp": amp})


def provenance(*, model_config: Optional[Mapping[str, Any]] = None, checkpoint: Optional[PathLike] = None,
               dataset: Any = None, query: Optional[Sequence[Item]] = None,
               gallery: Optional[Sequence[Item]] = None, protocol: Union[str, Mapping, None] = None,
               matcher: Any = None, **extra: Any) -> Dict[str, Any]:
    """Where a result came from: ``package``, ``version``, ``torch``, ``model`` (the model
    configuration, plus the matcher's class when given), ``checkpoint`` (absolute path),
    ``dataset`` (:func:`dataset_info`), ``protocol`` (a name or :func:`protocol_info`),
    ``date`` (ISO 8601, UTC) and any ``extra`` entries."""
    model = dict(model_config) if model_config is not None else {}
    if matcher is not None:
        model.setdefault("matcher_class", type(matcher).__name__)
    record = {"package": "transmatcher_fast", "version": _version(), "torch": str(torch.__version__),
              "model": model or None,
              "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
              "dataset": dataset_info(dataset, query, gallery),
              "protocol": protocol_info(protocol) if isinstance(protocol, str) else protocol,
              "date": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds")}
    record.update(extra)
    return _jsonable(record)


def write_results_json(path: PathLike, results: Mapping[str, Any],
                       provenance_record: Optional[Mapping[str, Any]] = None) -> Path:
    """``results`` (the metrics of one evaluation, or ``{testset: metrics}``) as indented JSON,
    written atomically. A top-level ``provenance`` is added from ``provenance_record`` (or the
    results' own, or a bare :func:`provenance`) when the results do not carry one; every
    evaluation's metrics carry their own anyway."""
    results = dict(results)
    if "provenance" not in results:
        nested = [v.get("provenance") for v in results.values() if isinstance(v, Mapping)]
        results["provenance"] = dict(provenance_record) if provenance_record is not None else (
            nested[0] if nested and nested[0] is not None else provenance())
    text = json.dumps(_jsonable(results), indent=2, allow_nan=True) + "\n"
    return atomic_write(path, lambda f: f.write(text), "w")


# ----------------------------------------------------------------------------- matrices

def distance_to_score(distance: Any) -> np.ndarray:
    """The matcher score of upstream's distance ``1 - sigmoid(score / 10)``:
    ``10 * log((1 - d) / d)``, in float64 (d = 0 / 1 give +inf / -inf)."""
    d = np.asarray(distance, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return 10.0 * (np.log1p(-d) - np.log(d))


def _items_arrays(prefix: str, items: Sequence[Item]) -> Dict[str, np.ndarray]:
    items = list(items)
    return {f"{prefix}_paths": np.array([str(p) for p, _, _ in items], dtype=np.str_),
            f"{prefix}_pids": np.array([int(p) for _, p, _ in items], dtype=np.int64),
            f"{prefix}_cams": np.array([int(c) for _, _, c in items], dtype=np.int64)}


def _dist_arrays(distances: Any) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(values [Nq, Ng] or [Nq, k], index [Nq, k] or None) as numpy, from a dense tensor/array,
    a :class:`TopK` or a ``(dist, index)`` tuple."""
    if isinstance(distances, TopK):
        return distances.dist.cpu().numpy(), distances.index.cpu().numpy()
    if isinstance(distances, tuple):
        d, i = distances
        return (d.cpu().numpy() if isinstance(d, Tensor) else np.asarray(d),
                i.cpu().numpy() if isinstance(i, Tensor) else np.asarray(i))
    return (distances.cpu().numpy() if isinstance(distances, Tensor) else np.asarray(distances)), None


def save_matrix(path: PathLike, distances: Any, query_items: Sequence[Item], gallery_items: Sequence[Item],
                *, kind: str = "distance", provenance_record: Optional[Mapping[str, Any]] = None,
                reranked: bool = False, to_score: Optional[Callable[[Any], Any]] = None) -> Path:
    """Write ``distances`` (dense ``[Nq, Ng]``, a :class:`matching.TopK` or ``(dist, index)``)
    as an uncompressed ``.npz`` with the arrays

    - dense: ``distance`` (or ``score``) float32 ``[Nq, Ng]``;
    - top-k: ``topk_distance`` (or ``topk_score``) float32 ``[Nq, k]`` and ``topk_index`` int64
      ``[Nq, k]`` (gallery positions, nearest first; -1 = padding);
    - ``query_paths`` / ``query_pids`` / ``query_cams`` and the same for ``gallery_``;
    - ``kind`` (``"distance"``/``"score"``), ``layout`` (``"dense"``/``"topk"``), and
      ``provenance`` (a JSON string).

    ``kind="score"`` writes scores (higher = closer): ``to_score(distance)`` (a comparer's
    ``score_of_distance``; default :func:`distance_to_score`, the fused matchers'); re-ranked
    distances (``reranked=True``) have no score and refuse it."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "score" and reranked:
        raise ValueError("re-ranked distances are not 1 - sigmoid(score / 10): export them with "
                         "kind='distance'")
    values, index = _dist_arrays(distances)
    num_query, num_gallery = len(query_items), len(gallery_items)
    if values.ndim != 2 or values.shape[0] != num_query or (index is None and values.shape[1] != num_gallery):
        raise ValueError(f"distances of shape {values.shape} do not fit {num_query} query and "
                         f"{num_gallery} gallery items")
    if index is not None and index.shape != values.shape:
        raise ValueError(f"top-k values {values.shape} and indices {index.shape} differ in shape")
    if kind == "score":
        values = (np.asarray(to_score(values), dtype=np.float64) if to_score is not None
                  else distance_to_score(values))
        if index is not None:
            values[index < 0] = -np.inf
    arrays = {**_items_arrays("query", query_items), **_items_arrays("gallery", gallery_items),
              "kind": np.array(kind), "layout": np.array("dense" if index is None else "topk"),
              "provenance": np.array(json.dumps(_jsonable(provenance_record or provenance())))}
    if index is None:
        arrays[kind] = values.astype(np.float32)
    else:
        arrays[f"topk_{kind}"] = values.astype(np.float32)
        arrays["topk_index"] = index.astype(np.int64)
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: the matrix export is an .npz file")
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_matrix(path: PathLike) -> Dict[str, Any]:
    """What :func:`save_matrix` wrote: the arrays, ``kind`` and ``layout`` as strings and
    ``provenance`` as a dict (read without pickles)."""
    with np.load(path, allow_pickle=False) as data:
        out: Dict[str, Any] = {k: data[k] for k in data.files}
    for key in ("kind", "layout"):
        out[key] = str(out[key])
    out["provenance"] = json.loads(str(out["provenance"]))
    return out


# ----------------------------------------------------------------------------- ranked results

def ranked_results(query_items: Sequence[Item], gallery_items: Sequence[Item], distances: Any, *,
                   topk: int = 10, kind: str = "distance",
                   camera_base: int = 0) -> Iterable[Dict[str, Any]]:
    """One record per query, in query order: ``query`` (path), ``pid``, ``cam`` (the camera as
    the dataset's names number it: camid + the dataset's ``camera_base``), and
    ``ranked``: its ``topk`` nearest gallery images as ``{"rank", "path", "pid", "cam",
    "distance" (or "score"), "same_id"}``, after removing the gallery images of the query's
    identity taken by its camera (the protocol; see ``visualize.rank_gallery``). Equal
    distances keep the lower gallery index first."""
    from .visualize import rank_gallery

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    values, index = _dist_arrays(distances)
    gallery_items = list(gallery_items)
    g_pids = np.array([int(p) for _, p, _ in gallery_items], dtype=np.int64)
    g_cams = np.array([int(c) for _, _, c in gallery_items], dtype=np.int64)
    if values.ndim != 2 or values.shape[0] != len(query_items):
        raise ValueError(f"distances of shape {values.shape} do not fit {len(query_items)} queries")
    for qi, (q_path, q_pid, q_cam) in enumerate(query_items):
        row = values[qi]
        ranked = rank_gallery(row, int(q_pid), int(q_cam), g_pids, g_cams,
                              indices=None if index is None else index[qi], topk=topk)
        if index is None:
            shown = row[ranked]
        else:
            lookup = dict(zip(index[qi].tolist(), row.tolist()))
            shown = np.array([lookup[g] for g in ranked.tolist()], dtype=np.float64)
        if kind == "score":
            shown = distance_to_score(shown)
        yield {"query": str(q_path), "pid": int(q_pid), "cam": int(q_cam) + camera_base,
               "ranked": [{"rank": r + 1, "path": str(gallery_items[g][0]), "pid": int(g_pids[g]),
                           "cam": int(g_cams[g]) + camera_base, kind: float(v), "same_id": bool(g_pids[g] == q_pid)}
                          for r, (g, v) in enumerate(zip(ranked.tolist(), np.asarray(shown).tolist()))]}


CSV_COLUMNS = ("query_path", "query_pid", "query_cam", "rank", "gallery_path", "gallery_pid",
               "gallery_cam", "value", "same_id")


def write_ranked_results(path: PathLike, query_items: Sequence[Item], gallery_items: Sequence[Item],
                         distances: Any, *, topk: int = 10, kind: str = "distance",
                         format: Optional[str] = None, camera_base: int = 0) -> Path:
    """:func:`ranked_results` to ``path``: ``format="jsonl"`` (default for any suffix but
    ``.csv``; one JSON object per query) or ``"csv"`` (header ``query_path, query_pid,
    query_cam, rank, gallery_path, gallery_pid, gallery_cam, distance|score, same_id``, one row
    per query and rank; ``same_id`` 0/1). Distances print with ``repr`` precision (they
    round-trip)."""
    path = Path(path)
    fmt = format or ("csv" if path.suffix.lower() == ".csv" else "jsonl")
    if fmt not in ("jsonl", "csv"):
        raise ValueError(f"format must be 'jsonl' or 'csv', got {format!r}")
    records = ranked_results(query_items, gallery_items, distances, topk=topk, kind=kind,
                             camera_base=camera_base)

    def write(file) -> None:
        if fmt == "jsonl":
            for record in records:
                file.write(json.dumps(record, allow_nan=True) + "\n")
            return
        writer = csv.writer(file)
        writer.writerow([c if c != "value" else kind for c in CSV_COLUMNS])
        for record in records:
            for g in record["ranked"]:
                writer.writerow([record["query"], record["pid"], record["cam"], g["rank"], g["path"],
                                 g["pid"], g["cam"], repr(g[kind]), int(g["same_id"])])

    return atomic_write(path, write, "w")


# ----------------------------------------------------------------------------- feature files

def save_features(path: PathLike, features: Features, items: Optional[Sequence[Item]] = None, *,
                  provenance_record: Optional[Mapping[str, Any]] = None) -> Path:
    """The feature file of ``extract``: ``torch.save`` of ``{"format", "features"`` (on the CPU,
    as stored), ``"pids", "cams"`` (int64), ``"paths"`` (one per row), ``"skipped"`` (``[path,
    error]`` of unreadable images left out), ``"provenance"}``; nothing but tensors, strings and
    numbers, so a weights-only load (``weights_io.load``) reads it. ``items``: the extracted items
    (for the paths when ``features.paths`` is unset; rows are matched through
    ``features.indices`` when images were skipped)."""
    paths = features.paths
    if paths is None:
        if items is None:
            raise ValueError("save_features needs the rows' paths: features.paths or items")
        items = list(items)
        paths = [str(items[i][0]) for i in (features.indices.tolist() if features.indices is not None
                                            else range(len(items)))]
    if len(paths) != len(features):
        raise ValueError(f"{len(paths)} paths for {len(features)} feature rows")
    state = {"format": FEATURES_FORMAT, "features": features.features.detach().cpu(),
             "pids": features.pids.cpu().to(torch.int64), "cams": features.cams.cpu().to(torch.int64),
             "paths": [str(p) for p in paths], "skipped": [[str(p), str(e)] for p, e in features.skipped],
             "provenance": _jsonable(provenance_record or features.provenance or provenance())}
    return atomic_write(path, lambda f: torch.save(state, f))


def load_features(path: PathLike) -> Features:
    """A feature file of ``extract`` (this format, or the older ``{"features", "pids", "cams",
    "paths"}``) read with ``weights_only=True``: a :class:`Features` with ``paths``,
    ``skipped`` and ``provenance`` (None for older files) set."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file {path} does not exist")
    state = weights_io.load(path)
    missing = [k for k in ("features", "pids", "cams", "paths") if not isinstance(state, dict) or k not in state]
    if missing:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: not a feature file of transmatcher-fast extract (missing {missing}; "
                         f"has {keys})")
    n = state["features"].shape[0]
    if not (len(state["pids"]) == len(state["cams"]) == len(state["paths"]) == n):
        raise ValueError(f"{path}: {n} feature rows but {len(state['pids'])} pids, {len(state['cams'])} "
                         f"cams and {len(state['paths'])} paths")
    return Features(state["features"], torch.as_tensor(state["pids"], dtype=torch.int64),
                    torch.as_tensor(state["cams"], dtype=torch.int64), paths=list(state["paths"]),
                    skipped=[tuple(s) for s in state.get("skipped", [])],
                    provenance=state.get("provenance"))


def feature_items(features: Features) -> List[Item]:
    """``(path, pid, camid)`` of every row of ``features`` (which must carry ``paths``)."""
    if features.paths is None:
        raise ValueError("features carry no paths (extract records them)")
    return [(p, int(i), int(c)) for p, i, c in zip(features.paths, features.pids.tolist(),
                                                   features.cams.tolist())]

