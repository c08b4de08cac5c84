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
argsort would), and V is a sparse row list. k1 or k2 larger than the set (k1 >= Nq + Ng or
k2 > Nq + Ng) is clamped with a warning: the reference's slices then take every image, as here.

Memory beyond the three inputs and the [Nq, Ng] result is O(chunk * (Nq + Ng) + (Nq + Ng) * k1):
every step works on a block of rows whose temporaries hold at most max(chunk * (Nq + Ng), 2^16)
elements (at least one row; one row of the expansion step holds (k1+1) * (round(k1/2)+1)
candidates, fewer than (k1+1) * (Nq+Ng)), and the data kept for all rows is the neighbours,
reciprocity masks and sorted membership keys, O((Nq + Ng) * k1), and V before and after query
expansion (in practice ~k1 and ~2*k1 entries a row for k2 = 6; at most Nq + Ng). Membership tests
are binary searches in sorted keys ("is i among j's first k") or a [block rows, Nq + Ng] mask of
the block's sets ("is a candidate in i's set"), never [rows, k, k] comparison tensors.
Peak numpy memory (tracemalloc), 2 cores, clustered synthetic distances, k2 = 6:
300 x 1,500 (inputs 10.6 MiB): 22 MiB at k1 = 20, 47 MiB at k1 = 100, 208 MiB at k1 = 1000 (33 s);
3,368 x 15,913 (Market-sized, inputs 1.19 GiB, result 0.2 GiB): 0.39 GiB at k1 = 20 (6 s),
0.57 GiB at k1 = 100 (13 s); most of it the chunk * (Nq + Ng) block temporaries.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

__all__ = ["k_reciprocal_rerank"]

_MIN_BUDGET = 1 << 16  # smallest block (elements), so tiny inputs are not row-by-row


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


def _row_keys(ranks: np.ndarray, k: int, n: int) -> np.ndarray:
    """Sorted keys ``j * n + ranks[j, p]`` (p < k) for every row j: O(rows * k) int64."""
    keys = np.sort(ranks[:, :k], axis=1)
    keys += (np.arange(len(ranks), dtype=np.int64) * n)[:, None]
    return keys.reshape(-1)


def _isin_sorted(keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``query`` (any shape) is in the sorted 1-D ``keys``."""
    pos = np.searchsorted(keys, query)
    np.minimum(pos, len(keys) - 1, out=pos)
    return keys[pos] == query


def _reciprocal(ranks: np.ndarray, keys: np.ndarray, rows: np.ndarray, k: int,
                n: int) -> np.ndarray:
    """[len(rows), k] mask: ranks[i, p] is a k-reciprocal neighbour of i (i is in its first k).
    ``keys`` = ``_row_keys(ranks, k, n)``; O(len(rows) * k) memory."""
    fwd = ranks[rows, :k]
    return _isin_sorted(keys, fwd * n + rows[:, None])


def _row_blocks(cost_per_row: np.ndarray | int, n_rows: int, budget: int, max_rows: int):
    """Consecutive [a, b) row blocks whose summed cost stays within ``budget`` (>= 1 row each)."""
    if np.isscalar(cost_per_row):
        step = max(1, min(max_rows, budget // max(1, int(cost_per_row))))
        for a in range(0, n_rows, step):
            yield a, min(a + step, n_rows)
        return
    a = 0
    while a < n_rows:
        cost = np.cumsum(cost_per_row[a: min(a + max_rows, n_rows)])
        b = a + max(1, int(np.searchsorted(cost, budget, side="right")))
        yield a, b
        a = b


def _gather_rows(indptr: np.ndarray, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat positions of the entries of CSR rows ``sel`` and the index in ``sel`` owning each."""
    start, length = indptr[sel], indptr[sel + 1] - indptr[sel]
    owner = np.repeat(np.arange(len(sel)), length)
    offset = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length)
    return np.repeat(start, length) + offset, owner


def _csr(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_rows: int, n_cols: int):
    """Sum duplicates and return CSR (indptr, indices, data) of an n_rows x n_cols matrix."""
    key = rows.astype(np.int64) * n_cols + cols
    uniq, inv = np.unique(key, return_inverse=True)
    data = np.bincount(inv, weights=vals, minlength=len(uniq))
    r = uniq // n_cols
    indptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(r, minlength=n_rows), out=indptr[1:])
    return indptr, uniq % n_cols, data


def k_reciprocal_rerank(q_g, q_q, g_g, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, *,
                        chunk: int = 256, square: bool = False) -> np.ndarray:
    """Re-ranked [Nq, Ng] float32 distances (Zhong et al. 2017; see the module docstring).

    ``q_g`` [Nq, Ng], ``q_q`` [Nq, Nq], ``g_g`` [Ng, Ng]: non-negative distances (numpy or CPU
    tensors; q_q / g_g may be asymmetric). Paper / upstream defaults k1=20, k2=6, lambda=0.3.
    ``square=True`` squares the distances first, as Zhong's and torchreid's copies do for
    Euclidean feature distances; upstream TransMatcher (QAConv ``reranking``) does not.
    Neighbour ties are broken by index. k1 >= Nq + Ng or k2 > Nq + Ng is clamped to the whole set
    with a warning (the reference's slices take every image then). Memory beyond the inputs and
    the result: O(chunk * (Nq + Ng)) for the rows in flight plus O((Nq + Ng) * k1) neighbour data
    and sparse V, never (Nq + Ng)^2 nor chunk * k1^2 (see the module docstring).
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
    big = [f"k1={k1} (needs k1 + 1 = {k1 + 1} neighbours)"] if k1 >= n else []
    big += [f"k2={k2}"] if k2 > n else []
    if big:
        warnings.warn(f"re-ranking: {' and '.join(big)} larger than the set of {n} images "
                      f"({nq} queries + {ng} gallery); using all {n} images as neighbours, as the "
                      f"reference does", RuntimeWarning, stacklevel=2)
    kf = min(k1 + 1, n)  # forward neighbours of the k-reciprocal set
    kh = min(int(np.around(k1 / 2.0)) + 1, n)  # ... of the half-size sets used in the expansion
    kq = min(k2, n)  # query-expansion neighbours
    kr = max(kf, kq)
    budget = max(chunk * n, _MIN_BUDGET)  # elements of one block's temporaries

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
        del raw
    joint.col_max = col_max

    # Reciprocity of every (row, forward neighbour) pair, for the full and the half-size sets.
    keys_f, keys_h = _row_keys(ranks, kf, n), _row_keys(ranks, kh, n)
    full_ok = np.empty((n, kf), bool)
    half_ok = np.empty((n, kh), bool)
    for a, b in _row_blocks(kf, n, budget, n):
        full_ok[a:b] = _reciprocal(ranks, keys_f, np.arange(a, b), kf, n)
        half_ok[a:b] = _reciprocal(ranks, keys_h, np.arange(a, b), kh, n)
    del keys_f, keys_h
    half_nb = ranks[:, :kh]

    # Pass 2: expanded k-reciprocal sets and their weights V (sparse rows, in row order).
    v_cols, v_vals, v_len = [], [], np.zeros(n, np.int64)
    for a, b in _row_blocks(kf * (kh + 1), n, budget, chunk):
        m = b - a
        fwd, ok = ranks[a:b, :kf], full_ok[a:b]
        mark = np.zeros((m, n), bool)  # i's k-reciprocal set as a [m, n] mask (m <= chunk)
        r_ok, p_ok = np.nonzero(ok)
        mark[r_ok, fwd[r_ok, p_ok]] = True
        del r_ok, p_ok
        cand_nb, cand_ok = half_nb[fwd], half_ok[fwd]  # [m, kf, kh]
        inside = mark[np.arange(m)[:, None, None], cand_nb] & cand_ok
        del mark
        accept = ok & (inside.sum(axis=2) > 2.0 / 3.0 * cand_ok.sum(axis=2))
        del inside
        grown = np.where(accept[..., None] & cand_ok, cand_nb, -1).reshape(m, -1)
        del cand_nb, cand_ok
        members = np.concatenate([np.where(ok, fwd, -1), grown], axis=1)
        del grown
        members.sort(axis=1)
        first = members >= 0
        first[:, 1:] &= members[:, 1:] != members[:, :-1]
        r_loc, pos = np.nonzero(first)
        cols = members[r_loc, pos]
        del members, first, pos
        w = np.exp(-joint.rows(a, b)[r_loc, cols].astype(np.float64))
        w /= np.bincount(r_loc, weights=w, minlength=m)[r_loc]
        v_len[a:b] = np.bincount(r_loc, minlength=m)
        v_cols.append(cols)
        v_vals.append(w)
    del full_ok, half_ok
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(v_len, out=indptr[1:])
    indices, data = np.concatenate(v_cols), np.concatenate(v_vals)
    del v_cols, v_vals

    # Query expansion: V[i] <- mean of V over the first kq neighbours of i (row blocks whose
    # gathered entries fit the budget; rows of different blocks never merge).
    if k2 != 1:
        qe_cols, qe_vals, qe_len = [], [], np.zeros(n, np.int64)
        gathered = v_len[ranks[:, :kq]].sum(axis=1)
        for a, b in _row_blocks(gathered, n, budget, n):
            sel = ranks[a:b, :kq].reshape(-1)
            flat, owner = _gather_rows(indptr, sel)
            bptr, bcols, bvals = _csr(owner // kq, indices[flat], data[flat] / kq, b - a, n)
            qe_len[a:b] = np.diff(bptr)
            qe_cols.append(bcols)
            qe_vals.append(bvals)
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(qe_len, out=indptr[1:])
        indices, data = np.concatenate(qe_cols), np.concatenate(qe_vals)
        del qe_cols, qe_vals
    del ranks

    # Inverted index over the gallery rows only: only query-vs-gallery Jaccard is returned.
    g_start = indptr[nq]
    g_row = np.repeat(np.arange(ng), np.diff(indptr[nq:]))
    g_col, g_val = indices[g_start:], data[g_start:]
    by_col = np.argsort(g_col, kind="stable")
    inv_row, inv_val = g_row[by_col], g_val[by_col]
    del g_row, by_col
    inv_ptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(g_col, minlength=n), out=inv_ptr[1:])
    inv_len = np.diff(inv_ptr)

    out = np.empty((nq, ng), np.float32)
    q_owner = np.repeat(np.arange(nq), np.diff(indptr[: nq + 1]))
    row_pairs = np.bincount(q_owner, weights=inv_len[indices[: indptr[nq]]], minlength=nq)
    del q_owner
    # Up to `chunk` query rows, fewer if their inverted-index pairs exceed the budget (>= 1 row).
    for a, b in _row_blocks(row_pairs, nq, budget, chunk):
        flat, owner = _gather_rows(indptr, np.arange(a, b))
        cols, vals = indices[flat], data[flat]
        pflat, powner = _gather_rows(inv_ptr, cols)
        shared = np.minimum(vals[powner], inv_val[pflat])
        s = np.bincount(owner[powner] * ng + inv_row[pflat], weights=shared, minlength=(b - a) * ng)
        del pflat, powner, shared
        jac = 1.0 - s / (2.0 - s)
        orig = q_g[a:b] * q_g[a:b] if square else q_g[a:b]
        orig = orig / col_max[a:b, None]
        out[a:b] = jac.reshape(b - a, ng) * (1.0 - lambda_value) + orig * lambda_value
    return out
