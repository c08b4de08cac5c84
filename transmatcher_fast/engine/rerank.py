"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) in bounded memory.

Same result as the public distance-matrix ``re_ranking(q_g_dist, q_q_dist, g_g_dist, k1, k2,
lambda_value)`` (Zhong's code as copied into torchreid and QAConv ``reid/rerank.py``) and as
``reranking`` in QAConv/TransMatcher's ``reid/evaluators.py`` (the one their ``--do_tlift`` path
runs), computed without the dense (Nq+Ng)^2 matrices those build (original_dist, initial_rank, V,
V_qe, jaccard): ~19k^2 entries each for Market, ~94k^2 for MSMT17. Distances are taken in float32
as the references do; V is kept in float64 (torchreid: float32, QAConv and Zhong: float16, which
moves results by up to ~1e-3).

The reference, on the joint matrix D = [[q_q, q_g], [q_g^T, g_g]] (N = Nq + Ng):

1. ``O = (D / D.max(axis=0)).T``: row i of O is column i of D over its maximum (q_q and g_g of
   an asymmetric matcher need not be symmetric, so this is not the same as a row-normalised D).
   Zhong's and torchreid's copies square D first (they take Euclidean feature distances);
   upstream TransMatcher does not (its distances are 1 - sigmoid(score/10)); ``square`` selects.
2. ``R`` = each row of O argsorted; k-reciprocal set of i: j in R[i, :k1+1] with i in R[j, :k1+1].
3. Expansion: for each j in that set, its own k-reciprocal set with k = round(k1/2) is added when
   more than 2/3 of it lies in i's set. V[i, expansion] = softmax(-O[i, expansion]).
4. Query expansion (k2 > 1): V[i] = mean of V over R[i, :k2].
5. Jaccard: J[i, j] = 1 - s / (2 - s), s = sum_k min(V[i, k], V[j, k]).
6. Result, query rows vs gallery columns: J * (1 - lambda) + O * lambda.

Here the rows of O are rebuilt chunk by chunk from the three blocks (twice), only the first
max(k1+1, k2) neighbours of each row are kept (argpartition; ties broken by index, as a stable
argsort would), and V is a sparse row list. Memory: the three inputs, plus
O(chunk * N) for the rows being processed, plus O(N * k1) for neighbours and V (the expansion
is at most (k1+1) * (round(k1/2) + 2) entries per row, in practice about k1) and up to k2 times
that for the query-expanded V (about 2 * k1 per row for k2 = 6); the Jaccard step gathers
inverted-index pairs for at most ``chunk`` query rows and ~8M pairs at a time. Market-sized input
(3,368 x 15,913): ~10 s and ~0.5 GB above the inputs (0.2 GB of it the result) on 2 cores.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["k_reciprocal_rerank"]

_PAIR_BUDGET = 1 << 23  # inverted-index pairs gathered at once in the Jaccard step


def _as_matrix(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    a = np.asarray(x, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D distance matrix, got shape {a.shape}")
    if np.isnan(a).any():
        raise ValueError(f"{name} contains NaN")
    return a


class _JointRows:
    """Rows of O (column-normalised, transposed joint matrix) built on the fly from the blocks."""

    def __init__(self, q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray, square: bool):
        self.q_g, self.q_q, self.g_g, self.square = q_g, q_q, g_g, square
        self.nq, self.ng = q_g.shape
        self.n = self.nq + self.ng
        self.col_max: np.ndarray | None = None  # column maxima of D (= row scale of O), pass 1

    def raw(self, a: int, b: int) -> np.ndarray:
        """Columns a..b of D as rows (float32, squared if asked)."""
        nq = self.nq
        out = np.empty((b - a, self.n), np.float32)
        qa, qb = min(a, nq), min(b, nq)
        if qb > qa:  # query columns: D[:nq, i] = q_q[:, i], D[nq:, i] = q_g[i, :]
            out[: qb - qa, :nq] = self.q_q[:, qa:qb].T
            out[: qb - qa, nq:] = self.q_g[qa:qb]
        ga, gb = max(a, nq) - nq, max(b, nq) - nq
        if gb > ga:  # gallery columns: D[:nq, j] = q_g[:, j], D[nq:, j] = g_g[:, j]
            out[qb - qa:, :nq] = self.q_g[:, ga:gb].T
            out[qb - qa:, nq:] = self.g_g[:, ga:gb].T
        if self.square:
            np.square(out, out=out)
        return out

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows a..b of O (needs ``col_max`` from the first pass)."""
        out = self.raw(a, b)
        out /= self.col_max[a:b, None]
        return out


def _stable_topk(rows: np.ndarray, k: int) -> np.ndarray:
    """First k columns of ``np.argsort(rows, kind="stable")`` without sorting whole rows."""
    n, m = rows.shape
    if k >= m:
        return np.argsort(rows, axis=1, kind="stable")
    kth = np.partition(rows, k - 1, axis=1)[:, k - 1 : k]
    below = rows < kth
    tied = rows == kth
    need = k - below.sum(axis=1, keepdims=True)
    take = below | (tied & (np.cumsum(tied, axis=1) <= need))
    cols = np.nonzero(take)[1].reshape(n, k)  # exactly k per row, in index order
    vals = np.take_along_axis(rows, cols, axis=1)
    return np.take_along_axis(cols, np.argsort(vals, axis=1, kind="stable"), axis=1)


def _reciprocal(ranks: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """[len(rows), k] mask: ranks[i, p] is a k-reciprocal neighbour of i (i is in its first k)."""
    fwd = ranks[rows, :k]
    return (ranks[fwd, :k] == rows[:, None, None]).any(axis=2)


def _gather_rows(indptr: np.ndarray, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat positions of the entries of CSR rows ``sel`` and the index in ``sel`` owning each."""
    start, length = indptr[sel], indptr[sel + 1] - indptr[sel]
    owner = np.repeat(np.arange(len(sel)), length)
    offset = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length)
    return np.repeat(start, length) + offset, owner


def _csr(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n: int):
    """Sum duplicates and return CSR (indptr, indices, data) of an n x n matrix."""
    key = rows.astype(np.int64) * n + cols
    uniq, inv = np.unique(key, return_inverse=True)
    data = np.bincount(inv, weights=vals, minlength=len(uniq))
    r = uniq // n
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(r, minlength=n), out=indptr[1:])
    return indptr, uniq % n, data


def k_reciprocal_rerank(q_g, q_q, g_g, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, *,
                        chunk: int = 256, square: bool = False) -> np.ndarray:
    """Re-ranked [Nq, Ng] float32 distances (Zhong et al. 2017; see the module docstring).

    ``q_g`` [Nq, Ng], ``q_q`` [Nq, Nq], ``g_g`` [Ng, Ng]: non-negative distances (numpy or CPU
    tensors; q_q / g_g may be asymmetric). Paper / upstream defaults k1=20, k2=6, lambda=0.3.
    ``square=True`` squares the distances first, as Zhong's and torchreid's copies do for
    Euclidean feature distances; upstream TransMatcher (QAConv ``reranking``) does not.
    Neighbour ties are broken by index. Memory beyond the inputs: O(chunk * (Nq + Ng)) for the
    rows in flight plus O((Nq + Ng) * k1 * k2) sparse neighbour data, never (Nq + Ng)^2.
    """
    q_g, q_q, g_g = _as_matrix(q_g, "q_g"), _as_matrix(q_q, "q_q"), _as_matrix(g_g, "g_g")
    nq, ng = q_g.shape
    if nq == 0 or ng == 0:
        raise ValueError(f"q_g must be non-empty, got shape {q_g.shape}")
    if q_q.shape != (nq, nq):
        raise ValueError(f"q_q must be [{nq}, {nq}] to match q_g {q_g.shape}, got {q_q.shape}")
    if g_g.shape != (ng, ng):
        raise ValueError(f"g_g must be [{ng}, {ng}] to match q_g {q_g.shape}, got {g_g.shape}")
    for name, v in (("k1", k1), ("k2", k2), ("chunk", chunk)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must lie in [0, 1], got {lambda_value!r}")
    k1, k2, chunk = int(k1), int(k2), int(chunk)

    joint = _JointRows(q_g, q_q, g_g, square)
    n = joint.n
    kf = min(k1 + 1, n)  # forward neighbours of the k-reciprocal set
    kh = min(int(np.around(k1 / 2.0)) + 1, n)  # ... of the half-size sets used in the expansion
    kq = min(k2, n)  # query-expansion neighbours
    kr = max(kf, kq)

    # Pass 1: column maxima of D and the first kr neighbours of every row of O.
    col_max = np.empty(n, np.float32)
    ranks = np.empty((n, kr), np.int64)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        raw = joint.raw(a, b)
        col_max[a:b] = raw.max(axis=1)
        if (col_max[a:b] <= 0).any() or not np.isfinite(col_max[a:b]).all():
            raise ValueError("every column of the joint distance matrix needs a finite positive "
                             "maximum; re-ranking expects non-negative distances")
        raw /= col_max[a:b, None]
        ranks[a:b] = _stable_topk(raw, kr)
    joint.col_max = col_max

    # Half-size k-reciprocal sets of all rows (needed for any candidate of any row).
    half_nb = ranks[:, :kh]
    half_ok = np.empty((n, kh), bool)
    for a in range(0, n, chunk):
        rows = np.arange(a, min(a + chunk, n))
        half_ok[rows] = _reciprocal(ranks, rows, kh)

    # Pass 2: expanded k-reciprocal sets and their weights V (sparse rows).
    v_rows, v_cols, v_vals = [], [], []
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        rows = np.arange(a, b)
        fwd = ranks[a:b, :kf]
        ok = _reciprocal(ranks, rows, kf)
        recip = np.where(ok, fwd, -1)
        cand_nb, cand_ok = half_nb[fwd], half_ok[fwd]  # [m, kf, kh]
        inside = (cand_nb[..., None] == recip[:, None, None, :]).any(axis=3) & cand_ok
        accept = ok & (inside.sum(axis=2) > 2.0 / 3.0 * cand_ok.sum(axis=2))
        grown = np.where(accept[..., None] & cand_ok, cand_nb, -1).reshape(b - a, -1)
        members = np.sort(np.concatenate([recip, grown], axis=1), axis=1)
        first = np.ones_like(members, bool)
        first[:, 1:] = members[:, 1:] != members[:, :-1]
        r_loc, pos = np.nonzero(first & (members >= 0))
        cols = members[r_loc, pos]
        w = np.exp(-joint.rows(a, b)[r_loc, cols].astype(np.float64))
        w /= np.bincount(r_loc, weights=w, minlength=b - a)[r_loc]
        v_rows.append(r_loc + a)
        v_cols.append(cols)
        v_vals.append(w)
    indptr, indices, data = _csr(np.concatenate(v_rows), np.concatenate(v_cols),
                                 np.concatenate(v_vals), n)

    # Query expansion: V[i] <- mean of V over the first kq neighbours of i.
    if k2 != 1:
        qe_rows, qe_cols, qe_vals = [], [], []
        step = max(1, chunk * 16)
        for a in range(0, n, step):
            b = min(a + step, n)
            sel = ranks[a:b, :kq].reshape(-1)
            flat, owner = _gather_rows(indptr, sel)
            qe_rows.append(owner // kq + a)
            qe_cols.append(indices[flat])
            qe_vals.append(data[flat] / kq)
        indptr, indices, data = _csr(np.concatenate(qe_rows), np.concatenate(qe_cols),
                                     np.concatenate(qe_vals), n)

    # Inverted index over the gallery rows only: only query-vs-gallery Jaccard is returned.
    g_start = indptr[nq]
    g_row = np.repeat(np.arange(ng), np.diff(indptr[nq:]))
    g_col, g_val = indices[g_start:], data[g_start:]
    by_col = np.argsort(g_col, kind="stable")
    inv_row, inv_val = g_row[by_col], g_val[by_col]
    inv_ptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(g_col, minlength=n), out=inv_ptr[1:])
    inv_len = np.diff(inv_ptr)

    out = np.empty((nq, ng), np.float32)
    q_owner = np.repeat(np.arange(nq), np.diff(indptr[: nq + 1]))
    row_pairs = np.bincount(q_owner, weights=inv_len[indices[: indptr[nq]]], minlength=nq)
    a = 0
    while a < nq:
        # Up to `chunk` query rows, fewer if their inverted-index pairs exceed the budget (>= 1 row).
        pairs = np.cumsum(row_pairs[a: min(a + chunk, nq)])
        b = a + max(1, int(np.searchsorted(pairs, _PAIR_BUDGET, side="right")))
        flat, owner = _gather_rows(indptr, np.arange(a, b))
        cols, vals = indices[flat], data[flat]
        pflat, powner = _gather_rows(inv_ptr, cols)
        shared = np.minimum(vals[powner], inv_val[pflat])
        s = np.bincount(owner[powner] * ng + inv_row[pflat], weights=shared, minlength=(b - a) * ng)
        jac = 1.0 - s / (2.0 - s)
        orig = q_g[a:b] * q_g[a:b] if square else q_g[a:b]
        orig = orig / col_max[a:b, None]
        out[a:b] = jac.reshape(b - a, ng) * (1.0 - lambda_value) + orig * lambda_value
        a = b
    return out
