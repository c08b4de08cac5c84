"""Feature models of TransMatcher (upstream ``restranmap.py``) and QAConv (``reid/models/resmap.py``),
and ``build_model``, which returns a feature model and its matcher for a configuration.

TransMatcher: backbone to ``final_layer`` -> 3x3 neck conv (bias, no BN/ReLU) -> the neck map
(level 0), then ``num_encoder_layers`` post-LN transformer encoder layers (no positional
encoding), each layer's output one more level; the levels are concatenated channels-last:
``[B, h, w, (num_encoder_layers + 1) * neck]``, not normalised.

QAConv: backbone to ``final_layer`` -> neck -> L2 normalisation over channels: ``[B, neck, h, w]``
channels-first. The neck has QAConv's two layouts (``neck_layout``): ``"2.0"`` (default; QAConv
up to 2.0) a 3x3 conv without bias -> BatchNorm2d, ``"2.1"`` (QAConv 2.1 and later) a 3x3 conv
with bias and no BatchNorm (``set_qaconv_neck_layout`` builds either).
"""

from __future__ import annotations

import copy
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .qaconv import QAConv
from .resnet import CHANNELS, DEPTHS, STRIDES, ResNet
from .transmatcher import TransMatcher

MATCHERS = ("transmatcher", "qaconv")
DEFAULT_NECK = {"transmatcher": 512, "qaconv": 128}


class TransformerEncoder(nn.Module):
    """``num_layers`` copies of ``encoder_layer`` applied in turn to ``[L, B, C]`` sequences;
    returns every layer's output, concatenated over channels: ``[L, B, num_layers * C]``."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src: Tensor, mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        outputs = []
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask)
            outputs.append(output)
        if self.norm is not None:  # upstream's loop here is dead code (and would crash)
            outputs = [self.norm(o) for o in outputs]
        return torch.cat(outputs, dim=-1)


def _backbone(depth: int, ibn: Optional[str], final_layer: str, pretrained: Optional[str]) -> ResNet:
    base = ResNet(depth, ibn, final_layer)
    if pretrained is not None:
        base.load_pretrained(pretrained)
    return base


class TransMatcherFeatures(nn.Module):
    """Upstream's ``restranmap.ResNet``: ``[B, 3, H, W]`` images (RGB in [0, 1], no mean/std
    normalisation upstream) -> ``[B, H/s, W/s, (num_encoder_layers + 1) * num_features]``.

    ``pretrained``: path of a local torchvision / IBN-Net state_dict for the backbone (None:
    random initialisation; nothing is downloaded)."""

    def __init__(self, depth: int = 50, ibn: Optional[str] = "b", final_layer: str = "layer3",
                 neck: int = 512, nhead: int = 1, num_encoder_layers: int = 2,
                 dim_feedforward: int = 2048, dropout: float = 0.0,
                 pretrained: Optional[str] = None):
        super().__init__()
        self.depth, self.final_layer, self.neck, self.pretrained = depth, final_layer, neck, pretrained
        self.base = _backbone(depth, ibn, final_layer, pretrained)
        out_planes = self.base.out_channels
        if neck > 0:
            self.neck_conv = nn.Conv2d(out_planes, neck, kernel_size=3, padding=1)
            out_planes = neck
        self.encoder = None
        if num_encoder_layers > 0:
            if out_planes % nhead:
                raise ValueError(f"nhead={nhead} must divide the encoder width {out_planes} (neck)")
            encoder_layer = nn.TransformerEncoderLayer(out_planes, nhead, dim_feedforward, dropout)
            self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers)
        # Channels per level: the matcher's d_model.
        self.num_features = out_planes

    def forward(self, inputs: Tensor) -> Tensor:
        x = self.base(inputs)
        if self.neck > 0:
            x = self.neck_conv(x)
        out = x.permute(0, 2, 3, 1)  # level 0: the CNN map, [b, h, w, c]
        if self.encoder is not None:
            b, c, h, w = x.shape
            y = self.encoder(x.reshape(b, c, h * w).permute(2, 0, 1))  # [hw, b, levels * c]
            out = torch.cat((out, y.permute(1, 0, 2).reshape(b, h, w, -1)), dim=-1)
        return out


QACONV_NECK_LAYOUTS = ("2.0", "2.1")


class QAConvFeatures(nn.Module):
    """Upstream's ``resmap.ResNet``: ``[B, 3, H, W]`` -> L2-normalised ``[B, neck, H/s, W/s]``.

    ``neck_layout``: ``"2.0"`` (default: 3x3 conv without bias + ``neck_bn`` BatchNorm2d, QAConv
    up to 2.0) or ``"2.1"`` (3x3 conv with bias, ``neck_bn`` an ``nn.Identity``, so no
    ``neck_bn.*`` keys; QAConv 2.1 and later). Without a neck (``neck=0``) it is recorded as None.
    ``self.neck_layout`` says which was built."""

    def __init__(self, depth: int = 50, ibn: Optional[str] = "b", final_layer: str = "layer3",
                 neck: int = 128, pretrained: Optional[str] = None, neck_layout: str = "2.0"):
        super().__init__()
        if neck_layout not in QACONV_NECK_LAYOUTS:
            raise ValueError(f"neck_layout must be one of {QACONV_NECK_LAYOUTS}, got {neck_layout!r}")
        self.depth, self.final_layer, self.neck, self.pretrained = depth, final_layer, neck, pretrained
        self.base = _backbone(depth, ibn, final_layer, pretrained)
        out_planes = self.base.out_channels
        if neck > 0:
            self.neck_conv = nn.Conv2d(out_planes, neck, kernel_size=3, padding=1, bias=False)
            out_planes = neck
            self.neck_bn = nn.BatchNorm2d(out_planes)
            self.neck_layout: Optional[str] = "2.0"
            # Built as 2.0 first, then rebuilt: a seeded 2.1 model draws the same random numbers
            # (and so gets the same initial weights) as it always has.
            if neck_layout != "2.0":
                set_qaconv_neck_layout(self, neck_layout)
        else:
            self.neck_layout = None
        self.num_features = out_planes

    def forward(self, inputs: Tensor) -> Tensor:
        x = self.base(inputs)
        if self.neck > 0:
            x = self.neck_bn(self.neck_conv(x))
        return F.normalize(x)


def set_qaconv_neck_layout(model: QAConvFeatures, layout: str) -> QAConvFeatures:
    """Rebuild the neck of ``model`` (a ``QAConvFeatures`` with ``neck > 0``) in ``layout``
    ``"2.0"`` (conv without bias + ``neck_bn`` BatchNorm2d) or ``"2.1"`` (conv with bias,
    ``neck_bn`` an ``nn.Identity``, so the state_dict holds no ``neck_bn.*`` keys), in place;
    returns ``model``. The rebuilt modules are freshly initialised (load weights afterwards), on
    the device and dtype of the old conv; ``model.neck_layout`` records the layout."""
    if layout not in QACONV_NECK_LAYOUTS:
        raise ValueError(f"layout must be one of {QACONV_NECK_LAYOUTS}, got {layout!r}")
    if not isinstance(model, QAConvFeatures):
        raise TypeError(f"model must be a QAConvFeatures, got {type(model).__name__}")
    if model.neck <= 0:
        raise ValueError("model has no neck (neck=0): there is no neck layout to set")
    old = model.neck_conv
    conv = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=3, padding=1,
                     bias=layout == "2.1")
    model.neck_conv = conv.to(device=old.weight.device, dtype=old.weight.dtype)
    if layout == "2.1":
        model.neck_bn = nn.Identity()
    else:
        model.neck_bn = nn.BatchNorm2d(old.out_channels).to(device=old.weight.device,
                                                            dtype=old.weight.dtype)
    model.neck_layout = layout
    return model


def parse_arch(arch: Union[str, int]) -> int:
    """``"resnet50"`` (or ``50``) -> 50."""
    text = str(arch).lower()
    depth = text[len("resnet"):] if text.startswith("resnet") else text
    if not depth.isdigit() or int(depth) not in DEPTHS:
        raise ValueError(f"arch must be one of {['resnet%d' % d for d in DEPTHS]}, got {arch!r}")
    return int(depth)


def parse_ibn(ibn: Optional[str]) -> Optional[str]:
    """``"b"`` -> IBN-Net-b; ``None`` / ``"none"`` -> the plain torchvision ResNet."""
    if ibn is None or str(ibn).lower() == "none":
        return None
    if str(ibn).lower() != "b":
        raise ValueError(f"ibn must be 'b' (IBN-Net-b) or None/'none' (torchvision ResNet), got {ibn!r}")
    return "b"


def feature_map_size(height: int, width: int, final_layer: str) -> tuple[int, int]:
    """The feature-map size of a ``height`` x ``width`` image at ``final_layer``: every stride-2
    step rounds up (``H/16`` for multiples of 16, as upstream's ``H // 16`` assumes)."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if final_layer not in STRIDES:
        raise ValueError(f"final_layer must be one of {tuple(STRIDES)[1:]}, got {final_layer!r}")
    steps = STRIDES[final_layer].bit_length() - 1
    h, w = height, width
    for _ in range(steps):
        h, w = -(-h // 2), -(-w // 2)
    return h, w


def build_model(arch: str = "resnet50", ibn: Optional[str] = "b", final_layer: str = "layer3",
                neck: Optional[int] = None, nhead: int = 1, num_trans_layers: int = 3,
                dim_feedforward: int = 2048, dropout: float = 0.0, height: int = 384,
                width: int = 128, matcher: str = "transmatcher",
                pretrained: Optional[str] = None,
                neck_layout: str = "2.0") -> tuple[nn.Module, nn.Module]:
    """The feature model and the matcher of a configuration: ``(model, matcher)``.

    Arguments and defaults are upstream's command-line options (TransMatcher ``main.py``):

    - ``arch``: ``resnet18``, ``resnet34``, ``resnet50`` (default), ``resnet101``, ``resnet152``.
    - ``ibn``: ``"b"`` (default, IBN-Net-b) or ``None``/``"none"`` (torchvision ResNet).
    - ``final_layer``: last backbone stage, ``layer2``/``layer3`` (default)/``layer4``
      (stride 8/16/32).
    - ``neck``: channels of the 3x3 neck conv, i.e. ``d_model`` (default 512 for TransMatcher,
      128 for QAConv; 0 skips the neck).
    - ``nhead``, ``num_trans_layers`` (N: N-1 encoder layers, N decoder layers; default 1, 3),
      ``dim_feedforward`` (2048, encoder FFN and decoder MLP), ``dropout`` (0, encoder).
    - ``height``, ``width``: input image size (384x128), which fixes the matcher's
      ``seq_len = h * w`` (24*8 = 192).
    - ``matcher``: ``"transmatcher"`` (default) or ``"qaconv"`` (QAConv feature model and
      matcher; the transformer arguments are then unused).
    - ``pretrained``: local torchvision / IBN-Net state_dict file for the backbone, or None
      (random initialisation). Upstream downloads ImageNet weights; this never downloads.
    - ``neck_layout``: QAConv's neck, ``"2.0"`` (default: conv without bias + BatchNorm) or
      ``"2.1"`` (conv with bias, no BatchNorm); see :class:`QAConvFeatures`. TransMatcher's neck
      has one layout: anything but ``"2.0"`` is refused with ``matcher="transmatcher"``.
    """
    depth, ibn = parse_arch(arch), parse_ibn(ibn)
    if matcher not in MATCHERS:
        raise ValueError(f"matcher must be one of {MATCHERS}, got {matcher!r}")
    if neck is None:
        neck = DEFAULT_NECK[matcher]
    h, w = feature_map_size(height, width, final_layer)
    if matcher == "qaconv":
        model = QAConvFeatures(depth, ibn, final_layer, neck, pretrained, neck_layout)
        return model, QAConv(model.num_features, h, w)
    if neck_layout != "2.0":
        raise ValueError(f"neck_layout={neck_layout!r} is a QAConv option (its 2.0/2.1 necks); "
                         "TransMatcher's neck has one layout: leave neck_layout='2.0'")
    if isinstance(num_trans_layers, bool) or not isinstance(num_trans_layers, int) \
            or num_trans_layers < 1:
        raise ValueError(f"num_trans_layers must be a positive integer, got {num_trans_layers!r}")
    model = TransMatcherFeatures(depth, ibn, final_layer, neck, nhead, num_trans_layers - 1,
                                 dim_feedforward, dropout, pretrained)
    return model, TransMatcher(h * w, model.num_features, num_trans_layers, dim_feedforward)


def backbone_channels(depth: int, final_layer: str) -> int:
    return CHANNELS[final_layer][1 if DEPTHS[depth][1] else 0]
