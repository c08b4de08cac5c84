"""RandomIdentitySampler (PK) and GraphSampler (GS): batch composition, neighbours, determinism,
resuming, caching of the distance, the distributed split and the real torch.distributed path."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from transmatcher_fast.engine.samplers import GraphSampler, RandomIdentitySampler

NUM_IDS, BATCH, K = 64, 64, 4
TOPK = BATCH // K - 1  # 15


def make_pids(num_ids: int = NUM_IDS, seed: int = 0) -> list:
    """Identity labels 1000 + 7*k (not 0..N-1), 2 to 7 images each (every 5th id has 2, so it
    wraps around), in a shuffled dataset order."""
    rng = np.random.default_rng(seed)
    counts = [2 if k % 5 == 0 else int(rng.integers(3, 8)) for k in range(num_ids)]
    pids = [1000 + 7 * k for k, c in enumerate(counts) for _ in range(c)]
    return [int(p) for p in rng.permutation(pids)]


class LineDistance:
    """Distances of identities placed at known 1-D positions, slightly asymmetric, counting its
    calls and checking it gets one image per identity in ascending identity order."""

    def __init__(self, pids: list, seed: int = 1):
        self.pids = pids
        self.identities = sorted(set(pids))
        n = len(self.identities)
        rng = np.random.default_rng(seed)
        pos = rng.permutation(n) * 10.0  # distinct positions, gaps of at least 10
        noise = rng.uniform(0, 1, (n, n))  # breaks ties (|i-j| == |i-k|) without reordering others
        self.matrix = torch.tensor(np.abs(pos[:, None] - pos[None, :]) + noise)
        self.calls = 0

    def __call__(self, indices):
        self.calls += 1
        assert [self.pids[i] for i in indices] == self.identities
        return self.matrix.clone()

    def expected_neighbours(self, row: int, topk: int = TOPK) -> list:
        others = [j for j in range(len(self.identities)) if j != row]
        return sorted(others, key=lambda j: float(self.matrix[row, j]))[:topk]


def batches_of(indices: list, size: int) -> list:
    assert len(indices) % size == 0
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def id_groups(batch: list, pids: list, identities: list) -> list:
    """The batch as [(identity index, [its K indices]), ...] in batch order."""
    groups = []
    for g in batches_of(batch, K):
        labels = {pids[i] for i in g}
        assert len(labels) == 1, "the K images of a group must share one identity"
        groups.append((identities.index(labels.pop()), g))
    return groups


# --------------------------------------------------------------------------- GraphSampler
def test_graph_sampler_batches_are_anchor_plus_nearest_ids():
    pids = make_pids()
    distance = LineDistance(pids)
    sampler = GraphSampler(pids, distance, batch_size=BATCH, num_instances=K, seed=3)
    indices = list(sampler)
    assert sampler.num_batches == NUM_IDS and len(sampler) == NUM_IDS * BATCH == len(indices)
    assert all(isinstance(i, int) for i in indices)

    anchors, covered = [], set()
    for batch in batches_of(indices, BATCH):
        groups = id_groups(batch, pids, distance.identities)
        ids = [i for i, _ in groups]
        assert len(set(ids)) == BATCH // K  # 16 distinct identities x 4 images
        anchors.append(ids[0])
        assert ids[1:] == distance.expected_neighbours(ids[0])  # nearest first
        covered.update(ids)
    assert sorted(anchors) == list(range(NUM_IDS))  # one batch per id, each anchors once
    assert covered == set(range(NUM_IDS))
    assert anchors != sorted(anchors)  # batch order is shuffled
    assert torch.equal(sampler.neighbours,
                       torch.tensor([distance.expected_neighbours(i) for i in range(NUM_IDS)]))


def test_graph_sampler_cycles_through_each_identity_images():
    """Cyclic pointer over a shuffled list: within an epoch every image of an identity is drawn
    either floor(T/n) or ceil(T/n) times; 2-image identities repeat images inside a batch."""
    pids = make_pids()
    sampler = GraphSampler(pids, LineDistance(pids), batch_size=BATCH, num_instances=K)
    indices = list(sampler)
    uses = Counter(indices)
    by_id = {}
    for i, p in enumerate(pids):
        by_id.setdefault(p, []).append(i)
    for images in by_id.values():
        counts = [uses[i] for i in images]
        assert min(counts) >= 1 and max(counts) - min(counts) <= 1
    two = [p for p, imgs in by_id.items() if len(imgs) == 2]
    assert two
    for batch in batches_of(indices, BATCH):
        for g in batches_of(batch, K):
            if pids[g[0]] in two:
                assert sorted(Counter(g).values()) == [2, 2]


def test_graph_sampler_is_deterministic_per_seed_and_epoch():
    pids = make_pids()
    a = GraphSampler(pids, LineDistance(pids), batch_size=BATCH, num_instances=K, seed=5)
    b = GraphSampler(pids, LineDistance(pids), batch_size=BATCH, num_instances=K, seed=5)
    first = list(a)
    assert list(a) == first == list(b)
    a.set_epoch(1)
    assert list(a) != first
    c = GraphSampler(pids, LineDistance(pids), batch_size=BATCH, num_instances=K, seed=6)
    assert list(c) != first


def test_graph_sampler_state_dict_round_trip(tmp_path):
    pids = make_pids()
    a = GraphSampler(pids, LineDistance(pids), batch_size=BATCH, num_instances=K, seed=11)
    a.set_epoch(4)
    expected = list(a)
    state = a.state_dict()
    assert all(type(v) in (int, str) for v in state.values())
    torch.save(state, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    b = GraphSampler(pids, LineDistance(pids), batch_size=BATCH, num_instances=K)
    b.load_state_dict(loaded)
    assert (b.seed, b.epoch) == (11, 4) and list(b) == expected
    with pytest.raises(ValueError, match="RandomIdentitySampler"):
        b.load_state_dict(RandomIdentitySampler(pids).state_dict())


def test_graph_sampler_computes_distance_once_per_epoch():
    pids = make_pids()
    distance = LineDistance(pids)
    sampler = GraphSampler(pids, distance, batch_size=BATCH, num_instances=K)
    assert len(sampler) == NUM_IDS * BATCH and sampler.num_batches == NUM_IDS
    assert distance.calls == 0  # len() needs no distance
    first = list(sampler)
    assert len(sampler) == len(first) and list(sampler) == first
    assert distance.calls == 1
    sampler.set_epoch(1)
    len(sampler), list(sampler), list(sampler)
    assert distance.calls == 2
    sampler.set_epoch(0)  # a different epoch than the cached one: recomputed
    list(sampler)
    assert distance.calls == 3


def test_graph_sampler_explicit_replicas_split_whole_batches():
    pids = make_pids()
    full = batches_of(list(GraphSampler(pids, LineDistance(pids), seed=2)), BATCH)
    parts = []
    for rank in range(2):
        s = GraphSampler(pids, LineDistance(pids), seed=2, num_replicas=2, rank=rank)
        got = batches_of(list(s), BATCH)
        assert len(got) == s.num_batches == NUM_IDS // 2 and len(s) == len(got) * BATCH
        parts.append(got)
    assert parts[0] == full[0::2] and parts[1] == full[1::2]
    as_sets = [{tuple(b) for b in p} for p in parts]
    assert not as_sets[0] & as_sets[1]
    assert as_sets[0] | as_sets[1] == {tuple(b) for b in full}

    # 64 batches over 3 ranks: padded to 66 by repeating the first two, 22 each.
    parts = [batches_of(list(GraphSampler(pids, LineDistance(pids), seed=2, num_replicas=3,
                                          rank=r)), BATCH) for r in range(3)]
    assert [len(p) for p in parts] == [22, 22, 22]
    padded = full + full[:2]
    assert [b for r in range(3) for b in parts[r]] == [b for r in range(3) for b in padded[r::3]]


def test_graph_sampler_fewer_ids_than_a_batch():
    pids = [0, 0, 1, 1, 1, 2]
    calls = []

    def distance(indices):
        calls.append(indices)
        return torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 3.0], [2.0, 3.0, 0.0]])

    sampler = GraphSampler(pids, distance, batch_size=64, num_instances=4)
    assert sampler.num_batches == 3 and len(sampler) == 3 * 12
    batches = batches_of(list(sampler), 12)
    assert sorted(pids[b[0]] for b in batches) == [0, 1, 2]
    for b in batches:
        assert sorted(Counter(pids[i] for i in b).values()) == [4, 4, 4]
    single = GraphSampler([5, 5, 5], lambda idx: pytest.fail("no neighbours needed"),
                          batch_size=8, num_instances=2)
    assert len(list(single)) == len(single) == 2


def test_graph_sampler_rejects_a_wrong_distance_shape():
    pids = make_pids(8)
    sampler = GraphSampler(pids, lambda idx: torch.zeros(8, 7), batch_size=16, num_instances=4)
    with pytest.raises(ValueError, match=r"\[8, 8\]"):
        list(sampler)


# --------------------------------------------------------------------------- RandomIdentitySampler
def test_pk_sampler_composition_and_coverage():
    pids = make_pids(30, seed=4)
    identities = sorted(set(pids))
    sampler = RandomIdentitySampler(pids, batch_size=32, num_instances=K, seed=1)
    assert sampler.num_batches == 30 // 8 == 3 and len(sampler) == 3 * 32
    indices = list(sampler)
    assert len(indices) == len(sampler)
    seen = []
    for batch in batches_of(indices, 32):
        groups = id_groups(batch, pids, identities)
        ids = [i for i, _ in groups]
        assert len(set(ids)) == 8
        seen.extend(ids)
        for _, g in groups:  # without replacement when the identity has >= K images
            assert len(set(g)) == min(K, pids.count(pids[g[0]]))
    assert len(seen) == len(set(seen)) == 24  # every id at most once; last incomplete group dropped
    assert list(sampler) == indices
    sampler.set_epoch(1)
    assert list(sampler) != indices
    covered = set()
    for e in range(10):
        sampler.set_epoch(e)
        covered.update(pids[i] for i in sampler)
    assert covered == set(pids)


def test_pk_sampler_small_dataset_state_and_split(tmp_path):
    pids = [3, 3, 9, 4, 4, 4]  # 3 ids < P = 4: one batch with all of them
    sampler = RandomIdentitySampler(pids, batch_size=16, num_instances=4, seed=7)
    indices = list(sampler)
    assert sampler.num_batches == 1 and len(sampler) == len(indices) == 12
    assert Counter(pids[i] for i in indices) == {3: 4, 9: 4, 4: 4}

    pids = make_pids(40)
    a = RandomIdentitySampler(pids, batch_size=16, num_instances=4, seed=7)
    a.set_epoch(2)
    b = RandomIdentitySampler(pids, batch_size=16, num_instances=4)
    b.load_state_dict(a.state_dict())
    assert list(b) == list(a)
    full = batches_of(list(a), 16)
    parts = []
    for rank in range(2):
        part = RandomIdentitySampler(pids, 16, 4, seed=7, num_replicas=2, rank=rank)
        part.set_epoch(2)
        parts.append(batches_of(list(part), 16))
    assert len(full) == 10 and parts[0] == full[0::2] and parts[1] == full[1::2]


def test_sampler_argument_errors():
    pids = [0, 0, 1, 1]
    dfn = lambda idx: torch.zeros(2, 2)  # noqa: E731
    for kwargs, name in [(dict(batch_size=0), "batch_size"), (dict(batch_size=6), "batch_size"),
                         (dict(num_instances=0), "num_instances"),
                         (dict(num_replicas=0), "num_replicas"),
                         (dict(num_replicas=2, rank=2), "rank"), (dict(rank=-1), "rank"),
                         (dict(seed=-1), "seed")]:
        with pytest.raises(ValueError, match=name):
            RandomIdentitySampler(pids, **kwargs)
        with pytest.raises(ValueError, match=name):
            GraphSampler(pids, dfn, **kwargs)
    for bad in ([], [0.5, 1.5], [[0, 1]]):
        with pytest.raises(ValueError, match="pids"):
            RandomIdentitySampler(bad)
    with pytest.raises(ValueError, match="distance_fn"):
        GraphSampler(pids, None)
    with pytest.raises(ValueError, match="epoch"):
        RandomIdentitySampler(pids).set_epoch(-1)
    with pytest.raises(ValueError, match="epoch"):
        RandomIdentitySampler(pids).load_state_dict({"seed": 0})


# --------------------------------------------------------------------------- torch.distributed
def _distributed_worker(rank: int, world_size: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank,
                            world_size=world_size)
    try:
        pids = make_pids()
        line = LineDistance(pids)

        def distance(indices):
            if rank != 0:
                raise RuntimeError("only rank 0 may compute distances")
            return line(indices)

        sampler = GraphSampler(pids, distance, seed=9)  # replicas and rank from torch.distributed
        sampler.set_epoch(2)
        result = {"indices": list(sampler), "neighbours": sampler.neighbours,
                  "replicas": sampler.num_replicas, "rank": sampler.rank}
        torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_graph_sampler_under_torch_distributed(tmp_path):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [(r["replicas"], r["rank"]) for r in results] == [(2, 0), (2, 1)]
    assert torch.equal(results[0]["neighbours"], results[1]["neighbours"])

    pids = make_pids()
    reference = GraphSampler(pids, LineDistance(pids), seed=9)
    reference.set_epoch(2)
    full = batches_of(list(reference), BATCH)
    assert torch.equal(results[0]["neighbours"], reference.neighbours)
    parts = [batches_of(r["indices"], BATCH) for r in results]
    assert len(parts[0]) == len(parts[1]) == NUM_IDS // 2
    assert parts[0] == full[0::2] and parts[1] == full[1::2]


def test_all_images_sampler_uses_every_image_once_per_epoch_in_groups_of_k():
    """TransReID's sampler: each identity's images shuffled into groups of K (fewer than K:
    drawn with replacement), P identities per batch while P have groups left."""
    from transmatcher_fast.engine.samplers import AllImagesIdentitySampler

    counts = {0: 8, 1: 4, 2: 9, 3: 2, 4: 12, 5: 4}
    pids = [pid for pid, n in counts.items() for _ in range(n)]
    sampler = AllImagesIdentitySampler(pids, batch_size=4, num_instances=2, seed=3)
    drawn = list(sampler)
    assert len(drawn) == len(sampler) and len(drawn) % 4 == 0
    by_batch = [drawn[i:i + 4] for i in range(0, len(drawn), 4)]
    for batch in by_batch:
        batch_pids = [pids[i] for i in batch]
        assert batch_pids[0] == batch_pids[1] and batch_pids[2] == batch_pids[3]
        assert batch_pids[0] != batch_pids[2]  # P distinct identities
    used = Counter(drawn)
    # No image twice within an identity that has K or more images; groups of K, tail dropped.
    assert all(c == 1 for i, c in used.items() if counts[pids[i]] >= 2)
    groups_available = sum(n // 2 for n in counts.values())
    assert len(by_batch) <= groups_available // 2 and len(by_batch) >= groups_available // 2 - 3
    assert list(sampler) == drawn  # the same epoch again: the same batches
    sampler.set_epoch(1)
    assert list(sampler) != drawn
