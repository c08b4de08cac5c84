"""QAConv (Liao & Shao, ECCV 2020; QAConv-GS 2.x): a drop-in for upstream's ``reid/models/qaconv.py``.

Features are channels-first ``[n, num_features, height, width]`` and L2-normalised over channels
by the feature model, so the location dot products are cosine similarities. There is no gate:
the fused op runs with ``score_embed=None`` and never builds the ``[p, g, hw, hw]`` tensor.
Both upstream protocols work: ``make_kernel(probe)`` + ``forward(gallery)`` (up to mid-2022) and
``forward(probe, gallery)`` (2023).

The matcher's parameters (``bn``, ``fc``, ``logit_bn``) are the same in QAConv 2.0 and 2.1+; what
changed is the feature model's neck (2.0: conv without bias + ``neck_bn``; 2.1+: conv with bias,
no BatchNorm). ``models.upstream_checkpoint.qaconv_neck_layout`` tells them apart from a state_dict,
``set_qaconv_neck_layout`` builds either, and ``load_upstream_checkpoint`` loads both.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops import max_sim
from . import memory
from .correspondence import CHANNELS_FIRST, Correspondence, check_pair, in_eval_mode, one_pair
from .transmatcher import _check_positive, _uses_batch_stats


class QAConv(nn.Module):
    """Args: ``num_features`` channels, ``height`` x ``width`` feature-map size.

    Score of probe p and gallery g: ``logit_bn(fc(bn(max_r S)) + fc(bn(max_s S)))`` with
    ``S[r, s]`` the dot product of gallery location r and probe location s, ``bn`` a scalar
    ``BatchNorm1d(1)``, ``fc`` a ``Linear(height*width, 1)`` initialised to the mean.
    """

    label = "QAConv"
    matcher_name = "qaconv"  # build_model(matcher=...)'s name for it
    feature_layout = CHANNELS_FIRST

    def __init__(self, num_features: int, height: int, width: int):
        super().__init__()
        _check_positive(num_features=num_features, height=height, width=width)
        self.num_features = num_features
        self.height = height
        self.width = width
        self.bn = nn.BatchNorm1d(1)
        self.fc = nn.Linear(height * width, 1)
        self.logit_bn = nn.BatchNorm1d(1)
        self.kernel = None
        self.reset_parameters()

    @staticmethod
    def locations_in(state_dict) -> Optional[int]:
        """``height * width`` of a QAConv state_dict (``fc.weight``); None for another matcher's."""
        if "fc.weight" in state_dict and "logit_bn.weight" in state_dict:
            return int(state_dict["fc.weight"].shape[-1])
        return None

    def reset_running_stats(self) -> None:
        self.bn.reset_running_stats()
        self.logit_bn.reset_running_stats()

    def reset_parameters(self) -> None:
        """BN weight 1 and bias 0; fc weight 1/(h*w) (a mean); fc bias keeps nn.Linear's default."""
        self.bn.reset_parameters()
        self.logit_bn.reset_parameters()
        with torch.no_grad():
            self.fc.weight.fill_(1.0 / (self.height * self.width))

    def _locations(self, features: Tensor, name: str) -> Tensor:
        """``[n, C, h, w]`` -> ``[n, h*w, C]`` (a view; the op accepts non-contiguous inputs)."""
        expected = (self.num_features, self.height, self.width)
        if features.dim() != 4 or tuple(features.shape[1:]) != expected:
            raise ValueError(f"{name} must be [n, num_features, height, width] = [n, "
                             f"{', '.join(map(str, expected))}], got shape {tuple(features.shape)}")
        return features.flatten(2).transpose(1, 2)

    def _score(self, probe: Tensor, gallery: Tensor) -> Tensor:
        """``[p, g]`` scores of location-major probe ``[p, hw, C]`` and gallery ``[g, hw, C]``."""
        hw = self.height * self.width
        q_best, g_best = max_sim(probe, gallery)
        pooled = torch.cat((q_best, g_best), dim=-1).view(-1, 1, hw)
        if self.bn.weight is not None:
            pooled = pooled.to(self.bn.weight.dtype)  # float32 op output for a .half() model
        pooled = self.bn(pooled).view(-1, hw)
        logit = self.fc(pooled).view(-1, 2).sum(dim=1, keepdim=True)
        return self.logit_bn(logit).view(probe.shape[0], gallery.shape[0])

    def make_kernel(self, features: Tensor) -> None:
        """Store the probe features ``[p, C, h, w]`` for the next one-argument ``forward``."""
        self._locations(features, "probe")
        self.kernel = features

    def forward(self, features: Tensor, gallery: Optional[Tensor] = None) -> Tensor:
        """``forward(gallery)`` after ``make_kernel(probe)``, or ``forward(probe, gallery)``:
        ``[num_probe, num_gallery]`` logits."""
        if gallery is None:
            if self.kernel is None:
                raise RuntimeError("QAConv.forward(gallery) needs make_kernel(probe) first "
                                   "(or call forward(probe, gallery))")
            probe, gallery = self.kernel, features
        else:
            probe = features
        p = self._locations(probe, "probe")
        g = p if gallery is probe else self._locations(gallery, "gallery")
        return self._score(p, g)

    def project(self, features: Tensor, name: str = "features") -> Tensor:
        """``[n, C, h, w]`` features as the ``[n, h*w, C]`` locations ``score_projected`` takes."""
        return self._locations(features, name)

    def score_projected(self, probe: Tensor, gallery: Tensor) -> Tensor:
        """``[p, g]`` scores of ``project``-ed features; blocks of pairs scored separately equal
        one pass only when no BatchNorm uses batch statistics."""
        return self._score(probe, gallery)

    def correspondences(self, probe_features: Tensor, gallery_features: Tensor) -> list[Correspondence]:
        """Where each location of one probe image ``[1, C, h, w]`` found its best match in one
        gallery image (``max_sim``'s argmax indices, no projection, no gate): one panel, "QAConv"."""
        expected = (f"[1, num_features, height, width] = [1, {self.num_features}, "
                    f"{self.height}, {self.width}]")
        check_pair(probe_features, gallery_features, expected)
        if tuple(probe_features.shape[1:]) != (self.num_features, self.height, self.width):
            raise ValueError(f"probe_features and gallery_features must be {expected}, got "
                             f"{tuple(probe_features.shape)}")

        def compute():
            p = self._locations(probe_features, "probe_features")
            g = self._locations(gallery_features, "gallery_features")
            return [one_pair(*max_sim(p, g, None, return_indices=True), self.height, self.width, None,
                             self.label)]
        return in_eval_mode(self, compute)

    def bytes_per_pair(self) -> int:
        """Temporaries per probe/gallery pair: q_best, g_best, indices, pooled copy, BN output."""
        return 6 * 2 * self.height * self.width * 4

    def match(self, probe: Tensor, gallery: Tensor, chunk: Optional[int] = None) -> Tensor:
        """``forward(probe, gallery)`` with the gallery streamed ``chunk`` images at a time
        (default from free memory); one pass when a BatchNorm uses batch statistics."""
        if _uses_batch_stats(self):
            return self(probe, gallery)
        p = self.project(probe, "probe")
        g = p if gallery is probe else self.project(gallery, "gallery")
        step = memory.gallery_chunk(p.shape[0], g.shape[0], self.bytes_per_pair(), p.device, chunk)
        blocks = [self._score(p, g[start:start + step]) for start in range(0, max(1, g.shape[0]), step)]
        return torch.cat(blocks, dim=1)
