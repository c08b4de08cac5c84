"""TransReID (He et al., ICCV 2021): a drop-in for upstream's ``make_model`` transformer models.

``TransReID(jpm=False)`` is upstream's ``build_transformer`` (ViT -> BNNeck -> classifier) and
``TransReID(jpm=True)`` its ``build_transformer_local`` (the jigsaw patch module, JPM): same
state_dict keys and shapes (``base.*``, ``b1.*``, ``b2.*``, ``classifier*``, ``bottleneck*``),
initialisation and outputs, so upstream checkpoints load (``load_param``) and give the same
features. What differs is the computation:

- the backbone's blocks are memory-light (``models.vit``: fused attention, recomputed norms/GELU);
- JPM's shift + patch shuffle + grouping is one precomputed index (``jpm_index``), and the k local
  groups, which share ``b2``, go through it as one batch of ``k * B`` sequences;
- ``b1`` and ``b2`` compute their cls token only (the only output upstream uses).
"""

from __future__ import annotations

import copy
import os
from typing import Optional

import torch
from torch import Tensor, nn

from .. import weights_io
from .vit import AttentionMaps, build_vit, load_pretrained

NECK_FEATS = ("before", "after")


def jpm_index(num_patches: int, shift_num: int = 5, shuffle_groups: int = 2, divide_length: int = 4,
              rearrange: bool = True) -> Tensor:
    """Token indices ``[k, P + 1]`` of JPM's k local groups (``k = divide_length``,
    ``P = num_patches // k``): column 0 is the cls token (0), then the group's patch tokens.

    Upstream's ``shuffle_unit`` as a fixed permutation: the patch tokens are shifted by
    ``shift_num - 1`` (tokens ``shift_num..N`` then ``1..shift_num-1``), padded with the
    second-to-last token when ``N`` is not a multiple of ``shuffle_groups``, interleaved G ways
    (``new[i * G + g] = old[g * len / G + i]``) and cut into k groups of ``P`` (from the unpadded
    N; the tail is dropped). ``rearrange=False``: contiguous groups of patches.
    """
    n = num_patches
    for name, value, low in (("num_patches", n, 1), ("shift_num", shift_num, 1),
                             ("shuffle_groups", shuffle_groups, 1), ("divide_length", divide_length, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if divide_length > n:
        raise ValueError(f"divide_length={divide_length} must not exceed the {n} patches")
    tokens = torch.arange(1, n + 1, device="cpu")
    if rearrange:
        if shift_num > n:
            raise ValueError(f"shift_num={shift_num} must not exceed the {n} patches")
        tokens = torch.cat([tokens[shift_num - 1:], tokens[:shift_num - 1]])
        if len(tokens) % shuffle_groups:
            tokens = torch.cat([tokens, tokens[-2:-1]])
        if len(tokens) % shuffle_groups:
            raise ValueError(f"shuffle_groups={shuffle_groups} must divide the {n} patches or {n} + 1 "
                             "(upstream pads one token)")
        tokens = tokens.view(shuffle_groups, -1).t().reshape(-1)
    p = n // divide_length
    groups = tokens[:divide_length * p].view(divide_length, p)
    return torch.cat([torch.zeros(divide_length, 1, dtype=torch.long, device="cpu"), groups], dim=1)


def _init_classifier(linear: nn.Linear) -> nn.Linear:
    nn.init.normal_(linear.weight, std=0.001)
    return linear


def _bnneck(planes: int) -> nn.BatchNorm1d:
    """BatchNorm1d, weight 1 and bias 0, the bias frozen (requires_grad False)."""
    bn = nn.BatchNorm1d(planes)
    nn.init.constant_(bn.weight, 1.0)
    nn.init.constant_(bn.bias, 0.0)
    bn.bias.requires_grad_(False)
    return bn


class TransReID(nn.Module):
    """Upstream's ``make_model`` for ``MODEL.NAME: transformer`` (softmax classifier).

    Args (upstream's config key):
        num_classes: training identities.
        camera_num, view_num: cameras and views of the training set; used when ``sie_camera``
            (``SIE_CAMERA``) / ``sie_view`` (``SIE_VIEW``) is set, with weight ``sie_coe``
            (``SIE_COE``, 3.0).
        arch: ``TRANSFORMER_TYPE`` (``models.vit.ARCHS``: ``vit_base_patch16``, ``deit_small_patch16``,
            ``vit_small_patch16``, ``vit_small_patch16_transreid``, ``vit_tiny_patch16``).
        img_size: ``INPUT.SIZE_TRAIN`` ``(H, W)``; stride: ``STRIDE_SIZE`` (int or pair; 12 for
            TransReID*).
        jpm: ``JPM``; shift_num ``SHIFT_NUM`` (5; 8 for vehicles), shuffle_groups ``SHUFFLE_GROUP``
            (2), divide_length ``DEVIDE_LENGTH`` (4: the number of local branches; upstream has
            exactly 4, this takes any k with ``classifier_1..k`` / ``bottleneck_1..k`` and local
            features weighted 1/k at test time), rearrange ``RE_ARRANGE``.
        drop_path: ``DROP_PATH`` (0.1); neck_feat: ``TEST.NECK_FEAT`` (``"before"`` / ``"after"``).
        pretrained: local ImageNet / DeiT / DINO checkpoint (``PRETRAIN_PATH`` with
            ``PRETRAIN_CHOICE: imagenet``), loaded before the last block is copied into b1/b2;
            pretrain_hw_ratio: TransReID-SSL's ``PRETRAIN_HW_RATIO``.
        stem_conv, gem_pooling: TransReID-SSL's ``STEM_CONV`` (ICS) and ``GEM_POOLING``.

    ``forward(x [B, 3, H, W], cam_label [B], view_label [B])``, as upstream:
        training: ``(cls_score [B, num_classes], global_feat [B, D])``; with JPM the lists
        ``[score_g, score_1..k]`` and ``[f_g, f_1..k]`` (features before the BNNecks).
        eval: ``[B, D]`` (``f_g``, or its BNNeck output for ``neck_feat="after"``); with JPM
        ``[B, (k + 1) * D]`` = ``[f_g, f_1/k, ..., f_k/k]`` (3840 for ViT-B), BNNeck outputs for
        ``"after"``.
    """

    def __init__(self, num_classes: int, camera_num: int = 0, view_num: int = 0,
                 arch: str = "vit_base_patch16", img_size=(256, 128), stride=16,
                 sie_camera: bool = False, sie_view: bool = False, sie_coe: float = 3.0,
                 jpm: bool = False, shift_num: int = 5, shuffle_groups: int = 2, divide_length: int = 4,
                 rearrange: bool = True, drop_path: float = 0.1, neck_feat: str = "before",
                 pretrained: Optional[str] = None, stem_conv: bool = False, pretrain_hw_ratio: int = 1,
                 gem_pooling: bool = False):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if neck_feat not in NECK_FEATS:
            raise ValueError(f"neck_feat must be one of {NECK_FEATS}, got {neck_feat!r}")
        if jpm and gem_pooling:
            raise ValueError("gem_pooling pools the global feature of the plain model; with jpm=True "
                             "upstream ignores it: set one of them")
        self.num_classes, self.neck_feat, self.jpm = num_classes, neck_feat, jpm
        self.base = build_vit(arch, img_size=img_size, stride_size=stride,
                              camera_num=camera_num if sie_camera else 0,
                              view_num=view_num if sie_view else 0, sie_coe=sie_coe,
                              drop_path_rate=drop_path, local_feature=jpm, gem_pool=gem_pooling,
                              stem_conv=stem_conv)
        self.in_planes = planes = self.base.embed_dim
        if pretrained is not None:
            load_pretrained(self.base, pretrained, pretrain_hw_ratio)
        if jpm:
            index = jpm_index(self.base.num_patches, shift_num, shuffle_groups, divide_length, rearrange)
            self.shift_num, self.shuffle_groups, self.divide_length = shift_num, shuffle_groups, divide_length
            self.rearrange = rearrange
            # Copies of the (pretrained) last block and norm: b1 global, b2 shared by the k groups.
            self.b1 = nn.Sequential(copy.deepcopy(self.base.blocks[-1]), copy.deepcopy(self.base.norm))
            self.b2 = nn.Sequential(copy.deepcopy(self.base.blocks[-1]), copy.deepcopy(self.base.norm))
        branches = divide_length if jpm else 0
        self.classifier = _init_classifier(nn.Linear(planes, num_classes, bias=False))
        for j in range(1, branches + 1):
            setattr(self, f"classifier_{j}", _init_classifier(nn.Linear(planes, num_classes, bias=False)))
        self.bottleneck = _bnneck(planes)
        for j in range(1, branches + 1):
            setattr(self, f"bottleneck_{j}", _bnneck(planes))
        if jpm:
            self.register_buffer("jpm_index", index, persistent=False)

    def _branches(self, name: str) -> list:
        return [getattr(self, f"{name}_{j}") for j in range(1, self.divide_length + 1)]

    def forward(self, x: Tensor, label=None, cam_label=None, view_label=None):
        """Upstream's call, ``model(img, target, cam_label=..., view_label=...)``: ``label`` is
        taken and unused, as by upstream's softmax heads (only its ArcFace-style heads read it)."""
        if not self.jpm:
            global_feat = self.base(x, cam_label, view_label)
            feat = self.bottleneck(global_feat)
            if self.training:
                return self.classifier(feat), global_feat
            return feat if self.neck_feat == "after" else global_feat

        tokens = self.base(x, cam_label, view_label)  # [B, T, D] before the last block
        b, d, k = tokens.shape[0], tokens.shape[-1], self.divide_length
        global_feat = self.b1[1](self.b1[0].forward_cls(tokens))[:, 0]
        groups = tokens[:, self.jpm_index].reshape(b * k, -1, d)  # [B * k, P + 1, D], image-major
        local_feats = self.b2[1](self.b2[0].forward_cls(groups)).view(b, k, d)
        if not self.training and self.neck_feat == "before":
            return torch.cat([global_feat, local_feats.flatten(1) / k], dim=1)
        feat = self.bottleneck(global_feat)
        local_bn = [bn(local_feats[:, j]) for j, bn in enumerate(self._branches("bottleneck"))]
        if self.training:
            scores = [self.classifier(feat)] + [fc(f) for fc, f in zip(self._branches("classifier"), local_bn)]
            return scores, [global_feat] + list(local_feats.unbind(1))
        return torch.cat([feat] + [f / k for f in local_bn], dim=1)

    def attention_maps(self, x: Tensor, cam_label=None, view_label=None) -> AttentionMaps:
        """The global branch's attention pictures (``VisionTransformer.attention_maps``); with JPM
        the last layer is ``b1``'s block."""
        return self.base.attention_maps(x, cam_label, view_label, self.b1[0] if self.jpm else None)

    def patch_groups(self) -> Optional[Tensor]:
        """JPM's groups of patches for pictures (``jpm_index`` ``[k, P + 1]``: token indices, column
        0 the cls token); None without JPM."""
        return self.jpm_index if self.jpm else None

    def load_param(self, trained_path: str) -> None:
        """Load a trained TransReID checkpoint (ours or upstream's, ``module.`` prefixes of
        DataParallel stripped), strictly: a missing, unexpected or misshapen key raises a
        ValueError naming the file and the keys."""
        if not os.path.isfile(trained_path):
            raise ValueError(f"checkpoint {trained_path!r}: no such file")
        try:
            state = weights_io.load(trained_path)
        except weights_io.WeightsFileError as error:  # the message says which file and why
            raise ValueError(f"{trained_path}: cannot be read as a weights-only checkpoint ({error.problem})") from None
        state = weights_io.unwrap(state, ("state_dict",))
        if not weights_io.is_state_dict(state):
            raise ValueError(f"{trained_path}: not a state_dict (a mapping of names to tensors)")
        state = weights_io.strip_prefix(state)
        weights_io.check_fits(trained_path, self.state_dict(), state)
        self.load_state_dict(state)

