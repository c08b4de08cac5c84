"""Re-ID ranking metrics: CMC, mAP and mINP over a query x gallery distance matrix.

Distances are "smaller = more similar" (upstream: ``dist = 1 - sigmoid(score / 10)``). The
evaluation engine streams them in chunks of query rows, either as full rows (:meth:`RankingMetrics.add`)
or as the k best gallery items per query (:meth:`RankingMetrics.add_topk`), so no more than one
chunk of rows is ever held here; per-query results (a few numbers each) are kept until
:meth:`RankingMetrics.result`.

Protocols
---------
``"market"`` (Market-1501, DukeMTMC, MSMT17 and CUHK03-NP, as upstream QAConv/TransMatcher and
torchreid evaluate them; the CUHK03-NP numbers of the TransMatcher paper use this protocol):
for each query the gallery items with the same pid *and* the same camera are removed (distractors,
pid 0, stay in as negatives; junk, pid -1, is expected to have been dropped at load time). CMC is
first-match-break; AP is the non-interpolated average precision of
``sklearn.metrics.average_precision_score(matches[valid], -dist[valid])``, tied distances forming
one threshold exactly as sklearn does; INP (Ye et al. 2021) is ``#positives / rank of the last
positive``. Queries without a valid positive are skipped.

``"cuhk03"``: the classic CUHK03 single-gallery-shot CMC (open-reid ``cmc(single_gallery_shot=True)``,
torchreid ``eval_cuhk03``): per query, 10 times, one valid gallery image per identity is drawn at
random and the rank of the true match in that subsample is recorded; the CMC is averaged over the
repeats. AP and INP use the full valid gallery, as torchreid does. The draws come from a generator
seeded by ``(seed, query index)``, so results do not depend on how queries are chunked.

Ties in CMC / INP are broken by gallery order (a stable sort), the AP is tie-aware (see above).

AP variants (``ap_mode``): ``"sklearn"`` (default) is the step-wise definition above, and it is
what upstream computes since QAConv 1.2 (so QAConv 2.0, QAConv-GS 2.1) and in TransMatcher:
their ``reid/evaluation_metrics/ranking.py`` is open-reid's, which calls
``sklearn.metrics.average_precision_score`` (QAConv's CHANGELOG, 2021-03-31, QAConv 1.2: "change
the ranking.py implementation to the original open-reid version"; TransMatcher was added on that
code in Sept 2021). Only QAConv's ECCV 2020 code (1.0 / 1.1, e.g. read at QAConv
99f87b3) replaced it with ``auc(recall, precision)`` on sklearn's precision-recall curve, i.e. the
trapezoidal rule with the curve starting at (recall 0, precision 1), the behaviour of
sklearn < 0.19; ``"trapezoid"`` reproduces that, for comparisons with QAConv 1.0/1.1 numbers.
The two differ by up to about a point of mAP at low accuracy.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["PROTOCOLS", "AP_MODES", "valid_gallery_mask", "topk_margin", "RankingMetrics", "evaluate"]

PROTOCOLS = ("market", "cuhk03")
AP_MODES = ("sklearn", "trapezoid")
_CUHK03_REPEATS = 10
_RANK_KEYS = (1, 5, 10, 20)
_MISS = np.iinfo(np.int64).max  # first-match rank of a query whose match is beyond the top-k list
_BLOCK_ENTRIES = 1 << 22  # query x gallery entries ranked at once by add()


def _as_ids(x, name: str) -> np.ndarray:
    """1-D int64 array from a sequence, numpy array or CPU tensor."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.equal(np.mod(a, 1), 0)):
            raise ValueError(f"{name} must hold integers")
    return a.astype(np.int64, copy=False)


def _as_float_2d(x, name: str) -> np.ndarray:
    """2-D float array (float16 and integers are widened so comparisons stay exact)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        x = x.numpy()
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D [queries, items], got shape {a.shape}")
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    elif not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    if np.isnan(a).any():
        raise ValueError(f"{name} contains NaN")
    return a


def _check_pair(pids: np.ndarray, cams: np.ndarray, pid_name: str, cam_name: str) -> None:
    if len(pids) != len(cams):
        raise ValueError(f"{pid_name} ({len(pids)}) and {cam_name} ({len(cams)}) differ in length")


def valid_gallery_mask(query_pids, query_cams, gallery_pids, gallery_cams) -> np.ndarray:
    """[nq, ng] bool: True where a gallery item takes part in the ranking of a query, i.e. all
    items except those with the same pid and the same camera (the same shot seen twice)."""
    qp, qc = _as_ids(query_pids, "query_pids"), _as_ids(query_cams, "query_cams")
    gp, gc = _as_ids(gallery_pids, "gallery_pids"), _as_ids(gallery_cams, "gallery_cams")
    _check_pair(qp, qc, "query_pids", "query_cams")
    _check_pair(gp, gc, "gallery_pids", "gallery_cams")
    return (gp[None, :] != qp[:, None]) | (gc[None, :] != qc[:, None])


_PAIR = np.dtype([("p", np.int64), ("c", np.int64)])


def _pairs(pids: np.ndarray, cams: np.ndarray) -> np.ndarray:
    """(pid, cam) as one structured key, ordered by pid then cam, for vectorised look-ups."""
    out = np.empty(len(pids), _PAIR)
    out["p"], out["c"] = pids, cams
    return out


def _count_lookup(vals: np.ndarray, counts: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """counts[vals == key] for each key (0 where absent); vals sorted and unique."""
    if len(vals) == 0:
        return np.zeros(len(keys), np.int64)
    pos = np.searchsorted(vals, keys).clip(0, len(vals) - 1)
    return np.where(vals[pos] == keys, counts[pos], 0)


class _GalleryCounts:
    """Per-query counts of excluded items, positives and valid items from ids alone (O(nq + ng)),
    so the top-k mode knows #positives without the full distance rows."""

    def __init__(self, gp: np.ndarray, gc: np.ndarray):
        self.pid_vals, self.pid_counts = np.unique(gp, return_counts=True)
        self.pair_vals, self.pair_counts = np.unique(_pairs(gp, gc), return_counts=True)
        self.ng = len(gp)

    def __call__(self, qp: np.ndarray, qc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(excluded, positives, valid) per query."""
        same_pid = _count_lookup(self.pid_vals, self.pid_counts, qp)
        excluded = _count_lookup(self.pair_vals, self.pair_counts, _pairs(qp, qc))
        return excluded, same_pid - excluded, self.ng - excluded


def topk_margin(query_pids, query_cams, gallery_pids, gallery_cams) -> int:
    """Largest number of gallery items any query loses to the same-pid-same-camera rule. A top-k
    engine asks for ``k + topk_margin(...)`` items so that k valid items remain after removal."""
    qp, qc = _as_ids(query_pids, "query_pids"), _as_ids(query_cams, "query_cams")
    gp, gc = _as_ids(gallery_pids, "gallery_pids"), _as_ids(gallery_cams, "gallery_cams")
    _check_pair(qp, qc, "query_pids", "query_cams")
    _check_pair(gp, gc, "gallery_pids", "gallery_cams")
    if len(qp) == 0:
        return 0
    return int(_GalleryCounts(gp, gc)(qp, qc)[0].max())


def _stable_argsort(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, sorted values) of each row, ties by index, like ``argsort(kind="stable")``.

    float32 rows are sorted as int64 keys (order-preserving bits << 32 | column), which makes every
    key unique so numpy's faster unstable sort can be used; about twice as fast on Market rows."""
    n, m = x.shape
    if x.dtype != np.float32 or m >= 2**31:
        order = np.argsort(x, axis=1, kind="stable")
        return order, np.take_along_axis(x, order, axis=1)
    bits = (x + np.float32(0.0)).view(np.int32)  # + 0.0 turns -0.0 into +0.0: equal values, equal keys
    mono = np.where(bits < 0, np.int32(-(2**31)) - bits - np.int32(1), bits).astype(np.int64)
    keys = np.sort((mono << 32) | np.arange(m, dtype=np.int64), axis=1)
    order = keys & np.int64(0xFFFFFFFF)
    return order, np.take_along_axis(x, order, axis=1)


def _ranked_stats(keys: np.ndarray, valid: np.ndarray, match: np.ndarray, n_valid: np.ndarray,
                  ap_mode: str = "sklearn"):
    """Per-row AP numerator, first and last match ranks, #matches over rows already sorted by
    (key, gallery index). ``valid`` marks the items that are ranked (they need not be contiguous
    where invalid items carry the same key, e.g. +inf); ranks count valid items only.

    AP follows sklearn: all valid items with the same key form one threshold, so each positive
    gets the precision at the end of its tie group; "trapezoid" averages that with the precision
    at the end of the previous group (1 before the first), the trapezoid over that recall step."""
    n, m = keys.shape
    if m == 0:
        z = np.zeros(n)
        return z, np.full(n, _MISS, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    vrank = np.cumsum(valid, axis=1, dtype=np.int64)  # 1-based rank at valid positions
    tp = np.cumsum(match, axis=1, dtype=np.int64)
    nxt = np.empty_like(keys)
    nxt[:, :-1] = keys[:, 1:]
    nxt[:, -1] = np.nan  # compares unequal: the last position always ends its group
    # A tie group of valid items ends where the next key differs or at the last valid item.
    end = valid & ((nxt != keys) | (vrank == n_valid[:, None]))
    ar = np.broadcast_to(np.arange(m, dtype=np.int64), (n, m))
    g_end = np.minimum.accumulate(np.where(end, ar, m - 1)[:, ::-1], axis=1)[:, ::-1]
    prec = np.take_along_axis(tp, g_end, axis=1) / np.maximum(np.take_along_axis(vrank, g_end, axis=1), 1)
    if ap_mode == "trapezoid":
        # Ends strictly before a position all belong to earlier groups: the last is the previous end.
        before = np.full((n, m), -1, np.int64)
        before[:, 1:] = np.maximum.accumulate(np.where(end, ar, -1), axis=1)[:, :-1]
        prev_at = np.maximum(before, 0)
        prev = np.where(before >= 0, np.take_along_axis(tp, prev_at, axis=1)
                        / np.maximum(np.take_along_axis(vrank, prev_at, axis=1), 1), 1.0)
        prec = (prec + prev) / 2
    ap_num = np.where(match, prec, 0.0).sum(axis=1)
    first = np.where(match, vrank, _MISS).min(axis=1)
    last = np.where(match, vrank, 0).max(axis=1)
    return ap_num, first, last, tp[:, -1]


class RankingMetrics:
    """Accumulates CMC / AP / INP over query chunks; :meth:`result` gives the averages.

    Use either :meth:`add` (full distance rows) or :meth:`add_topk` (best-k lists), not both.
    Memory: one chunk's O(n * Ng) temporaries plus a few numbers per query.
    """

    def __init__(self, gallery_pids, gallery_cams, *, protocol: str = "market", max_rank: int = 50,
                 seed: int = 0, ap_mode: str = "sklearn"):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if ap_mode not in AP_MODES:
            raise ValueError(f"ap_mode must be one of {AP_MODES}, got {ap_mode!r}")
        self.ap_mode = ap_mode
        if int(max_rank) != max_rank or max_rank < 1:
            raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
        self.gallery_pids = _as_ids(gallery_pids, "gallery_pids")
        self.gallery_cams = _as_ids(gallery_cams, "gallery_cams")
        _check_pair(self.gallery_pids, self.gallery_cams, "gallery_pids", "gallery_cams")
        self.protocol = protocol
        self.max_rank = int(max_rank)
        self.seed = int(seed)
        self._counts = _GalleryCounts(self.gallery_pids, self.gallery_cams)
        self._mode: str | None = None  # "full" or "topk"
        self._k: int | None = None
        self._n_seen = 0  # queries added so far (valid or not): the index that seeds cuhk03 draws
        self._n_skipped = 0
        self._ap: list[np.ndarray] = []
        self._inp: list[np.ndarray] = []
        self._ranks: list[np.ndarray] = []  # [n, repeats] first-match ranks (1-based, _MISS = none)

    @property
    def num_gallery(self) -> int:
        return len(self.gallery_pids)

    # ------------------------------------------------------------------ input checks
    def _query_ids(self, n: int, query_pids, query_cams) -> tuple[np.ndarray, np.ndarray]:
        qp, qc = _as_ids(query_pids, "query_pids"), _as_ids(query_cams, "query_cams")
        if len(qp) != n:
            raise ValueError(f"query_pids has {len(qp)} entries but the distances have {n} rows")
        if len(qc) != n:
            raise ValueError(f"query_cams has {len(qc)} entries but the distances have {n} rows")
        return qp, qc

    def _set_mode(self, mode: str, k: int | None) -> None:
        if self._mode is not None and self._mode != mode:
            raise ValueError(f"cannot mix add() and add_topk() in one RankingMetrics (already {self._mode})")
        if mode == "topk" and self._k is not None and self._k != k:
            raise ValueError(f"k={k} differs from the k={self._k} of earlier add_topk() calls")
        self._mode, self._k = mode, k

    def _store(self, keep: np.ndarray, ap: np.ndarray, inp: np.ndarray, ranks: np.ndarray) -> None:
        self._n_skipped += int((~keep).sum())
        self._ap.append(ap[keep])
        self._inp.append(inp[keep])
        self._ranks.append(ranks[keep])

    # ------------------------------------------------------------------ full rows
    def add(self, dist, query_pids, query_cams) -> None:
        """Add a chunk of full distance rows ``dist`` [n, Ng] with the chunk's query ids
        (numpy or CPU torch; ranked internally in blocks of ~4M entries)."""
        d = _as_float_2d(dist, "dist")
        n, ng = d.shape
        if ng != self.num_gallery:
            raise ValueError(f"dist has {ng} columns but the gallery has {self.num_gallery} items")
        qp, qc = self._query_ids(n, query_pids, query_cams)
        self._set_mode("full", None)
        first_index = self._n_seen
        self._n_seen += n
        # Row blocks of ~4M entries bound the sort temporaries however large the caller's chunk.
        rows = max(1, _BLOCK_ENTRIES // max(ng, 1))
        for a in range(0, n, rows):
            self._add_rows(d[a:a + rows], qp[a:a + rows], qc[a:a + rows], first_index + a)

    def _add_rows(self, d: np.ndarray, qp: np.ndarray, qc: np.ndarray, first_index: int) -> None:
        gp, gc = self.gallery_pids, self.gallery_cams
        valid = (gp[None, :] != qp[:, None]) | (gc[None, :] != qc[:, None])
        match = (gp[None, :] == qp[:, None]) & valid
        n_pos = match.sum(axis=1)
        n_valid = valid.sum(axis=1)
        # Invalid items sort to the end (+inf); ties are broken by gallery index.
        order, keys = _stable_argsort(np.where(valid, d, np.inf))
        vs = np.take_along_axis(valid, order, axis=1)
        ms = np.take_along_axis(match, order, axis=1)
        ap_num, first, last, _ = _ranked_stats(keys, vs, ms, n_valid, self.ap_mode)
        keep = n_pos > 0
        safe_pos = np.maximum(n_pos, 1)
        ap = ap_num / safe_pos
        inp = n_pos / np.maximum(last, 1)
        if self.protocol == "cuhk03":
            ranks = self._single_shot_ranks(order, valid, match, keep, first_index)
        else:
            ranks = first[:, None]
        self._store(keep, ap, inp, ranks)

    def _single_shot_ranks(self, order: np.ndarray, valid: np.ndarray, match: np.ndarray,
                           keep: np.ndarray, first_index: int) -> np.ndarray:
        """[n, repeats] rank of the true match among one random valid image per gallery identity."""
        n, ng = valid.shape
        pos = np.empty_like(order)  # position of each gallery item in the row's sorted order
        np.put_along_axis(pos, order, np.broadcast_to(np.arange(ng), (n, ng)), axis=1)
        ids, gid = np.unique(self.gallery_pids, return_inverse=True)
        perm = np.argsort(gid, kind="stable")  # gallery grouped by identity, for reduceat
        starts = np.searchsorted(gid[perm], np.arange(len(ids)))
        gens = [np.random.default_rng((self.seed, first_index + i)) for i in range(n)]
        ranks = np.full((n, _CUHK03_REPEATS), _MISS, np.int64)
        u = np.empty((n, ng))
        for r in range(_CUHK03_REPEATS):
            for i, g in enumerate(gens):
                g.random(out=u[i])
            u[~valid] = np.inf
            # The valid item with the smallest random key of each identity is that identity's draw.
            gmin = np.minimum.reduceat(u[:, perm], starts, axis=1)
            picked = (u == gmin[:, gid]) & valid
            first_pos = np.where(picked & match, pos, ng).min(axis=1)
            ranks[:, r] = (picked & (pos < first_pos[:, None])).sum(axis=1) + 1
        ranks[~keep] = _MISS
        return ranks

    # ------------------------------------------------------------------ top-k lists
    def add_topk(self, topk_dist, topk_index, query_pids, query_cams, *, k: int | None = None) -> None:
        """Add a chunk of best-K lists (``topk_dist`` / ``topk_index`` [n, K], any order).

        Excluded (same pid and camera) items are removed first, then each list is cut to depth
        ``k`` (default K). Every list must keep ``min(k, #valid items)`` valid entries, which holds
        when the engine requests ``K = k + topk_margin(...)``; otherwise a ValueError says so.

        Exact for ranks <= k: CMC (ranks > k are misses). AP becomes the truncated AP@k =
        (1 / #positives in the full valid gallery) * sum of precision@r over hits at r <= k, a lower
        bound of AP that equals it when all positives are within the top k (and no tie group
        straddles rank k). INP counts only when the last positive is within k, else 0 (also a lower
        bound). Ties are grouped within the list only.
        """
        if self.protocol == "cuhk03":
            raise ValueError("the cuhk03 single-shot protocol needs full rows; use add()")
        td = _as_float_2d(topk_dist, "topk_dist")
        if isinstance(topk_index, torch.Tensor):
            topk_index = topk_index.detach().cpu().numpy()
        ti = np.asarray(topk_index)
        if ti.shape != td.shape:
            raise ValueError(f"topk_index shape {ti.shape} differs from topk_dist shape {td.shape}")
        if ti.size and not np.issubdtype(ti.dtype, np.integer):
            raise ValueError("topk_index must hold integers")
        ti = ti.astype(np.int64, copy=False)
        n, kk = td.shape
        ng = self.num_gallery
        if kk > ng:
            raise ValueError(f"topk_dist has {kk} columns, more than the {ng} gallery items")
        if ti.size and (ti.min() < 0 or ti.max() >= ng):
            raise ValueError(f"topk_index must lie in [0, {ng})")
        if ti.size and (np.diff(np.sort(ti, axis=1), axis=1) == 0).any():
            raise ValueError("topk_index repeats a gallery item within a row")
        k = kk if k is None else k
        if int(k) != k or not 1 <= k <= kk:
            raise ValueError(f"k must be an integer in [1, {kk}] (the list length), got {k!r}")
        k = int(k)
        qp, qc = self._query_ids(n, query_pids, query_cams)
        if self._mode == "full":
            self._set_mode("topk", k)  # raises: no mixing
        gp, gc = self.gallery_pids[ti], self.gallery_cams[ti]
        excluded = (gp == qp[:, None]) & (gc == qc[:, None])
        match = (gp == qp[:, None]) & ~excluded
        _, n_pos, n_valid = self._counts(qp, qc)
        # Excluded items last, then by distance, then by gallery index (as the full mode's stable sort).
        order = np.lexsort((ti, td, excluded), axis=-1)
        keys = np.take_along_axis(td, order, axis=1)[:, :k]
        ms = np.take_along_axis(match, order, axis=1)[:, :k]
        n_listed = kk - excluded.sum(axis=1)
        short = n_listed < np.minimum(k, n_valid)
        if short.any():
            raise ValueError(
                f"{int(short.sum())} top-k lists keep fewer than k={k} valid items after removing "
                "same-pid-same-camera items; request k + topk_margin(...) items per query")
        self._set_mode("topk", k)
        self._n_seen += n
        if n == 0:
            return
        depth = np.minimum(n_listed, k)
        vs = np.arange(k)[None, :] < depth[:, None]
        ms &= vs
        ap_num, first, last, hits = _ranked_stats(keys, vs, ms, depth, self.ap_mode)
        keep = n_pos > 0
        safe_pos = np.maximum(n_pos, 1)
        ap = ap_num / safe_pos
        inp = np.where(hits == n_pos, n_pos / np.maximum(last, 1), 0.0)
        self._store(keep, ap, inp, first[:, None])

    # ------------------------------------------------------------------ result
    def result(self) -> dict:
        """Averages over queries with a valid positive; raises RuntimeError if there is none
        (as upstream's "No valid query"). ``cmc`` has min(max_rank, k) entries (k: top-k depth, if
        any); a ``rank<r>`` beyond that is None rather than a number that could not be measured."""
        if not self._ap or sum(len(a) for a in self._ap) == 0:
            raise RuntimeError("no valid query: no query has a valid positive in the gallery")
        ap = np.concatenate(self._ap)
        inp = np.concatenate(self._inp)
        ranks = np.concatenate(self._ranks)
        depth = self.max_rank if self._k is None else min(self.max_rank, self._k)
        r = np.arange(1, depth + 1)
        # Mean over repeats, then over queries: the per-query CMC of the single-shot protocol.
        cmc = (ranks[:, :, None] <= r).mean(axis=1).mean(axis=0)
        out = {f"rank{x}": (float(cmc[x - 1]) if x <= depth else None) for x in _RANK_KEYS}
        out.update({
            "cmc": [float(c) for c in cmc],
            "mAP": float(ap.mean()),
            "mINP": float(inp.mean()),
            "num_queries": int(len(ap)),
            "num_skipped": self._n_skipped,
            "topk": self._k,
            "protocol": self.protocol,
        })
        return out


def evaluate(dist, query_pids, query_cams, gallery_pids, gallery_cams, *, protocol: str = "market",
             max_rank: int = 50, seed: int = 0, ap_mode: str = "sklearn") -> dict:
    """One-shot evaluation of a full [Nq, Ng] distance matrix (see :class:`RankingMetrics`)."""
    m = RankingMetrics(gallery_pids, gallery_cams, protocol=protocol, max_rank=max_rank, seed=seed,
                       ap_mode=ap_mode)
    m.add(dist, query_pids, query_cams)
    return m.result()
