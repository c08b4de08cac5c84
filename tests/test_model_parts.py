"""What the parts tell the engine, so that it asks them instead of testing their class: a matcher's
correspondences (the argmax of the materialised gated scores), label, feature layout and trained
locations; the method that trains a matcher; a model's patch groups."""

from __future__ import annotations

import pytest
import torch

from transmatcher_fast.methods import DEFAULT_METHOD, get_method, method_of_matcher
from transmatcher_fast.models import (Correspondence, QAConv, TransMatcher, TransReID, criterion_matcher,
                                      matcher_locations)
from transmatcher_fast.models.correspondence import CHANNELS_FIRST, CHANNELS_LAST, EMBEDDING
from transmatcher_fast.models.embedding import EmbeddingDistance


def _explicit(probe, gallery, gate=None):
    """Best matches of ``[L, d]`` probe / gallery locations from the materialised scores
    ``S[s, t] = <g[s], p[t]> * sigmoid(E[s, t])`` (float64)."""
    s = gallery.double() @ probe.double().t()
    if gate is not None:
        s = s * torch.sigmoid(gate.double())
    return s.max(dim=0), s.max(dim=1)  # per probe location, per gallery location


def _check(match: Correspondence, probe, gallery, gate=None):
    (q_best, q_index), (g_best, g_index) = _explicit(probe, gallery, gate)
    assert torch.equal(match.q_index.long(), q_index) and torch.equal(match.g_index.long(), g_index)
    torch.testing.assert_close(match.q_best.double(), q_best, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(match.g_best.double(), g_best, rtol=1e-5, atol=1e-6)


def test_transmatcher_correspondences_per_layer():
    torch.manual_seed(0)
    matcher = TransMatcher(seq_len=8, d_model=16, num_decoder_layers=2, dim_feedforward=32).train()
    probe, gallery = torch.randn(1, 4, 2, 32), torch.randn(1, 4, 2, 32)
    matches = matcher.correspondences(probe, gallery)
    assert matcher.training and all(m.training for m in matcher.modules())  # modes restored
    assert [(m.layer, m.label, m.height, m.width) for m in matches] == [(1, "layer 1", 4, 2), (2, "layer 2", 4, 2)]
    for n, (layer, match) in enumerate(zip(matcher.decoder.layers, matches)):
        with torch.no_grad():
            p = layer.project(probe[..., 16 * n:16 * (n + 1)])[0]
            g = layer.project(gallery[..., 16 * n:16 * (n + 1)])[0]
        _check(match, p, g, layer.score_embed.detach()[0, 0])
    with pytest.raises(ValueError, match="same shape"):
        matcher.correspondences(torch.randn(1, 2, 4, 32), gallery)
    assert (matcher.label, matcher.matcher_name, matcher.feature_layout) == ("TransMatcher", "transmatcher",
                                                                             CHANNELS_LAST)


def test_qaconv_correspondences_one_panel():
    torch.manual_seed(1)
    matcher = QAConv(num_features=16, height=4, width=2)
    probe = torch.nn.functional.normalize(torch.randn(1, 16, 4, 2), dim=1)
    gallery = torch.nn.functional.normalize(torch.randn(1, 16, 4, 2), dim=1)
    (match,) = matcher.correspondences(probe, gallery)
    assert (match.layer, match.label, match.height, match.width) == (None, "QAConv", 4, 2)
    _check(match, probe.flatten(2)[0].t(), gallery.flatten(2)[0].t())
    with pytest.raises(ValueError, match="probe_features"):
        matcher.correspondences(torch.randn(1, 16, 2, 4), torch.randn(1, 16, 2, 4))
    assert (matcher.label, matcher.matcher_name, matcher.feature_layout) == ("QAConv", "qaconv", CHANNELS_FIRST)


def test_embedding_distance_declares_its_layout_and_draws_nothing():
    assert EmbeddingDistance().feature_layout == EMBEDDING
    assert EmbeddingDistance().label == "Euclidean distance"
    assert EmbeddingDistance("cosine").label == "cosine distance"
    assert not hasattr(EmbeddingDistance(), "correspondences")


def test_matcher_locations_from_ours_and_upstreams_state_dicts():
    transmatcher = TransMatcher(seq_len=12, d_model=8, num_decoder_layers=2, dim_feedforward=16)
    qaconv = QAConv(num_features=8, height=5, width=3)
    assert matcher_locations(transmatcher.state_dict()) == 12
    assert matcher_locations(qaconv.state_dict()) == 15
    assert matcher_locations(EmbeddingDistance().state_dict()) is None
    # Upstream's loss holds the matcher (``criterion``: matcher.*, DataParallel's module. prefix).
    criterion = {f"module.matcher.{k}": v for k, v in transmatcher.state_dict().items()}
    assert matcher_locations(criterion_matcher(criterion)) == 12


def test_the_method_of_a_matcher_and_the_default_method():
    assert method_of_matcher(TransMatcher(seq_len=8, d_model=8, num_decoder_layers=1, dim_feedforward=8)) \
        == "transmatcher"
    assert method_of_matcher(QAConv(num_features=8, height=2, width=2)) == "qaconv"
    with pytest.raises(ValueError, match="EmbeddingDistance"):
        method_of_matcher(EmbeddingDistance())
    assert get_method(DEFAULT_METHOD).name == DEFAULT_METHOD


def test_transreid_patch_groups_are_jpms():
    tiny = dict(arch="vit_tiny_patch16", img_size=(64, 32))
    with_jpm = TransReID(7, 0, 0, jpm=True, **tiny)
    assert with_jpm.patch_groups() is with_jpm.jpm_index
    assert TransReID(7, 0, 0, **tiny).patch_groups() is None
