"""Load upstream's ``checkpoint.pth.tar`` into our feature model and matcher.

Upstream saves ``{"model": feature_model.state_dict(), "criterion": loss.state_dict(),
"optim": ..., "epoch": ...}``; the loss holds the matcher, so its keys are ``matcher.*``. The file
is read weights-only (``weights_io.load``): a checkpoint from the internet cannot run code.
The configuration is read off the tensor shapes wherever they determine it.

QAConv's feature model (``reid/models/resmap.py``) has had two neck layouts, told apart by the
state_dict keys (``qaconv_neck_layout``):

- ``"2.0"`` (QAConv up to 2.0, resmap V1.1 of Feb 2021): ``neck_conv`` 3x3 without bias, then
  ``neck_bn`` BatchNorm2d: keys ``neck_conv.weight``, ``neck_bn.{weight, bias, running_mean,
  running_var, num_batches_tracked}``. Our ``QAConvFeatures`` is built this way.
- ``"2.1"`` (resmap V1.2 of July 2021, shipped with QAConv 2.1 and later): ``neck_conv`` 3x3
  with bias and no BatchNorm: keys ``neck_conv.weight``, ``neck_conv.bias``.

Both are L2-normalised over channels afterwards. ``set_qaconv_neck_layout`` (in
``matcher_features``, beside the model) turns a ``QAConvFeatures`` into either layout;
``load_upstream_checkpoint`` does it from the keys.

(The run's own checkpoints, ``checkpoint.pt`` of ``transmatcher-fast train``, are
``engine/checkpoint.py``'s.)
"""

from __future__ import annotations

import os
import re
from typing import Optional

from torch import nn

from .. import weights_io
from .matcher_features import (QAConvFeatures, TransMatcherFeatures, backbone_channels, feature_map_size,
                               parse_arch, set_qaconv_neck_layout)
from .qaconv import QAConv
from .resnet import DEPTHS, FINAL_LAYERS, STAGES, describe
from .transmatcher import TransMatcher


def qaconv_neck_layout(state: dict, source: str = "state_dict") -> Optional[str]:
    """QAConv feature-model neck layout of a state_dict (``module.`` prefixes allowed):
    ``"2.0"`` (bias-free ``neck_conv`` + ``neck_bn``), ``"2.1"`` (``neck_conv`` with bias, no
    ``neck_bn``) or None (no neck: ``neck=0``). A mix of both raises a ValueError naming the keys."""
    state = weights_io.strip_prefix(state)
    has_conv = "neck_conv.weight" in state
    has_bias = "neck_conv.bias" in state
    bn_keys = sorted(k for k in state if k.startswith("neck_bn."))
    if not has_conv and not has_bias and not bn_keys:
        return None
    if has_conv and has_bias and not bn_keys:
        return "2.1"
    if has_conv and not has_bias and bn_keys:
        return "2.0"
    found = [k for k in ("neck_conv.weight", "neck_conv.bias") if k in state] + bn_keys
    raise ValueError(f"{source}: the neck keys {found} are neither QAConv 2.0's layout "
                     "(neck_conv.weight + neck_bn.*, no neck_conv.bias) nor QAConv 2.1's "
                     "(neck_conv.weight + neck_conv.bias, no neck_bn)")


def criterion_matcher(criterion: dict) -> dict:
    """The matcher's state_dict inside upstream's ``criterion`` (its ``matcher.*`` keys)."""
    return weights_io.select(weights_io.strip_prefix(criterion), "matcher.")


def matcher_locations(matcher_state: dict) -> Optional[int]:
    """The feature-map locations a TransMatcher or QAConv state_dict (ours or upstream's) was
    built for; None for any other."""
    for matcher in (TransMatcher, QAConv):
        locations = matcher.locations_in(matcher_state)
        if locations is not None:
            return locations
    return None


def _count(state: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state for m in [pattern.match(k)] if m}
    return max(indices) + 1 if indices else 0


def _infer_backbone(state: dict, arch: Optional[str], path: str) -> tuple[int, Optional[str]]:
    if any(".bn1.IN." in k or k.startswith("base.bn1.IN.") for k in state):
        raise ValueError(f"checkpoint {path!r}: IBN-Net-a backbones are not supported (only "
                         "torchvision ResNets and IBN-Net-b)")
    if "base.conv1.weight" not in state:
        raise ValueError(f"checkpoint {path!r}: 'model' has no backbone (no 'base.conv1.weight')")
    ibn = "b" if "base.bn1.weight" in state and "base.bn1.running_mean" not in state else None
    bottleneck = "base.layer1.0.conv3.weight" in state
    counts = []
    for stage in STAGES:
        n = _count(state, f"base.{stage}.")
        if n == 0:
            break
        counts.append(n)
    candidates = [d for d, (blocks, bneck) in DEPTHS.items()
                  if bneck == bottleneck and tuple(blocks[:len(counts)]) == tuple(counts)]
    if arch is not None:
        depth = parse_arch(arch)
        if depth not in candidates:
            raise ValueError(f"checkpoint {path!r} holds a backbone with blocks per stage "
                             f"{counts} (bottleneck={bottleneck}), which is not arch={arch!r}")
        return depth, ibn
    if len(candidates) != 1:
        raise ValueError(f"checkpoint {path!r}: cannot tell the backbone depth from blocks per "
                         f"stage {counts} (candidates {candidates}); pass arch='resnet<depth>'")
    return candidates[0], ibn


def _infer_final_layer(state: dict, depth: int, final_layer: Optional[str], path: str) -> str:
    if "neck_conv.weight" not in state:
        return final_layer or "layer3"
    in_channels = state["neck_conv.weight"].shape[1]
    found = [f for f in FINAL_LAYERS if backbone_channels(depth, f) == in_channels]
    if final_layer is not None and final_layer not in found:
        raise ValueError(f"checkpoint {path!r}: the neck takes {in_channels} channels, which is "
                         f"not ResNet-{depth}'s {final_layer!r} output")
    if not found:
        raise ValueError(f"checkpoint {path!r}: the neck takes {in_channels} channels, which no "
                         f"stage of ResNet-{depth} gives")
    return final_layer or found[0]


def load_upstream_checkpoint(path: str, *, arch: Optional[str] = None, nhead: int = 1,
                             final_layer: Optional[str] = None, height: Optional[int] = None,
                             width: Optional[int] = None) -> tuple[nn.Module, nn.Module]:
    """``(model, matcher)`` with the weights of an upstream TransMatcher or QAConv(-GS)
    ``checkpoint.pth.tar`` (in training mode, as built; call ``.eval()`` to evaluate).

    Inferred from the tensors: backbone depth and IBN-b, ``final_layer`` (from the neck's input
    channels), ``neck``, encoder layers, ``dim_feedforward``, ``seq_len``, ``d_model``, decoder
    layers. Not recorded in the tensors, hence arguments: ``nhead`` (1), ``arch`` (needed only
    when the stored stages cannot tell ResNet-50 from ResNet-101), ``final_layer`` without a neck
    (``layer3``), and for QAConv ``height``/``width`` of the input images (default 384x128:
    the ``h x w`` feature map must match the matcher's ``h*w``). For TransMatcher, ``height`` and
    ``width`` when given are checked against ``seq_len``.

    QAConv's neck layout (2.0: conv without bias + ``neck_bn``; 2.1 and later: conv with bias,
    no BatchNorm) is read off the keys and the feature model built to match.

    Unused upstream keys are skipped: the backbone's stages after ``final_layer`` and its ``fc``.
    Any other missing or unexpected key raises a ValueError naming the file and the keys.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        checkpoint = weights_io.load(path)
    except weights_io.WeightsFileError as error:
        raise ValueError(f"checkpoint {path!r}: {error.problem}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict) \
            or not isinstance(checkpoint.get("criterion"), dict):
        keys = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"checkpoint {path!r} is not in upstream's format: expected a dict with "
                         f"'model' and 'criterion' state_dicts, got {keys}")
    state = weights_io.strip_prefix(checkpoint["model"])
    criterion = weights_io.strip_prefix(checkpoint["criterion"])
    matcher_state = criterion_matcher(criterion)
    if not matcher_state:
        raise ValueError(f"checkpoint {path!r}: 'criterion' holds no 'matcher.*' keys "
                         f"(got {sorted(criterion)[:8]}); QAConv 1.x class-memory losses are "
                         "not supported")

    depth, ibn = _infer_backbone(state, arch, path)
    final_layer = _infer_final_layer(state, depth, final_layer, path)
    neck = state["neck_conv.weight"].shape[0] if "neck_conv.weight" in state else 0

    if "decoder.layers.0.score_embed" in matcher_state:
        seq_len = matcher_state["decoder_layer.score_embed"].shape[-1] \
            if "decoder_layer.score_embed" in matcher_state \
            else matcher_state["decoder.layers.0.score_embed"].shape[-1]
        d_model = matcher_state["decoder.layers.0.fc1.weight"].shape[0]
        num_decoder_layers = _count(matcher_state, "decoder.layers.")
        dim_feedforward = matcher_state["decoder.layers.0.fc2.weight"].shape[0]
        num_encoder_layers = _count(state, "encoder.layers.")
        encoder_ff = (state["encoder.layers.0.linear1.weight"].shape[0]
                      if num_encoder_layers else dim_feedforward)
        if height is not None or width is not None:
            h, w = feature_map_size(height or 384, width or 128, final_layer)
            if h * w != seq_len:
                raise ValueError(f"checkpoint {path!r}: the matcher has seq_len {seq_len}, but "
                                 f"{height}x{width} images give a {h}x{w} feature map")
        model = TransMatcherFeatures(depth, ibn, final_layer, neck, nhead, num_encoder_layers,
                                     encoder_ff)
        if encoder_ff != dim_feedforward or num_decoder_layers != num_encoder_layers + 1 \
                or d_model != model.num_features:
            raise ValueError(
                f"checkpoint {path!r}: the feature model (neck {model.num_features}, "
                f"{num_encoder_layers} encoder layers, feedforward {encoder_ff}) does not fit the "
                f"matcher (d_model {d_model}, {num_decoder_layers} decoder layers, feedforward "
                f"{dim_feedforward})")
        matcher = TransMatcher(seq_len, d_model, num_decoder_layers, dim_feedforward)
    elif "fc.weight" in matcher_state and "logit_bn.weight" in matcher_state:
        h, w = feature_map_size(height or 384, width or 128, final_layer)
        locations = matcher_state["fc.weight"].shape[1]
        if h * w != locations:
            raise ValueError(f"checkpoint {path!r}: the QAConv matcher has {locations} locations, "
                             f"but {height or 384}x{width or 128} images give a {h}x{w} feature "
                             "map; pass height= and width= of the training images")
        model = QAConvFeatures(depth, ibn, final_layer, neck)
        layout = qaconv_neck_layout(state, f"checkpoint {path!r} ('model')")
        if layout is not None:
            set_qaconv_neck_layout(model, layout)
        matcher = QAConv(model.num_features, h, w)
    else:
        raise ValueError(f"checkpoint {path!r}: 'criterion' holds neither a TransMatcher nor a "
                         f"QAConv matcher (keys {sorted(matcher_state)[:8]})")

    skipped = model.base.skipped_prefixes()
    model_state = {k: v for k, v in state.items()
                   if not k.startswith(tuple("base." + p for p in skipped))}
    weights_io.load_exactly(model, model_state, f"checkpoint {path!r} ('model')",
                            hint=f"{describe(depth, ibn)} to {final_layer}")
    weights_io.load_exactly(matcher, matcher_state, f"checkpoint {path!r} ('criterion' matcher.*)")
    return model, matcher

