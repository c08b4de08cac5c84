"""Query x gallery matching with a comparer (the part ``matcher``: a fused matcher or embedding
distances), in memory bounded by a chunk size.

Every image is projected once (TransMatcher's fc1 per level; QAConv's location view), then probe
chunks are scored against gallery chunks whose size follows the device's free memory
(``mem_get_info`` on CUDA, available RAM on CPU). The result is upstream's distance
``1 - sigmoid(score / 10)`` (or the comparer's own ``distance(score)``, e.g. the squared Euclidean
distance of ``models.embedding.EmbeddingDistance``) as a dense ``[Nq, Ng]`` matrix, or, in top-k
mode, only the k nearest gallery items per query, so that ``Nq x Ng`` values never have to exist
at once. Under ``torchrun`` the gallery is split across ranks and the pieces gathered.

A comparer is any ``nn.Module`` with ``project(features, name)``, ``score_projected(probe,
gallery)`` -> ``[P, G]`` scores (higher = closer), ``bytes_per_pair()`` and optionally
``distance(score)``; parameters are not required.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..models import memory
from .features import autocast, parse_dtype

# Probe images per chunk when none is given: large enough to amortise a gallery chunk's transfer.
DEFAULT_PROBE_CHUNK = 256


def comparer_device(comparer: nn.Module) -> torch.device:
    """Where a comparer runs: the device of its first parameter or buffer, else the CPU (a
    comparer without state, e.g. a plain embedding distance)."""
    for tensor in itertools.chain(comparer.parameters(), comparer.buffers()):
        return tensor.device
    return torch.device("cpu")


def score_to_distance(score: Tensor) -> Tensor:
    """Upstream's distance of fused-matcher logits: ``1 - sigmoid(score / 10)`` (monotone, in (0, 1))."""
    return 1.0 - torch.sigmoid(score.float() / 10.0)


@dataclass
class TopK:
    """The ``k`` nearest gallery items of each query, nearest first: ``dist`` float32 and
    ``index`` int64 (into the gallery), both ``[Nq, k]``."""
    dist: Tensor
    index: Tensor


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _check_chunk(value: Optional[int], name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


class _Projected:
    """A comparer's projected features (a tensor for QAConv, one per layer for TransMatcher) as a
    tuple, stored on ``device``, computed ``chunk`` images at a time."""

    def __init__(self, comparer: nn.Module, features: Tensor, device: torch.device,
                 amp: Optional[torch.dtype], chunk: int, store: torch.device):
        self.comparer, self.single = comparer, None
        parts = None
        for start in range(0, features.shape[0], chunk):
            with autocast(device, amp):
                out = comparer.project(features[start:start + chunk].to(device, non_blocking=True))
            self.single = isinstance(out, Tensor)
            out = (out,) if self.single else tuple(out)
            if parts is None:
                parts = [torch.empty((features.shape[0],) + tuple(o.shape[1:]), dtype=o.dtype, device=store)
                         for o in out]
            for part, o in zip(parts, out):
                part[start:start + o.shape[0]] = o
        self.parts = tuple(parts or ())

    def slice(self, start: int, stop: int, device: torch.device):
        parts = tuple(p[start:stop].to(device, non_blocking=True) for p in self.parts)
        return parts[0] if self.single else parts


@torch.no_grad()
def match(comparer: nn.Module, probe: Tensor, gallery: Optional[Tensor] = None, *,
          device: Union[str, torch.device, None] = None, amp: Union[str, torch.dtype, None] = None,
          probe_chunk: Optional[int] = None, gallery_chunk: Optional[int] = None,
          topk: Optional[int] = None, distributed: Optional[bool] = None,
          progress: bool = False) -> Union[Tensor, TopK]:
    """Distances of every probe to every gallery image (``gallery=None``: the probes themselves).

    - ``probe``/``gallery``: features as the comparer takes them, on any device (host features
      are moved chunk by chunk).
    - ``amp``: autocast dtype for projection and matching (default bfloat16 on CUDA, none on CPU).
    - ``probe_chunk``/``gallery_chunk``: images per block (defaults: 256 probes; as many gallery
      images as fit in a quarter of the free memory).
    - ``topk``: keep only the ``topk`` nearest gallery items per probe and return a :class:`TopK`;
      otherwise a dense float32 ``[Nq, Ng]`` CPU tensor.
    - ``distributed``: split the gallery across ``torch.distributed`` ranks (default: when a
      process group is initialised); every rank returns the whole result.

    The comparer runs in eval mode (BatchNorm running statistics; its mode is restored); its
    device (parameters, else buffers, else the CPU) is the default ``device``."""
    _check_chunk(probe_chunk, "probe_chunk")
    _check_chunk(gallery_chunk, "gallery_chunk")
    _check_chunk(topk, "topk")
    device = torch.device(device) if device is not None else comparer_device(comparer)
    amp = parse_dtype(amp, "amp") if amp is not None else (torch.bfloat16 if device.type == "cuda" else None)
    same = gallery is None or gallery is probe
    gallery = probe if gallery is None else gallery
    num_probe, num_gallery = probe.shape[0], gallery.shape[0]
    world, rank = _world() if distributed in (None, True) else (1, 0)
    if distributed and world == 1 and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs an initialised torch.distributed process group")
    # This rank's contiguous share of the gallery.
    per_rank = -(-num_gallery // world)
    g_start, g_stop = min(rank * per_rank, num_gallery), min((rank + 1) * per_rank, num_gallery)
    probe_chunk = probe_chunk or min(max(1, num_probe), DEFAULT_PROBE_CHUNK)
    was_training = comparer.training
    comparer.eval()
    try:
        store = gallery.device if gallery.device.type == device.type else torch.device("cpu")
        gallery_proj = _Projected(comparer, gallery[g_start:g_stop], device, amp, probe_chunk, store)
        step = memory.gallery_chunk(probe_chunk, g_stop - g_start, comparer.bytes_per_pair(), device,
                                    gallery_chunk)
        shard = _match_shard(comparer, probe, gallery_proj, same and world == 1, g_stop - g_start,
                             device, amp, probe_chunk, step, topk, progress)
    finally:
        comparer.train(was_training)
    if world == 1:
        return shard
    return _gather(shard, g_start, num_gallery, per_rank, topk)


def _match_shard(comparer, probe, gallery_proj, same, num_gallery, device, amp, probe_chunk, step,
                 topk, progress):
    num_probe = probe.shape[0]
    # The comparer's own distance when it has one (embeddings), else upstream's matcher sigmoid.
    to_distance = getattr(comparer, "distance", None) or score_to_distance
    k = None if topk is None else min(topk, num_gallery)
    if k is None:
        out = torch.empty(num_probe, num_gallery, dtype=torch.float32)
    else:
        out = TopK(torch.empty(num_probe, k), torch.empty(num_probe, k, dtype=torch.int64))
    blocks = range(0, num_probe, probe_chunk)
    for p_start in tqdm(blocks, desc="matching", disable=None if progress else True, leave=False):
        p_stop = min(p_start + probe_chunk, num_probe)
        if same:  # probe == gallery: reuse the gallery's projection
            p = gallery_proj.slice(p_start, p_stop, device)
        else:
            with autocast(device, amp):
                p = comparer.project(probe[p_start:p_stop].to(device, non_blocking=True), "probe")
        best_d = best_i = None
        for g_start in range(0, num_gallery, step):
            g_stop = min(g_start + step, num_gallery)
            with autocast(device, amp):
                d = to_distance(comparer.score_projected(p, gallery_proj.slice(g_start, g_stop, device)))
            if k is None:
                out[p_start:p_stop, g_start:g_stop] = d.cpu()
                continue
            # Merge this block into the running top-k of the probe chunk.
            index = torch.arange(g_start, g_stop, device=d.device).expand_as(d)
            if best_d is not None:
                d, index = torch.cat((best_d, d), 1), torch.cat((best_i, index), 1)
            best_d, pos = d.topk(min(k, d.shape[1]), dim=1, largest=False, sorted=True)
            best_i = index.gather(1, pos)
        if k is not None and num_gallery:
            out.dist[p_start:p_stop], out.index[p_start:p_stop] = best_d.cpu(), best_i.cpu()
    return out


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(tensor: Tensor) -> list[Tensor]:
    device = _collective_device()
    tensor = tensor.to(device).contiguous()
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, tensor)
    return [p.cpu() for p in pieces]


def _gather(shard, g_start, num_gallery, per_rank, topk):
    """Every rank's piece, padded to the largest share, gathered and joined on every rank."""
    if topk is None:
        padded = torch.full((shard.shape[0], per_rank), float("inf"))
        padded[:, :shard.shape[1]] = shard
        return torch.cat(_all_gather(padded), dim=1)[:, :num_gallery]
    k = min(topk, per_rank)
    d = torch.full((shard.dist.shape[0], k), float("inf"))
    i = torch.full((shard.dist.shape[0], k), -1, dtype=torch.int64)
    d[:, :shard.dist.shape[1]] = shard.dist
    i[:, :shard.index.shape[1]] = shard.index + g_start
    all_d, all_i = torch.cat(_all_gather(d), 1), torch.cat(_all_gather(i), 1)
    best_d, pos = all_d.topk(min(topk, num_gallery), dim=1, largest=False, sorted=True)
    return TopK(best_d, all_i.gather(1, pos))
