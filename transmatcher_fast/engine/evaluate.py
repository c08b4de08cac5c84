"""Evaluation: features of query and gallery, matcher distances in bounded memory, the re-ID
protocol's CMC / mAP / mINP, optional k-reciprocal re-ranking, and loading trained models.

Memory: features are stored once (16-bit on a GPU); distances are either the dense ``[Nq, Ng]``
float32 matrix (what re-ranking and upstream need) or, with ``topk``, only the ``k`` nearest
gallery items per query, so that memory follows ``Nq * k`` and the chunk size, never
``Nq * Ng * L``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..data import build_test_transform
from ..methods import DEFAULT_METHOD, get_method, method_of_matcher
from ..models import load_upstream_checkpoint
from . import checkpoint as checkpoints
from . import export, matching
from .config import TrainConfig
from .features import Features, checked_loader, extract_features, skipped_summary
from .metrics import RankingMetrics, topk_margin
from .rerank import k_reciprocal_rerank

Item = Tuple[str, int, int]


@dataclass
class Evaluation:
    """What one evaluation produced: the metrics (and timings), the distances (a dense tensor or
    a :class:`matching.TopK`), the features, and the ``(path, pid, camid)`` items that the rows
    and columns are (the given ones, less any unreadable images skipped)."""
    metrics: Dict[str, Any]
    distances: Union[torch.Tensor, matching.TopK]
    query: Features
    gallery: Features
    query_items: Optional[List[Item]] = None
    gallery_items: Optional[List[Item]] = None
    # The comparer's inverse of its distance (None: the fused matchers' 1 - sigmoid(score / 10)).
    score_of_distance: Optional[Any] = None
    # camid + camera_base: the camera as the dataset's names number it (what exports show).
    camera_base: int = 0


def load_trained_parts(path: Union[str, Path]) -> Tuple[Dict[str, nn.Module], Dict[str, Any]]:
    """``(parts, config)`` of a checkpoint of ``transmatcher-fast train`` (its method rebuilds
    every part, by name, from the configuration in it) or of upstream's TransMatcher / QAConv
    ``checkpoint.pth.tar`` (parts ``model`` and ``matcher``), on the CPU, in training mode.
    ``config`` is the resolved training configuration (a dict; QAConv's ``neck_layout`` added)."""
    state = checkpoints.load(path)
    if "config" in state and "model" in state and "matcher" in state:
        resolved = TrainConfig.from_dict({k: v for k, v in state["config"].items()
                                          if k not in ("resume", "overwrite")})
        parts = get_method(resolved.method).load(resolved, state, str(path))
        config = dataclasses.asdict(resolved)
        if getattr(parts["model"], "neck_layout", None) is not None:
            config["neck_layout"] = parts["model"].neck_layout
    elif "model" in state and "criterion" in state:
        model, matcher = load_upstream_checkpoint(str(path))
        parts = {"model": model, "matcher": matcher}
        config = {"method": method_of_matcher(matcher), "height": 384, "width": 128}
    else:
        raise ValueError(f"{path}: neither a transmatcher-fast checkpoint (model, matcher, config) "
                         f"nor an upstream one (model, criterion); keys: {sorted(state)}")
    return parts, config


def load_trained(path: Union[str, Path], device: Union[str, torch.device] = "cpu"
                 ) -> Tuple[nn.Module, nn.Module, Dict[str, Any]]:
    """``(model, matcher, config)`` of :func:`load_trained_parts`, in eval mode on ``device``
    (``matcher`` is the comparer: a fused matcher or embedding distances)."""
    parts, config = load_trained_parts(path)
    return parts["model"].to(device).eval(), parts["matcher"].to(device).eval(), config


def default_eval_amp(config: Dict[str, Any]) -> Optional[str]:
    """The evaluation autocast of a model trained with ``config`` when none is asked for: its
    method's (TransReID: float32, as upstream), else None (bf16 on CUDA)."""
    return get_method(config.get("method", DEFAULT_METHOD)).eval_amp


def eval_transform(config: Dict[str, Any], height: int, width: int):
    """The evaluation transform of a model trained with ``config`` (what :func:`load_trained`
    returns), at ``height`` x ``width``."""
    return get_method(config.get("method", DEFAULT_METHOD)).test_transform(config, height, width)


def extract(model: nn.Module, items: Sequence[Item], *, height: int, width: int, batch_size: int = 128,
            workers: int = 2, device=None, amp=None, progress: bool = True, desc: str = "features",
            skip_bad_images: bool = False, transform=None, views: Optional[Sequence[int]] = None
            ) -> Features:
    """Features of ``items`` with ``transform`` (default: the matchers' test transform, resize +
    to tensor), in item order, with the items' paths (``Features.paths``). ``views``: a
    viewpoint label per item for a model that takes side information (``model.side_info``);
    the cameras come from the items.

    An unreadable image (truncated, corrupt, missing) raises :class:`~..data.images.ImageReadError`
    naming the file; with ``skip_bad_images=True`` it is skipped instead: the features hold the
    readable items only (``Features.indices`` says which; ``paths`` are theirs),
    ``Features.skipped`` lists ``(path, error)`` of the others, and a count and the first paths
    are printed to stderr."""
    transform = transform if transform is not None else build_test_transform(height, width)
    loader = checked_loader(items, transform, batch_size, num_workers=workers,
                            skip_bad_images=skip_bad_images)
    out = extract_features(model, loader, device=device, amp=amp, progress=progress, desc=desc,
                           views=views)
    paths = [str(path) for path, _, _ in items]
    out.paths = paths if out.indices is None else [paths[i] for i in out.indices.tolist()]
    if out.skipped:
        print(f"{desc}: {skipped_summary(out.skipped)}", file=sys.stderr, flush=True)
    return out


def kept_items(items: Sequence[Item], features: Features) -> List[Item]:
    """The items that ``features`` holds rows for, in row order (all of them unless unreadable
    images were skipped)."""
    items = list(items)
    return items if features.indices is None else [items[i] for i in features.indices.tolist()]


def evaluate(model: nn.Module, matcher: nn.Module, query: Sequence[Item], gallery: Sequence[Item], *,
             height: int, width: int, batch_size: int = 128, workers: int = 2, device=None, amp=None,
             probe_chunk: Optional[int] = None, gallery_chunk: Optional[int] = None,
             topk: Optional[int] = None, rerank: bool = False, k1: int = 20, k2: int = 6,
             lambda_value: float = 0.3, protocol: str = "market", progress: bool = True,
             skip_bad_images: bool = False, checkpoint: Optional[Union[str, Path]] = None,
             model_config: Optional[Dict[str, Any]] = None, dataset: Any = None, transform=None,
             query_views: Optional[Sequence[int]] = None,
             gallery_views: Optional[Sequence[int]] = None) -> Evaluation:
    """Upstream's protocol: query features matched against the gallery, distance
    ``1 - sigmoid(score / 10)``, same-id-same-camera gallery items ignored, CMC and mAP (+ mINP).

    ``topk``: keep only the ``topk`` nearest gallery items per query (CMC up to ``topk`` is
    exact, mAP becomes AP@topk); ``rerank``: k-reciprocal re-ranking (needs the dense matrices,
    so not with ``topk``). ``skip_bad_images``: leave unreadable images out (see :func:`extract`)
    instead of stopping; the metrics then count ``num_skipped_images`` and list
    ``skipped_images`` (paths), and ``Evaluation.query_items`` / ``gallery_items`` are the
    images evaluated.

    ``metrics["provenance"]`` (:func:`export.provenance`) records the package version, the
    protocol, the date and the evaluated counts, plus what the caller says: ``checkpoint``
    (its path), ``model_config`` (e.g. the config :func:`load_trained` returns; the height and
    width used are added) and ``dataset`` (a ``ReidDataset``, a name or a dict).

    ``transform`` is the test transform (default: the matchers', see :func:`extract`; a
    checkpoint's own is :func:`eval_transform`); ``query_views`` / ``gallery_views`` the
    viewpoint labels for models with side information."""
    if rerank and topk is not None:
        raise ValueError("rerank needs the full query x gallery distances: use it without topk")
    if not query or not gallery:
        raise ValueError(f"query ({len(query)} items) and gallery ({len(gallery)} items) must not be empty")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    start = time.perf_counter()
    q = extract(model, query, height=height, width=width, batch_size=batch_size, workers=workers,
                device=device, amp=amp, progress=progress, desc="query features",
                skip_bad_images=skip_bad_images, transform=transform, views=query_views)
    g = extract(model, gallery, height=height, width=width, batch_size=batch_size, workers=workers,
                device=device, amp=amp, progress=progress, desc="gallery features",
                skip_bad_images=skip_bad_images, transform=transform, views=gallery_views)
    features_seconds = time.perf_counter() - start
    config = {**(model_config or {}), "height": height, "width": width}
    result = evaluate_features(matcher, q, g, device=device, amp=amp, probe_chunk=probe_chunk,
                               gallery_chunk=gallery_chunk, topk=topk, rerank=rerank, k1=k1, k2=k2,
                               lambda_value=lambda_value, protocol=protocol, progress=progress,
                               query_items=kept_items(query, q), gallery_items=kept_items(gallery, g),
                               checkpoint=checkpoint, model_config=config, dataset=dataset)
    result.metrics["features_seconds"] = features_seconds
    if skip_bad_images:
        skipped = [path for path, _ in q.skipped + g.skipped]
        result.metrics.update(num_skipped_images=len(skipped), skipped_images=skipped)
    return result


def evaluate_features(matcher: nn.Module, query: Features, gallery: Features, *, device=None, amp=None,
                      probe_chunk: Optional[int] = None, gallery_chunk: Optional[int] = None,
                      topk: Optional[int] = None, rerank: bool = False, k1: int = 20, k2: int = 6,
                      lambda_value: float = 0.3, protocol: str = "market", progress: bool = True,
                      query_items: Optional[Sequence[Item]] = None,
                      gallery_items: Optional[Sequence[Item]] = None,
                      checkpoint: Optional[Union[str, Path]] = None,
                      model_config: Optional[Dict[str, Any]] = None, dataset: Any = None,
                      extra_provenance: Optional[Dict[str, Any]] = None) -> Evaluation:
    """The matching and metrics of :func:`evaluate` on features already extracted (e.g. read
    with :func:`export.load_features`): same arguments, same results. ``query_items`` /
    ``gallery_items`` default to the features' own paths, pids and cameras."""
    if rerank and topk is not None:
        raise ValueError("rerank needs the full query x gallery distances: use it without topk")
    if len(query) == 0 or len(gallery) == 0:
        raise ValueError(f"query ({len(query)} rows) and gallery ({len(gallery)} rows) must not be empty")
    if tuple(query.features.shape[1:]) != tuple(gallery.features.shape[1:]):
        raise ValueError(f"query features {tuple(query.features.shape[1:])} and gallery features "
                         f"{tuple(gallery.features.shape[1:])} differ in shape (from different models?)")
    q, g = query, gallery
    q_items = list(query_items) if query_items is not None else _items_of(q)
    g_items = list(gallery_items) if gallery_items is not None else _items_of(g)
    device = torch.device(device) if device is not None else next(matcher.parameters()).device
    timings: Dict[str, float] = {}
    margin = topk_margin(q.pids, q.cams, g.pids, g.cams) if topk is not None else 0
    start = time.perf_counter()
    dist = matching.match(matcher, q.features, g.features, device=device, amp=amp,
                          probe_chunk=probe_chunk, gallery_chunk=gallery_chunk,
                          topk=None if topk is None else topk + margin, progress=progress)
    timings["matching_seconds"] = time.perf_counter() - start
    if rerank:
        start = time.perf_counter()
        q_q = matching.match(matcher, q.features, None, device=device, amp=amp, probe_chunk=probe_chunk,
                             gallery_chunk=gallery_chunk, progress=progress)
        g_g = matching.match(matcher, g.features, None, device=device, amp=amp, probe_chunk=probe_chunk,
                             gallery_chunk=gallery_chunk, progress=progress)
        dist = torch.from_numpy(k_reciprocal_rerank(dist.numpy(), q_q.numpy(), g_g.numpy(), k1, k2,
                                                    lambda_value))
        timings["rerank_seconds"] = time.perf_counter() - start
    ranking = RankingMetrics(g.pids.numpy(), g.cams.numpy(), protocol=protocol)
    if topk is None:
        ranking.add(dist, q.pids.numpy(), q.cams.numpy())
    else:
        ranking.add_topk(dist.dist, dist.index, q.pids.numpy(), q.cams.numpy(), k=topk)
    record = export.provenance(
        model_config=model_config, checkpoint=checkpoint, dataset=dataset, query=q_items,
        gallery=g_items, matcher=matcher,
        protocol=export.protocol_info(protocol, topk=topk, rerank=rerank, k1=k1, k2=k2,
                                      lambda_value=lambda_value, amp=amp,
                                      distance=getattr(matcher, "distance_name", export.DISTANCE)),
        **(extra_provenance or {}))
    metrics = {**ranking.result(), **timings, "num_query_images": len(q),
               "num_gallery_images": len(g), "rerank": rerank, "provenance": record}
    return Evaluation(metrics, dist, q, g, q_items, g_items,
                      score_of_distance=getattr(matcher, "score_of_distance", None),
                      camera_base=getattr(dataset, "camera_base", 0))


def _items_of(features: Features) -> List[Item]:
    if features.paths is None:  # no paths: the rows' ids and cameras still evaluate
        return [("", int(p), int(c)) for p, c in zip(features.pids.tolist(), features.cams.tolist())]
    return export.feature_items(features)


def evaluate_saved(matcher: nn.Module, query_features: Union[str, Path], gallery_features: Union[str, Path],
                   **kwargs: Any) -> Evaluation:
    """:func:`evaluate_features` on two feature files that ``extract`` wrote (read with
    ``weights_only=True``; no image is opened). ``kwargs`` go to :func:`evaluate_features`;
    ``checkpoint``, ``model_config`` and ``dataset`` default to what the query file's
    provenance records. The files' paths go into the provenance (``query_features`` /
    ``gallery_features``). Files extracted with different checkpoints are refused."""
    q, g = export.load_features(query_features), export.load_features(gallery_features)
    q_prov, g_prov = q.provenance or {}, g.provenance or {}
    if q_prov.get("checkpoint") and g_prov.get("checkpoint") and q_prov["checkpoint"] != g_prov["checkpoint"]:
        raise ValueError(f"{query_features} was extracted with {q_prov['checkpoint']}, "
                         f"{gallery_features} with {g_prov['checkpoint']}: features of different "
                         "models do not compare")
    if kwargs.get("checkpoint") is None:
        kwargs["checkpoint"] = q_prov.get("checkpoint")
    if kwargs.get("model_config") is None:
        kwargs["model_config"] = q_prov.get("model")
    if kwargs.get("dataset") is None and isinstance(q_prov.get("dataset"), dict):
        kwargs["dataset"] = {k: v for k, v in q_prov["dataset"].items() if k in ("name", "class", "root")}
    extra = dict(kwargs.pop("extra_provenance", None) or {})
    extra.update(query_features=str(Path(query_features).resolve()),
                 gallery_features=str(Path(gallery_features).resolve()))
    return evaluate_features(matcher, q, g, extra_provenance=extra, **kwargs)


def average_metrics(runs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The mean of several evaluations' metrics (VehicleID's protocol: 10 random gallery
    draws): numbers and number lists (the CMC) averaged, ``test_splits`` set to the count and
    ``per_split`` holding each run's mAP and rank-1; anything else is the last run's."""
    runs = list(runs)
    out = dict(runs[-1])
    for key, value in runs[-1].items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = sum(float(r[key]) for r in runs) / len(runs)
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            out[key] = [sum(float(r[key][i]) for r in runs) / len(runs) for i in range(len(value))]
    out["test_splits"] = len(runs)
    out["per_split"] = [{"mAP": r.get("mAP"), "rank1": r.get("rank1")} for r in runs]
    return out


def parse_testsets(text: Union[str, Sequence[str]]) -> List[str]:
    """``"market1501,dukemtmc"`` (upstream's ``--testset``) -> ``["market1501", "dukemtmc"]``:
    comma-separated, blanks dropped, duplicates refused."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"no test set named in {text!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"test sets named more than once: {repeated}")
    return names


def dataset_views(dataset: Any, items: Sequence[Item]) -> Optional[List[int]]:
    """The viewpoint labels of ``items`` (None for datasets without them)."""
    views_of = getattr(dataset, "views_of", None)
    return views_of(items) if views_of is not None else None


def evaluate_dataset(model: nn.Module, matcher: nn.Module, dataset: Any, *, on_split=None,
                     **kwargs: Any) -> Evaluation:
    """:func:`evaluate` on a dataset's test split with its viewpoint labels; a dataset with several
    random test splits (``test_splits()``; VehicleID: 10) is evaluated on each and its metrics
    averaged (:func:`average_metrics`; the last split's distances are kept, for exports).
    ``on_split(i, n)`` is called before split ``i`` of ``n`` when there are several."""
    splits = dataset.test_splits() if hasattr(dataset, "test_splits") else [(dataset.query, dataset.gallery)]
    kwargs.pop("dataset", None)
    results = []
    for i, (query, gallery) in enumerate(splits):
        if len(splits) > 1 and on_split is not None:
            on_split(i, len(splits))
        results.append(evaluate(model, matcher, query, gallery, dataset=dataset,
                                query_views=dataset_views(dataset, query),
                                gallery_views=dataset_views(dataset, gallery), **kwargs))
    if len(results) > 1:
        results[-1].metrics = average_metrics([r.metrics for r in results])
    return results[-1]


def evaluate_testsets(model: nn.Module, matcher: nn.Module, testsets: Any, *, before=None, **kwargs: Any
                      ) -> Dict[str, Evaluation]:
    """:func:`evaluate_dataset` on each test set, in order: ``testsets`` maps a name to a dataset
    (with ``query`` and ``gallery``; a ``ReidDataset``), or is a sequence of ``(name, dataset)``.
    ``kwargs`` go to every evaluation (``dataset`` is each test set's); ``before(name, dataset)``,
    called just before a test set is evaluated, may return options of that set alone (e.g. its
    top-k). Returns ``{name: Evaluation}``; ``metrics_by_testset`` turns it into
    ``{name: metrics}`` for ``results_table`` / ``export.write_results_json``."""
    pairs = list(testsets.items()) if hasattr(testsets, "items") else list(testsets)
    if not pairs:
        raise ValueError("testsets is empty")
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"test set names must differ, got {names}")
    kwargs.pop("dataset", None)
    results = {}
    for name, data in pairs:
        options = {**kwargs, **((before(name, data) or {}) if before is not None else {})}
        result = evaluate_dataset(model, matcher, data, **options)
        result.metrics["provenance"]["testset"] = name
        results[name] = result
    return results


def metrics_by_testset(results: Dict[str, Evaluation]) -> Dict[str, Dict[str, Any]]:
    """``{name: metrics}`` of :func:`evaluate_testsets`'s result."""
    return {name: result.metrics for name, result in results.items()}


def results_table(rows: Dict[str, Dict[str, Any]], ranks: Sequence[int] = (1, 5, 10, 20)) -> str:
    """A Markdown table of the CMC at ``ranks``, mAP and mINP (in %) per named result; a value not
    measured (a rank beyond top-k) is n/a. When every row is top-k mode of the same k, the mAP
    column says it is AP@k."""
    topks = {m.get("topk") for m in rows.values()}
    topk = topks.pop() if len(topks) == 1 else None
    heads = [f"Rank-{r}" for r in ranks] + ["mAP" if not topk else f"mAP (AP@{topk})", "mINP"]
    lines = ["| model | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for name, m in rows.items():
        cmc = m.get("cmc") or []
        values = [cmc[r - 1] if r <= len(cmc) else m.get(f"rank{r}") for r in ranks]
        cells = ["n/a" if v is None else f"{100 * v:.1f}" for v in values + [m.get("mAP"), m.get("mINP")]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
