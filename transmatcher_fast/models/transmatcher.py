"""TransMatcher (Liao & Shao, NeurIPS 2021): a drop-in for upstream's ``transmatcher.py``.

Same constructors, parameter names, shapes, initialisation, BatchNorm behaviour and
``make_kernel(probe)`` + ``forward(gallery)`` protocol as upstream, so upstream checkpoints load
and give the same scores. What differs is how a decoder layer computes them:

- the ``[q, k, L, L]`` gated similarity tensor is never built: ``transmatcher_fast.max_sim`` fuses
  the dot products, the ``sigmoid(score_embed)`` gate and both max poolings;
- the scoring head keeps no ``[2qk, dim_feedforward]`` activations (``head.matching_head``
  recomputes them in backward);
- a batch matched against itself (``make_kernel(x); forward(x)``, as in training) is projected by
  fc1 once, not twice;
- ``match(probe, gallery)`` projects every image once and streams the gallery in chunks.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.init import xavier_uniform_

from ..ops import max_sim
from . import memory
from .correspondence import CHANNELS_LAST, Correspondence, check_pair, in_eval_mode, one_pair
from .head import matching_head


def _check_positive(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _uses_batch_stats(module: nn.Module) -> bool:
    """Whether some BatchNorm in ``module`` normalises with the statistics of its input."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm)
               and (m.training or m.running_mean is None) for m in module.modules())


class TransformerDecoderLayer(nn.Module):
    """One matching layer: shared projection fc1, gated all-pairs similarity with global max
    pooling in both directions, scalar BN, MLP head 192 -> dim_feedforward -> 1 shared by both
    directions, and a scalar BN on the summed logit.

    ``forward(tgt, memory)`` takes probe features ``tgt [q, h, w, d_model]`` and gallery features
    ``memory [k, h, w, d_model]`` (``h * w == seq_len``; ``[n, seq_len, d_model]`` works too) and
    returns ``[q, k]`` scores.
    """

    def __init__(self, seq_len: int, d_model: int = 512, dim_feedforward: int = 2048):
        super().__init__()
        _check_positive(seq_len=seq_len, d_model=d_model, dim_feedforward=dim_feedforward)
        self.seq_len = seq_len
        self.d_model = d_model
        # Upstream starts from a symmetric embedding; TransMatcher.reset_parameters then
        # overwrites it with xavier_uniform_. Kept so the random stream matches upstream's.
        score_embed = torch.randn(seq_len, seq_len)
        score_embed = score_embed + score_embed.t()
        # E[s, t]: s indexes gallery (memory) locations, t probe (tgt) locations.
        self.score_embed = nn.Parameter(score_embed.view(1, 1, seq_len, seq_len))
        self.fc1 = nn.Linear(d_model, d_model)
        self.bn1 = nn.BatchNorm1d(1)
        self.fc2 = nn.Linear(seq_len, dim_feedforward)
        self.bn2 = nn.BatchNorm1d(dim_feedforward)
        self.relu = nn.ReLU()  # applied inside head.matching_head; kept for upstream's module tree
        self.fc3 = nn.Linear(dim_feedforward, 1)
        self.bn3 = nn.BatchNorm1d(1)

    def project(self, features: Tensor, name: str = "features") -> Tensor:
        """fc1 of ``[n, h, w, d_model]`` (or ``[n, seq_len, d_model]``) features: ``[n, L, d]``."""
        shape = tuple(features.shape)
        if features.dim() == 4:
            ok = shape[1] * shape[2] == self.seq_len and shape[3] == self.d_model
        else:
            ok = features.dim() == 3 and shape[1] == self.seq_len and shape[2] == self.d_model
        if not ok:
            raise ValueError(
                f"{name} must be [n, h, w, d_model] with h*w = seq_len = {self.seq_len} and "
                f"d_model = {self.d_model} (or [n, seq_len, d_model]), got shape {shape}")
        return self.fc1(features.reshape(shape[0], self.seq_len, self.d_model))

    def score(self, probe: Tensor, gallery: Tensor) -> Tensor:
        """``[q, k]`` scores of fc1-projected probe ``[q, L, d]`` against gallery ``[k, L, d]``."""
        q, k = probe.shape[0], gallery.shape[0]
        # The op's query is the probe: its score_embed is [Lg, Lq] = upstream's E[s, t].
        q_best, g_best = max_sim(probe, gallery, self.score_embed[0, 0])
        # bn1 -> fc2 -> bn2 -> relu -> fc3 on each direction's row, the two directions summed.
        logit = matching_head(q_best.view(-1, self.seq_len), g_best.view(-1, self.seq_len),
                              self.bn1, self.fc2, self.bn2, self.fc3)
        if self.bn3.weight is not None:
            logit = logit.to(self.bn3.weight.dtype)  # the op returns float32 for 16-bit inputs
        return self.bn3(logit).view(q, k)

    def forward(self, tgt: Tensor, memory: Tensor) -> Tensor:
        probe = self.project(tgt, "tgt (probe)")
        gallery = probe if memory is tgt else self.project(memory, "memory (gallery)")
        return self.score(probe, gallery)


class TransformerDecoder(nn.Module):
    """``num_layers`` independent copies of ``decoder_layer``; layer n matches the n-th channel
    chunk of the features (encoder level n). Scores are summed, then ``norm`` (a
    ``BatchNorm1d(1)`` over all scores) is applied when given."""

    def __init__(self, decoder_layer: TransformerDecoderLayer, num_layers: int,
                 norm: Optional[nn.Module] = None):
        super().__init__()
        _check_positive(num_layers=num_layers)
        self.layers = nn.ModuleList([copy.deepcopy(decoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def split(self, features: Tensor, name: str = "features") -> tuple[Tensor, ...]:
        """The per-layer channel chunks of ``[n, h, w, num_layers * d_model]`` features."""
        d_model = self.layers[0].d_model
        if features.dim() not in (3, 4) or features.shape[-1] != self.num_layers * d_model:
            raise ValueError(
                f"{name} must be [n, h, w, num_layers * d_model] = [n, h, w, "
                f"{self.num_layers} * {d_model}], got shape {tuple(features.shape)}")
        return features.chunk(self.num_layers, dim=-1)

    def normalize(self, score: Tensor) -> Tensor:
        if self.norm is None:
            return score
        q, k = score.shape
        return self.norm(score.view(-1, 1)).view(q, k)

    def forward(self, tgt: Tensor, memory: Tensor) -> Tensor:
        probe = self.split(tgt, "tgt (probe)")
        gallery = probe if memory is tgt else self.split(memory, "memory (gallery)")
        score = None
        for layer, p, g in zip(self.layers, probe, gallery):
            layer_score = layer(p, g)
            score = layer_score if score is None else score + layer_score
        return self.normalize(score)


class TransMatcher(nn.Module):
    """Upstream's TransMatcher matcher on the fused op.

    Args:
        seq_len: feature-map locations h*w (192 for 384x128 images at stride 16).
        d_model: channels per encoder level (upstream's ``--neck``, 512).
        num_decoder_layers: decoder layers N, one per encoder level (3).
        dim_feedforward: hidden size of each layer's MLP head (2048).

    Protocol (upstream's): ``make_kernel(probe)`` then ``forward(gallery)`` returns
    ``[num_probe, num_gallery]`` logits, higher = more similar. Features are channels-last
    ``[n, h, w, N * d_model]``. ``match(probe, gallery)`` gives the same scores in bounded memory.
    """

    label = "TransMatcher"
    matcher_name = "transmatcher"  # build_model(matcher=...)'s name for it
    feature_layout = CHANNELS_LAST

    def __init__(self, seq_len: int, d_model: int = 512, num_decoder_layers: int = 3,
                 dim_feedforward: int = 2048):
        super().__init__()
        self.seq_len = seq_len
        self.d_model = d_model
        # Registered as a submodule (upstream does so): its parameters are in the state_dict,
        # though forward never uses it.
        self.decoder_layer = TransformerDecoderLayer(seq_len, d_model, dim_feedforward)
        decoder_norm = nn.BatchNorm1d(1)
        self.decoder = TransformerDecoder(self.decoder_layer, num_decoder_layers, decoder_norm)
        self.memory = None
        self.reset_parameters()

    @staticmethod
    def locations_in(state_dict) -> Optional[int]:
        """``seq_len`` of a TransMatcher state_dict (ours or upstream's: the ``score_embed``
        shape); None for another matcher's."""
        for key in ("decoder.layers.0.score_embed", "decoder_layer.score_embed"):
            if key in state_dict:
                return int(state_dict[key].shape[-1])
        return None

    def reset_parameters(self) -> None:
        """xavier_uniform_ on every parameter with more than one dimension (score_embed included);
        biases keep nn.Linear's default, BatchNorm weight 1 and bias 0."""
        for p in self.parameters():
            if p.dim() > 1:
                xavier_uniform_(p)

    def make_kernel(self, features: Tensor) -> None:
        """Store the probe features ``[q, h, w, N * d_model]`` for the next ``forward``."""
        self.memory = features

    def forward(self, features: Tensor) -> Tensor:
        """Scores ``[q, k]`` of the stored probe features against gallery ``features``."""
        if self.memory is None:
            raise RuntimeError("TransMatcher.forward(gallery) needs make_kernel(probe) first")
        return self.decoder(self.memory, features)

    def project(self, features: Tensor, name: str = "features") -> tuple[Tensor, ...]:
        """fc1 of every encoder level of ``[n, h, w, N * d_model]`` features: one ``[n, L, d]``
        tensor per decoder layer, what ``score_projected`` takes. Project each image once, then
        score it against as many others as needed."""
        parts = self.decoder.split(features, name)
        return tuple(layer.project(part, name) for layer, part in zip(self.decoder.layers, parts))

    def score_projected(self, probe: tuple[Tensor, ...], gallery: tuple[Tensor, ...]) -> Tensor:
        """``[q, k]`` scores of projected probe and gallery features (from ``project``). Blocks of
        pairs scored separately equal one pass only when no BatchNorm uses batch statistics."""
        score = None
        for layer, p, g in zip(self.decoder.layers, probe, gallery):
            s = layer.score(p, g)
            score = s if score is None else score + s
        return self.decoder.normalize(score)

    def correspondences(self, probe_features: Tensor, gallery_features: Tensor) -> list[Correspondence]:
        """Per decoder layer, where each location of one probe image ``[1, h, w, N * d_model]``
        found its best match in one gallery image: ``max_sim``'s argmax indices on the features
        projected and gated exactly as the layer scores them (``project``, then
        ``sigmoid(score_embed)``). Panels are titled "layer n"."""
        decoder = self.decoder
        expected = (f"[1, h, w, num_layers * d_model] = [1, h, w, {decoder.num_layers} * "
                    f"{self.d_model}] with h*w = seq_len = {self.seq_len}")
        check_pair(probe_features, gallery_features, expected)
        _, h, w, c = probe_features.shape
        if h * w != self.seq_len or c != decoder.num_layers * self.d_model:
            raise ValueError(f"probe_features and gallery_features must be {expected}, got "
                             f"{tuple(probe_features.shape)}")

        def compute():
            matches = []
            probe_parts = decoder.split(probe_features, "probe_features")
            gallery_parts = decoder.split(gallery_features, "gallery_features")
            for n, (layer, p, g) in enumerate(zip(decoder.layers, probe_parts, gallery_parts), start=1):
                gate = layer.score_embed.view(layer.seq_len, layer.seq_len)
                best = max_sim(layer.project(p, "probe_features"), layer.project(g, "gallery_features"), gate,
                               return_indices=True)
                matches.append(one_pair(*best, h, w, n, f"layer {n}"))
            return matches
        return in_eval_mode(self, compute)

    def bytes_per_pair(self) -> int:
        """Temporaries one probe/gallery pair needs while scored: q_best, g_best, their indices,
        the pooled copy and its BN output, per layer when autograd keeps them."""
        layers = self.decoder.num_layers if torch.is_grad_enabled() else 1
        return 6 * 2 * self.seq_len * 4 * layers

    def match(self, probe: Tensor, gallery: Tensor, chunk: Optional[int] = None) -> Tensor:
        """Scores ``[num_probe, num_gallery]``, equal to ``make_kernel(probe); forward(gallery)``.

        Each image is projected by fc1 once; the gallery is then matched ``chunk`` images at a
        time (default: as many as fit in a quarter of the free memory of the device). When a
        BatchNorm uses batch statistics (training mode) those statistics span all pairs, so the
        pairs are scored in one pass, as the protocol does.
        """
        if _uses_batch_stats(self.decoder):
            return self.decoder(probe, gallery)
        projected_probe = self.project(probe, "probe")
        projected_gallery = projected_probe if gallery is probe else self.project(gallery, "gallery")
        num_probe, num_gallery = probe.shape[0], gallery.shape[0]
        step = memory.gallery_chunk(num_probe, num_gallery, self.bytes_per_pair(), probe.device, chunk)
        blocks = [self.score_projected(projected_probe, tuple(g[start:start + step] for g in projected_gallery))
                  for start in range(0, max(1, num_gallery), step)]
        return torch.cat(blocks, dim=1)
