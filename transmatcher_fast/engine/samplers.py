"""Batch samplers for matcher training: each yields dataset indices, one whole group per batch.

- ``RandomIdentitySampler`` (PK): per epoch the identities are shuffled and cut into groups of
  ``P = batch_size // num_instances``; each identity brings ``num_instances`` (K) images.
- ``AllImagesIdentitySampler`` (PK over every image, upstream TransReID's
  ``RandomIdentitySampler``): per epoch each identity's images are shuffled and cut into groups
  of K (an identity with fewer than K images is drawn K times with replacement; the incomplete
  last group is dropped), and batches take P identities at random among those with groups left,
  until fewer than P remain, so an epoch is about ``sum_id floor(n_id / K) * K`` images.
- ``GraphSampler`` (upstream's GS, QAConv 2.0 / TransMatcher): per epoch one random image per
  identity is matched against all others with the current model (``distance_fn``); every identity
  then anchors one batch made of itself and its ``P - 1`` nearest identities, K images each. The
  batches are therefore full of hard negatives, and an epoch has one batch per identity.

Both are meant for a DataLoader with ``batch_size=sampler.batch_size`` and ``drop_last=False``
(every group but possibly a too-small-dataset one has exactly ``batch_size`` indices). Everything
random comes from a local generator seeded with ``(seed, epoch)``, never from the global RNGs, so
an epoch gives the same batches however often ``__iter__`` is called, and ``state_dict`` (seed and
epoch) restores it after a restart. Under DistributedDataParallel every rank takes whole batches
``batches[rank::num_replicas]`` of the same epoch-wide list (padded by repeating its start), so all
ranks run the same number of steps and each step sees complete groups.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["RandomIdentitySampler", "AllImagesIdentitySampler", "GraphSampler", "ShuffledBatchSampler"]


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class _IdentityGroupSampler(Sampler[int]):
    """What both samplers share: arguments, identity index, epoch/seed state, rank split."""

    def __init__(self, pids: Sequence[int], batch_size: int, num_instances: int, seed: int,
                 num_replicas: Optional[int], rank: Optional[int]):
        self.num_instances = _check_int("num_instances", num_instances, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        if self.batch_size % self.num_instances:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of num_instances "
                             f"({num_instances})")
        self.seed = _check_int("seed", seed, 0)
        self.epoch = 0

        if num_replicas is None:
            num_replicas = dist.get_world_size() if _dist_ready() else 1
        if rank is None:
            rank = dist.get_rank() if _dist_ready() else 0
        self.num_replicas = _check_int("num_replicas", num_replicas, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={self.num_replicas}), got {rank}")

        pid_array = np.asarray(pids)
        if pid_array.ndim != 1 or pid_array.size == 0:
            raise ValueError(f"pids must be a non-empty 1-D sequence of ints, got shape "
                             f"{pid_array.shape}")
        if not np.issubdtype(pid_array.dtype, np.integer):
            raise ValueError(f"pids must be integers, got dtype {pid_array.dtype}")
        # Identities in ascending order; images of each identity in dataset order.
        order = np.argsort(pid_array, kind="stable")
        self.identities, starts = np.unique(pid_array[order], return_index=True)
        self.images_per_id: List[np.ndarray] = np.split(order, starts[1:])
        self.num_ids = len(self.identities)
        # Identities per batch: P, or all of them when there are fewer.
        self.ids_per_batch = min(self.batch_size // self.num_instances, self.num_ids)

    # ----------------------------------------------------------------- epoch-wide batch list
    def _num_epoch_batches(self) -> int:
        raise NotImplementedError

    def _epoch_batches(self) -> List[List[int]]:
        raise NotImplementedError

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    # ----------------------------------------------------------------- public API
    @property
    def num_batches(self) -> int:
        """Batches this rank yields per epoch (every rank yields the same number)."""
        return math.ceil(self._num_epoch_batches() / self.num_replicas)

    def __len__(self) -> int:
        return self.num_batches * self.ids_per_batch * self.num_instances

    def __iter__(self) -> Iterator[int]:
        batches = self._epoch_batches()
        # Pad (cyclically) to a multiple of num_replicas so every rank gets as many whole batches.
        total = self.num_batches * self.num_replicas
        padded = [batches[i % len(batches)] for i in range(total)]
        for batch in padded[self.rank::self.num_replicas]:
            yield from batch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches ``__iter__`` yields (call it before each epoch)."""
        self.epoch = _check_int("epoch", epoch, 0)

    def state_dict(self) -> Dict[str, object]:
        return {"sampler": type(self).__name__, "seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        missing = {"seed", "epoch"} - set(state)
        if missing:
            raise ValueError(f"sampler state_dict lacks {sorted(missing)}")
        name = state.get("sampler", type(self).__name__)
        if name != type(self).__name__:
            raise ValueError(f"state_dict is from a {name}, not a {type(self).__name__}")
        self.seed = _check_int("seed", state["seed"], 0)
        self.set_epoch(state["epoch"])

    def _take(self, images: np.ndarray, rng: np.random.Generator) -> List[int]:
        """num_instances images of one identity: without replacement from a shuffled list,
        wrapping around that list when the identity has fewer images."""
        shuffled = rng.permutation(images)
        return [int(shuffled[i % len(shuffled)]) for i in range(self.num_instances)]


class RandomIdentitySampler(_IdentityGroupSampler):
    """PK sampler: batches of ``P = batch_size // num_instances`` identities x K images.

    An epoch covers every identity once (shuffled); the last incomplete group is dropped, unless
    there are fewer than P identities in all, in which case the one batch holds all of them.

    Args:
        pids: identity of each dataset item.
        batch_size: images per batch, a multiple of ``num_instances``.
        num_instances: images per identity in a batch (K).
        seed: base seed; epoch ``e`` draws from ``default_rng([seed, e])``.
        num_replicas, rank: distributed split (default: torch.distributed's, else 1 and 0).
    """

    def __init__(self, pids: Sequence[int], batch_size: int = 64, num_instances: int = 4, *,
                 seed: int = 0, num_replicas: Optional[int] = None, rank: Optional[int] = None):
        super().__init__(pids, batch_size, num_instances, seed, num_replicas, rank)

    def _num_epoch_batches(self) -> int:
        return max(self.num_ids // self.ids_per_batch, 1)

    def _epoch_batches(self) -> List[List[int]]:
        rng = self._rng()
        ids = rng.permutation(self.num_ids)
        batches = []
        for b in range(self._num_epoch_batches()):
            group = ids[b * self.ids_per_batch:(b + 1) * self.ids_per_batch]
            batches.append([i for g in group for i in self._take(self.images_per_id[g], rng)])
        return batches


class AllImagesIdentitySampler(_IdentityGroupSampler):
    """TransReID's P x K sampler: every image of every identity once per epoch, in groups of K
    (see the module docstring). Arguments as :class:`RandomIdentitySampler`'s."""

    def __init__(self, pids: Sequence[int], batch_size: int = 64, num_instances: int = 4, *,
                 seed: int = 0, num_replicas: Optional[int] = None, rank: Optional[int] = None):
        super().__init__(pids, batch_size, num_instances, seed, num_replicas, rank)
        self._cache: tuple = (None, [])

    def _num_epoch_batches(self) -> int:
        return max(len(self._epoch_batches()), 1)

    def _epoch_batches(self) -> List[List[int]]:
        if self._cache[0] == (self.seed, self.epoch):
            return self._cache[1]
        rng, k = self._rng(), self.num_instances
        groups = []
        for images in self.images_per_id:
            if len(images) < k:
                images = rng.choice(images, size=k, replace=True)
            images = rng.permutation(images)
            groups.append([images[i:i + k].tolist() for i in range(0, len(images) - k + 1, k)])
        available = list(range(self.num_ids))
        batches = []
        while len(available) >= self.ids_per_batch:
            chosen = rng.choice(len(available), size=self.ids_per_batch, replace=False)
            picked = [available[i] for i in chosen]
            batch = []
            for g in picked:
                batch += groups[g].pop(0)
                if not groups[g]:
                    available.remove(g)
            batches.append(batch)
        self._cache = ((self.seed, self.epoch), batches)
        return batches


class GraphSampler(_IdentityGroupSampler):
    """Upstream's graph sampler (GS, QAConv 2.0): one batch per identity, made of the identity
    and its ``batch_size // num_instances - 1`` nearest identities under the current model.

    Per epoch (lazily, in the first ``__iter__`` of that epoch, because the model changes between
    epochs): one random image per identity (in ascending identity order) is passed to
    ``distance_fn(indices) -> [P, P]`` distances (smaller = more similar, row = that identity as
    probe; upstream uses ``1 - sigmoid(score / 10)`` of the matcher). Each identity then draws
    ``num_instances`` images per batch it appears in from its own shuffled list with a cyclic
    pointer, reshuffled when exhausted (an identity with fewer images repeats some). The batch
    order is shuffled. The epoch's batches are cached: ``distance_fn`` runs once per epoch, and
    ``len()`` / ``num_batches`` never need it.

    Under torch.distributed (world size > 1) only global rank 0 calls ``distance_fn``; the
    neighbour table is broadcast from it, so every rank must iterate the sampler. Everything else
    derives from ``(seed, epoch)`` and is identical on all ranks. Resuming an epoch exactly needs
    the same model too, since the neighbours come from it.

    Args:
        pids: identity of each dataset item.
        distance_fn: maps dataset indices (one per identity) to a ``[P, P]`` distance tensor.
        batch_size, num_instances, seed, num_replicas, rank: as in ``RandomIdentitySampler``.
    """

    def __init__(self, pids: Sequence[int], distance_fn: Callable[[List[int]], torch.Tensor],
                 batch_size: int = 64, num_instances: int = 4, *, seed: int = 0,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None):
        super().__init__(pids, batch_size, num_instances, seed, num_replicas, rank)
        if not callable(distance_fn):
            raise ValueError(f"distance_fn must be callable, got {type(distance_fn).__name__}")
        self.distance_fn = distance_fn
        self.topk = self.ids_per_batch - 1
        self._cache_key: Optional[tuple] = None
        self._cache: List[List[int]] = []
        self.neighbours: Optional[torch.Tensor] = None  # [P, topk] of the cached epoch

    def _num_epoch_batches(self) -> int:
        return self.num_ids

    def _epoch_batches(self) -> List[List[int]]:
        key = (self.seed, self.epoch)
        if self._cache_key != key:
            self._cache = self._sample_epoch()
            self._cache_key = key
        return self._cache

    def _neighbour_table(self, representatives: List[int]) -> torch.Tensor:
        """[P, topk] int64: for each identity its topk nearest other identities, nearest first."""
        if self.topk == 0:  # a single identity: no neighbours, no distances needed
            return torch.zeros(self.num_ids, 0, dtype=torch.int64)
        distributed = _dist_ready() and dist.get_world_size() > 1
        if not distributed or dist.get_rank() == 0:
            table = self._nearest(representatives)
        else:
            table = torch.empty(self.num_ids, self.topk, dtype=torch.int64)
        if distributed:
            device = torch.device("cpu")
            if dist.get_backend() == "nccl":  # nccl only moves CUDA tensors
                device = torch.device("cuda", torch.cuda.current_device())
            shared = table.to(device)
            dist.broadcast(shared, src=0)
            table = shared.cpu()
        return table

    def _nearest(self, representatives: List[int]) -> torch.Tensor:
        with torch.no_grad():
            distance = torch.as_tensor(self.distance_fn(representatives))
        n = self.num_ids
        if distance.shape != (n, n):
            raise ValueError(f"distance_fn must return a [{n}, {n}] tensor (one row and column "
                             f"per identity), got {tuple(distance.shape)}")
        distance = distance.detach().to("cpu", torch.float64).clone()
        distance.fill_diagonal_(float("inf"))
        # Stable sort: ties go to the lower identity index. Self is removed explicitly, so a row
        # of inf/NaN distances still never lists its own identity.
        order = torch.sort(distance, dim=1, stable=True).indices
        not_self = order != torch.arange(n).unsqueeze(1)
        return order[not_self].view(n, n - 1)[:, :self.topk].contiguous()

    def _sample_epoch(self) -> List[List[int]]:
        rng = self._rng()
        representatives = [int(rng.choice(images)) for images in self.images_per_id]
        self.neighbours = self._neighbour_table(representatives)

        # Per-identity shuffled lists with cyclic pointers, shared by all batches of the epoch.
        lists = [rng.permutation(images) for images in self.images_per_id]
        pointers = [0] * self.num_ids

        def draw(i: int) -> List[int]:
            out = []
            while len(out) < self.num_instances:
                if pointers[i] == len(lists[i]):
                    lists[i] = rng.permutation(lists[i])
                    pointers[i] = 0
                take = min(self.num_instances - len(out), len(lists[i]) - pointers[i])
                out.extend(int(x) for x in lists[i][pointers[i]:pointers[i] + take])
                pointers[i] += take
            return out

        table = self.neighbours.tolist()
        batches = []
        for anchor in range(self.num_ids):  # anchor first, then its neighbours, nearest first
            batches.append([idx for i in [anchor] + table[anchor] for idx in draw(i)])
        return [batches[b] for b in rng.permutation(len(batches))]


class ShuffledBatchSampler(Sampler[int]):
    """Plain shuffled batches for unlabelled data (DINO): per epoch a permutation of the
    ``num_items`` indices from ``default_rng([seed, epoch])``, cut into whole batches (the last
    incomplete one dropped, as DINO's loader does); under DDP each rank takes whole batches
    ``batches[rank::num_replicas]`` (the epoch cut to a multiple of ``num_replicas``). Same
    ``set_epoch`` / ``state_dict`` / ``num_batches`` as the identity samplers."""

    def __init__(self, num_items: int, batch_size: int, *, seed: int = 0,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None):
        self.num_items = _check_int("num_items", num_items, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed, self.epoch = _check_int("seed", seed, 0), 0
        self.num_replicas = num_replicas or (dist.get_world_size() if _dist_ready() else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if _dist_ready() else 0)
        if self.num_items < self.batch_size * self.num_replicas:
            raise ValueError(f"{num_items} items make no whole batch of {batch_size} per rank "
                             f"({self.num_replicas} ranks)")

    @property
    def num_batches(self) -> int:
        return self.num_items // self.batch_size // self.num_replicas

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
        batches = order[:self.num_batches * self.num_replicas * self.batch_size].reshape(-1, self.batch_size)
        for batch in batches[self.rank::self.num_replicas]:
            yield from batch.tolist()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _check_int("epoch", epoch, 0)

    def state_dict(self) -> Dict[str, object]:
        return {"sampler": type(self).__name__, "seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.seed = _check_int("seed", state["seed"], 0)
        self.set_epoch(state["epoch"])
