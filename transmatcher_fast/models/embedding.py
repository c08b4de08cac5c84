"""Global embeddings (TransReID, TransReID-SSL, any ``[n, D]`` feature) as a comparer of the
evaluation engine, so that the same protocol, metrics, re-ranking, exports and pictures serve them.

    from transmatcher_fast.engine.evaluate import evaluate_features
    result = evaluate_features(EmbeddingDistance(), query, gallery, topk=100)   # MSMT17 in bounded memory

``engine.matching.match`` drives a comparer through four methods: ``project`` (once per image),
``score_projected`` (a block of ``[P, G]`` scores, higher = closer), ``bytes_per_pair`` (for the
block size) and, here, ``distance`` (score -> distance, instead of the fused matchers'
``1 - sigmoid(score / 10)``). Upstream TransReID (``utils/metrics.py``) L2-normalises the whole
feature (always: its ``FEAT_NORM`` flag is a truthy string) and ranks by the squared Euclidean
distance ``|q|^2 + |g|^2 - 2 q.g`` in float32, i.e. ``2 - 2 cos``; that is the default.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .correspondence import EMBEDDING

METRICS = ("euclidean", "cosine")

Projected = tuple[Tensor, Tensor]  # (float32 embeddings [n, D], their squared norms [n])


class EmbeddingDistance(nn.Module):
    """Distances of ``[n, D]`` embeddings, as upstream TransReID computes them.

    Args:
        metric: ``"euclidean"`` (upstream's squared Euclidean ``|q|^2 + |g|^2 - 2 q.g``, = 2 - 2 cos
            on normalised features, clamped at 0) or ``"cosine"`` (``1 - cos``, always normalised).
        normalize: L2-normalise the embeddings first (upstream always does; ``False`` gives the
            plain squared Euclidean distance of the raw features).

    Everything runs in float32 with autocast off, whatever the engine's ``amp`` (upstream's
    inference is float32 too): in 16 bits ``|q|^2 + |g|^2 - 2 q.g`` cancels catastrophically, and
    the cost here is one GEMM per block, not worth the ranks it would scramble.
    """

    feature_layout = EMBEDDING

    def __init__(self, metric: str = "euclidean", normalize: bool = True):
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be True or False, got {normalize!r}")
        self.metric = metric
        self.normalize = normalize
        # No weights, but the engine (evaluate_features, match) finds a comparer's device with
        # next(parameters()); an empty frozen parameter follows .to(device) and answers it.
        self.device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    @property
    def label(self) -> str:
        """What the pictures call it: "Euclidean distance" or "cosine distance"."""
        return "Euclidean distance" if self.metric == "euclidean" else "cosine distance"

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}, normalize={self.normalize}"

    def project(self, features: Tensor, name: str = "features") -> Projected:
        """``[n, D]`` features (any float dtype) -> ``(x [n, D] float32, |x|^2 [n] float32)``,
        ``x`` L2-normalised when ``normalize`` (or for the cosine metric)."""
        if features.ndim != 2:
            raise ValueError(f"{name} must be [n, D] embeddings, got shape {tuple(features.shape)}")
        with torch.autocast(features.device.type, enabled=False):
            x = features.float()
            if self.normalize or self.metric == "cosine":
                x = F.normalize(x, dim=1)  # upstream's call: eps 1e-12, a zero vector stays zero
            # Norms of the normalised vectors (1 up to rounding), as upstream's formula takes them.
            return x, x.pow(2).sum(dim=1)

    def score_projected(self, probe: Projected, gallery: Projected) -> Tensor:
        """``[P, G]`` float32 similarities of projected embeddings, higher = closer: ``cos`` for
        the cosine metric, minus the squared Euclidean distance for the Euclidean one."""
        (q, q_sq), (g, g_sq) = probe, gallery
        if q.shape[1] != g.shape[1]:
            raise ValueError(f"probe embeddings {tuple(q.shape)} and gallery embeddings "
                             f"{tuple(g.shape)} differ in D")
        with torch.autocast(q.device.type, enabled=False):
            if self.metric == "cosine":
                return q @ g.T
            # Upstream's addmm(|q|^2 + |g|^2, q, g^T, beta=1, alpha=-2), in place: one [P, G] buffer.
            return (q_sq[:, None] + g_sq[None, :]).addmm_(q, g.T, alpha=-2).neg_()

    def distance(self, score: Tensor) -> Tensor:
        """Scores of :meth:`score_projected` -> float32 distances, smaller = closer, >= 0: the
        squared Euclidean distance or ``1 - cos``. Clamping at 0 removes the rounding below
        zero of near-identical pairs (re-ranking and exports take non-negative distances); upstream
        does not clamp, which orders only pairs closer than float32 rounding (~1e-7) differently."""
        score = score.float()
        return (1.0 - score if self.metric == "cosine" else score.neg()).clamp_(min=0.0)

    @property
    def distance_name(self) -> str:
        """The distance as results record it (the fused matchers': ``1 - sigmoid(score / 10)``)."""
        if self.metric == "cosine":
            return "1 - cos of L2-normalised embeddings"
        if self.normalize:
            return "squared Euclidean of L2-normalised embeddings (2 - 2 cos)"
        return "squared Euclidean of embeddings"

    def score_of_distance(self, distance: Tensor) -> Tensor:
        """Distances of :meth:`distance` back to similarities (higher = closer): ``cos`` for the
        cosine metric and for normalised Euclidean distances (``1 - d / 2``), ``-d`` otherwise."""
        distance = torch.as_tensor(distance).float()
        if self.metric == "cosine":
            return 1.0 - distance
        return 1.0 - distance / 2.0 if self.normalize else -distance

    def bytes_per_pair(self) -> int:
        """Temporaries per probe x gallery pair in the engine: the score and the distance
        (float32), and the top-k merge's concatenated distances (4) and int64 indices (8)."""
        return 4 + 4 + 4 + 8

    def forward(self, probe: Tensor, gallery: Optional[Tensor] = None) -> Tensor:
        """Dense ``[P, G]`` distances in one block (``gallery=None``: the probes themselves); for
        large sets use ``engine.matching.match``, which blocks them and can keep the top k."""
        p = self.project(probe, "probe")
        g = p if gallery is None else self.project(gallery, "gallery")
        return self.distance(self.score_projected(p, g))
