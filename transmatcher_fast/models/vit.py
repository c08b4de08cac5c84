"""The ViT backbone of TransReID (ICCV 2021) and TransReID-SSL, in upstream's parameter layout.

A drop-in for upstream's ``model/backbones/vit_pytorch.py`` class ``TransReID`` (and the
TransReID-SSL copy): overlapping patch embedding, cls token, position embedding, side information
embedding (SIE), pre-norm blocks with stochastic depth, the optional IBN convolution stem (ICS) and
GeM pooling of TransReID-SSL. Same parameter names, shapes, initialisation (in the same random
order) and outputs; what differs is how a block computes them:

- attention runs in ``F.scaled_dot_product_attention`` (a fused kernel: the ``[B, heads, T, T]``
  attention matrix is neither kept for backward nor, on the flash paths, built at all);
- ``LayerNorm -> Linear`` and ``LayerNorm -> fc1 -> GELU -> fc2`` are autograd functions that keep
  only their input and the fc1 output for backward, and recompute the normalised tokens and the
  GELU there (two cheap element-wise passes instead of 6 tokens x D floats per token and block);
- where only the cls token's output is used (the global feature, JPM's branches), the last block
  runs its query, projection and MLP on the cls token alone (``Block.forward_cls``).

Also here: pretrained loading (``load_pretrained``: ImageNet ViT/DeiT, DeiT distilled, DINO
teachers, TransReID-SSL's ``hw_ratio``), the position embedding resized (``resize_pos_embed`` for
weights of another grid, :class:`MultiResolutionViT` for DINO's crops of another size), attention
maps for pictures and ``ViTMatchingFeatures``, which turns the patch tokens into the feature maps TransMatcher and QAConv
take. Nothing is downloaded: pretrained weights come from local files.

Shapes: B images, D = embed_dim, N = num_y * num_x patch tokens, T = N + 1 tokens with the cls.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import weights_io

# Upstream's backbones (``*_patch16_224_TransReID``), by our names.
ARCHS = {
    # ViT-B/16; DeiT-B/16 is the same network with DeiT's checkpoint.
    "vit_base_patch16": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True),
    # DeiT-S/16 (TransReID) and ViT-S/16 (TransReID-SSL's vit_small): one network.
    "deit_small_patch16": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, qkv_bias=True),
    "vit_small_patch16": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, qkv_bias=True),
    # The TransReID repo's vit_small: the old timm ViT-S, whose qk scale is 768 ** -0.5 (not 96 ** -0.5).
    "vit_small_patch16_transreid": dict(embed_dim=768, depth=8, num_heads=8, mlp_ratio=3.0,
                                        qkv_bias=False, qk_scale=768 ** -0.5),
    # Ours, not upstream's: a tiny ViT for tests and demos.
    "vit_tiny_patch16": dict(embed_dim=192, depth=4, num_heads=3, mlp_ratio=4.0, qkv_bias=True),
}
# Upstream's factory names (``MODEL.TRANSFORMER_TYPE``) that mean one network.
UPSTREAM_ARCHS = {
    "vit_base_patch16_224_TransReID": "vit_base_patch16",
    "deit_base_patch16_224_TransReID": "vit_base_patch16",
    "deit_small_patch16_224_TransReID": "deit_small_patch16",
}
PATCH = 16
STEM_CHANNELS = 64
# Checkpoint keys upstream's load_param skips (ImageNet heads, DeiT's distillation token/head).
SKIPPED_KEY_PARTS = ("head", "dist", "pre_logits")


def arch_config(arch: str) -> dict:
    """The ``ARCHS`` entry of ``arch`` (our name or one of upstream's unambiguous names)."""
    if arch == "vit_small_patch16_224_TransReID":
        raise ValueError("arch 'vit_small_patch16_224_TransReID' names two networks upstream: "
                         "'vit_small_patch16_transreid' (TransReID: 768 wide, 8 deep) or "
                         "'vit_small_patch16' (TransReID-SSL: 384 wide, 12 deep)")
    name = UPSTREAM_ARCHS.get(arch, arch)
    if name not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)} (or {sorted(UPSTREAM_ARCHS)}), "
                         f"got {arch!r}")
    return dict(ARCHS[name])


def _pair(value, name: str) -> tuple[int, int]:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive integer or a pair of them, got {value!r}")
    return pair


def grid_size(img_size, stride, patch_size: int = PATCH) -> tuple[int, int]:
    """``(num_y, num_x)`` of the overlapping patch grid: ``(H - 16) // S_h + 1`` by ``(W - 16) // S_w + 1``."""
    (h, w), (sh, sw) = _pair(img_size, "img_size"), _pair(stride, "stride")
    if h < patch_size or w < patch_size:
        raise ValueError(f"img_size must be at least {patch_size}x{patch_size}, got {(h, w)}")
    return (h - patch_size) // sh + 1, (w - patch_size) // sw + 1


# ---------------------------------------------------------------------------------------------
# Memory-light fused pieces of a block.


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float):
    return torch.ops.aten.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


class _NormLinear(torch.autograd.Function):
    """``linear(layer_norm(x))`` keeping ``x`` for backward, not ``layer_norm(x)``."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, weight, bias):
        y, mean, rstd = _layer_norm(x, norm_weight, norm_bias, eps)
        ctx.eps, ctx.has_bias = eps, bias is not None
        ctx.save_for_backward(x, norm_weight, norm_bias, mean, rstd, weight)
        return F.linear(y, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, norm_weight, norm_bias, mean, rstd, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_weight = grad_bias = None
        if need[4]:
            y = _layer_norm(x, norm_weight, norm_bias, ctx.eps)[0]
            grad_weight = (_rows(grad).t() @ _rows(y).to(grad.dtype)).to(weight.dtype)
            del y
        if ctx.has_bias and need[5]:
            grad_bias = _rows(grad).sum(0).to(weight.dtype)
        grad_x = grad_nw = grad_nb = None
        if need[0] or need[1] or need[2]:
            grad_y = (grad @ weight.to(grad.dtype)).to(x.dtype)
            grad_x, grad_nw, grad_nb = torch.ops.aten.native_layer_norm_backward(
                grad_y, x, (x.shape[-1],), mean, rstd, norm_weight, norm_bias,
                [need[0], need[1], need[2]])
        return grad_x, grad_nw, grad_nb, None, grad_weight, grad_bias


class _NormMlp(torch.autograd.Function):
    """``fc2(gelu(fc1(layer_norm(x))))`` keeping ``x`` and the fc1 output for backward."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, w1, b1, w2, b2):
        y, mean, rstd = _layer_norm(x, norm_weight, norm_bias, eps)
        h = F.linear(y, w1, b1)
        del y
        ctx.eps = eps
        ctx.save_for_backward(x, norm_weight, norm_bias, mean, rstd, w1, h, w2)
        return F.linear(F.gelu(h), w2, b2)

    @staticmethod
    def backward(ctx, grad):
        x, norm_weight, norm_bias, mean, rstd, w1, h, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = _rows(grad)
        a = F.gelu(h)
        grad_w2 = (g.t() @ _rows(a).to(g.dtype)).to(w2.dtype) if need[6] else None
        grad_b2 = g.sum(0).to(w2.dtype) if need[7] else None
        del a
        grad_h = torch.ops.aten.gelu_backward((grad @ w2.to(grad.dtype)).to(h.dtype), h)
        gh = _rows(grad_h)
        grad_w1 = grad_b1 = None
        if need[4]:
            y = _layer_norm(x, norm_weight, norm_bias, ctx.eps)[0]
            grad_w1 = (gh.t() @ _rows(y).to(gh.dtype)).to(w1.dtype)
            del y
        if need[5]:
            grad_b1 = gh.sum(0).to(w1.dtype)
        grad_x = grad_nw = grad_nb = None
        if need[0] or need[1] or need[2]:
            grad_y = (grad_h @ w1.to(grad_h.dtype)).to(x.dtype)
            del grad_h, gh
            grad_x, grad_nw, grad_nb = torch.ops.aten.native_layer_norm_backward(
                grad_y, x, (x.shape[-1],), mean, rstd, norm_weight, norm_bias,
                [need[0], need[1], need[2]])
        return grad_x, grad_nw, grad_nb, None, grad_w1, grad_b1, grad_w2, grad_b2


def _grad_needed(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def norm_linear(x: Tensor, norm: nn.LayerNorm, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear(norm(x), weight, bias)``: ``[..., D] -> [..., out]``; backward recomputes norm(x)."""
    if _grad_needed(x, norm.weight, weight):
        return _NormLinear.apply(x, norm.weight, norm.bias, norm.eps, weight, bias)
    return F.linear(F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps), weight, bias)


def norm_mlp(x: Tensor, norm: nn.LayerNorm, mlp: "Mlp") -> Tensor:
    """``mlp(norm(x))`` for a dropout-free GELU MLP: ``[..., D] -> [..., D]``."""
    if _grad_needed(x, norm.weight, mlp.fc1.weight):
        return _NormMlp.apply(x, norm.weight, norm.bias, norm.eps, mlp.fc1.weight, mlp.fc1.bias,
                              mlp.fc2.weight, mlp.fc2.bias)
    return mlp(F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps))


# ---------------------------------------------------------------------------------------------
# Modules, in upstream's layout.


class DropPath(nn.Module):
    """Stochastic depth: zeroes whole samples of a residual branch with probability ``drop_prob``
    in training and rescales the kept ones (upstream's ``drop_path``, the same random draws)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)).floor_()
        return x.div(keep) * mask


class Mlp(nn.Module):
    """Linear(D -> hidden) -> GELU -> Linear(hidden -> D), dropout ``drop`` after each linear."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention on ``F.scaled_dot_product_attention``; upstream's ``qkv`` (one
    Linear D -> 3D, q/k/v then heads in its output) and ``proj``. ``qk_scale`` overrides
    ``head_dim ** -0.5``."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the width dim={dim}")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, t: Tensor, parts: int) -> Tensor:
        """``[B, T, parts * D] -> [parts, B, heads, T, head_dim]`` (a view of ``t``)."""
        b, n, c = t.shape
        return t.reshape(b, n, parts, self.num_heads, c // (parts * self.num_heads)).permute(2, 0, 3, 1, 4)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Heads ``[B, heads, Tq, d]`` x ``[B, heads, T, d]`` -> projected ``[B, Tq, D]``."""
        p = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)
        b, h, n, d = out.shape
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, h * d)))

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, D] -> [B, T, D]``."""
        q, k, v = self._heads(self.qkv(x), 3)
        return self.attend(q, k, v)

    def probs(self, x: Tensor) -> Tensor:
        """The attention matrix ``softmax(q k^T * scale)``, ``[B, heads, T, T]``, computed
        explicitly (for pictures, not used by forward)."""
        q, k, _ = self._heads(self.qkv(x), 3)
        return ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + DropPath(attn(norm1(x)))``, then
    ``x + DropPath(mlp(norm2(x)))``; ``[B, T, D] -> [B, T, D]``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def _mlp(self, x: Tensor) -> Tensor:
        if self.mlp.drop.p > 0.0 and self.training:  # dropout inside: the plain modules
            return self.mlp(self.norm2(x))
        return norm_mlp(x, self.norm2, self.mlp)

    def forward(self, x: Tensor) -> Tensor:
        qkv = norm_linear(x, self.norm1, self.attn.qkv.weight, self.attn.qkv.bias)
        x = x + self.drop_path(self.attn.attend(*self.attn._heads(qkv, 3)))
        return x + self.drop_path(self._mlp(x))

    def forward_cls(self, x: Tensor) -> Tensor:
        """The block's output at the cls token only, ``[B, T, D] -> [B, 1, D]``: equal to
        ``forward(x)[:, :1]``, with the query, projection and MLP run on one token."""
        d = x.shape[-1]
        weight, bias = self.attn.qkv.weight, self.attn.qkv.bias
        cls = x[:, :1]
        q = norm_linear(cls, self.norm1, weight[:d], None if bias is None else bias[:d])
        kv = norm_linear(x, self.norm1, weight[d:], None if bias is None else bias[d:])
        k, v = self.attn._heads(kv, 2)
        cls = cls + self.drop_path(self.attn.attend(self.attn._heads(q, 1)[0], k, v))
        return cls + self.drop_path(self._mlp(cls))


class IBN(nn.Module):
    """Instance-batch normalisation: the first ``planes // 2`` channels through
    ``InstanceNorm2d(affine=True)`` (``IN``), the rest through ``BatchNorm2d`` (``BN``)."""

    def __init__(self, planes: int):
        super().__init__()
        self.half = planes // 2
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: Tensor) -> Tensor:
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat((self.IN(a.contiguous()), self.BN(b.contiguous())), dim=1)


class PatchEmbed(nn.Module):
    """``[B, C, H, W] -> [B, N, D]`` patch tokens, row-major over the ``num_y x num_x`` grid.

    Default (TransReID's ``PatchEmbed_overlap``): one ``Conv2d(C, D, 16, stride)``, so patches
    overlap when the stride is below 16. ``stem_conv`` (TransReID-SSL's ICS): conv7x7/2 -> IBN ->
    ReLU, conv3x3 -> IBN -> ReLU, conv3x3 -> BN -> ReLU (64 channels, ``conv``), then
    ``proj = Conv2d(64, D, 8, stride=8)``; only consistent with stride 16.
    """

    def __init__(self, img_size=(256, 128), stride=16, in_chans: int = 3, embed_dim: int = 768,
                 stem_conv: bool = False):
        super().__init__()
        self.img_size = _pair(img_size, "img_size")
        self.num_y, self.num_x = grid_size(self.img_size, stride)
        self.num_patches = self.num_y * self.num_x
        self.stem_conv = stem_conv
        if stem_conv:
            if _pair(stride, "stride") != (PATCH, PATCH):
                raise ValueError(f"stem_conv (ICS) downsamples by 16 exactly: stride must be 16, got {stride!r}")
            c = STEM_CHANNELS
            self.conv = nn.Sequential(
                nn.Conv2d(in_chans, c, kernel_size=7, stride=2, padding=3, bias=False), IBN(c), nn.ReLU(inplace=True),
                nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, bias=False), IBN(c), nn.ReLU(inplace=True),
                nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, bias=False), nn.BatchNorm2d(c),
                nn.ReLU(inplace=True))
            self.proj = nn.Conv2d(c, embed_dim, kernel_size=PATCH // 2, stride=PATCH // 2)
            h, w = self.img_size
            stem_grid = ((h + 1) // 2 // (PATCH // 2), (w + 1) // 2 // (PATCH // 2))
            if stem_grid != (self.num_y, self.num_x):
                raise ValueError(f"stem_conv gives a {stem_grid} grid for img_size {self.img_size}, "
                                 f"not the {(self.num_y, self.num_x)} of stride 16: use a multiple of 16")
        else:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=PATCH, stride=_pair(stride, "stride"))
            # Upstream's re-initialisation (normally overwritten by pretrained weights).
            fan_out = PATCH * PATCH * embed_dim
            nn.init.normal_(self.proj.weight, 0.0, math.sqrt(2.0 / fan_out))

    def forward(self, x: Tensor) -> Tensor:
        if self.stem_conv:
            x = self.conv(x)
        return self.proj(x).flatten(2).transpose(1, 2)


class AttentionMaps(NamedTuple):
    """``cls_attention [B, heads, N]``: the last layer's attention of the cls token over the
    patches; ``rollout [B, N]``: attention rollout (Abnar & Zuidema 2020) of the cls token.
    ``.view(B, ..., num_y, num_x)`` gives pictures."""

    cls_attention: Tensor
    rollout: Tensor


class VisionTransformer(nn.Module):
    """Upstream's ``TransReID`` backbone.

    Args:
        img_size, stride: input ``(H, W)`` and patch stride (an int or a pair); the grid is
            ``num_y = (H - 16) // S_h + 1`` by ``num_x = (W - 16) // S_w + 1``.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_scale: the network (see ``ARCHS``).
        camera_num, view_num: SIE counts (0 = off). An embedding ``sie_embed`` exists when a count
            is above 1 (upstream's rule): ``[C*V, 1, D]`` for both, ``[C, 1, D]`` or ``[V, 1, D]``
            for one; ``sie_coe`` times row ``cam * V + view`` (``cam`` or ``view`` alone) is added
            once to every token, cls included.
        drop_rate, attn_drop_rate, drop_path_rate: dropout, attention dropout, and stochastic
            depth rising linearly from 0 to ``drop_path_rate`` over the blocks.
        local_feature: JPM mode: forward runs the first ``depth - 1`` blocks and returns all tokens.
        gem_pool: TransReID-SSL's GeM: the global feature is ``cls + GeM_3(patch tokens)``.
        stem_conv: TransReID-SSL's ICS patch embedding (see ``PatchEmbed``).
        num_classes: upstream's unused ImageNet classifier ``fc`` (kept for its state_dict).

    ``forward(x [B, 3, H, W], cam_label [B], view_label [B])``: ``[B, D]`` global feature (the
    final-normed cls token), or ``[B, T, D]`` tokens with ``local_feature``.
    """

    def __init__(self, img_size=(256, 128), stride_size=16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, qk_scale: Optional[float] = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, camera_num: int = 0, view_num: int = 0,
                 drop_path_rate: float = 0.0, local_feature: bool = False, sie_coe: float = 1.0,
                 gem_pool: bool = False, stem_conv: bool = False):
        super().__init__()
        for name, value in (("depth", depth), ("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("camera_num", camera_num), ("view_num", view_num)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        self.num_features = self.embed_dim = self.in_planes = embed_dim
        self.num_heads, self.depth, self.in_chans = num_heads, depth, in_chans
        self.local_feature, self.gem_pool = local_feature, gem_pool
        self.patch_embed = PatchEmbed(img_size, stride_size, in_chans, embed_dim, stem_conv)
        self.img_size = self.patch_embed.img_size
        self.num_y, self.num_x = self.patch_embed.num_y, self.patch_embed.num_x
        self.num_patches = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        self.cam_num, self.view_num, self.sie_coe = camera_num, view_num, sie_coe
        rows = (camera_num * view_num if camera_num > 1 and view_num > 1
                else camera_num if camera_num > 1 else view_num if view_num > 1 else 0)
        if rows:
            self.sie_embed = nn.Parameter(torch.zeros(rows, 1, embed_dim))
            nn.init.trunc_normal_(self.sie_embed, std=0.02)
        else:
            self.register_parameter("sie_embed", None)

        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, dpr[i])
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_weights)

    # -- inputs ---------------------------------------------------------------------------------

    def _sie(self, cam_label, view_label, device) -> Optional[Tensor]:
        """The ``[B, 1, D]`` SIE rows of a batch, or None without SIE."""
        if self.sie_embed is None:
            return None
        for name, label, count in (("cam_label", cam_label, self.cam_num), ("view_label", view_label, self.view_num)):
            if count > 0 and label is None:
                raise ValueError(f"{name} is required: the model has SIE with camera_num={self.cam_num}, "
                                 f"view_num={self.view_num}")
        if self.cam_num > 0 and self.view_num > 0:
            cam, view = torch.as_tensor(cam_label, device=device), torch.as_tensor(view_label, device=device)
            index = cam * self.view_num + view
        else:
            index = torch.as_tensor(cam_label if self.cam_num > 0 else view_label, device=device)
        return self.sie_embed[index.long()]

    def embed(self, x: Tensor, cam_label=None, view_label=None) -> Tensor:
        """Images ``[B, C, H, W]`` -> input tokens ``[B, T, D]``: ``[cls; patches] + pos_embed
        + sie_coe * SIE``."""
        expected = (self.in_chans, *self.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must be [B, {', '.join(map(str, expected))}] images (img_size "
                             f"{self.img_size}), got shape {tuple(x.shape)}")
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), tokens), dim=1) + self.pos_embed
        sie = self._sie(cam_label, view_label, x.device)
        if sie is not None:
            tokens = tokens + self.sie_coe * sie
        return self.pos_drop(tokens)

    # -- outputs --------------------------------------------------------------------------------

    def forward_features(self, x: Tensor, cam_label=None, view_label=None) -> Tensor:
        tokens = self.embed(x, cam_label, view_label)
        for blk in self.blocks[:-1]:
            tokens = blk(tokens)
        if self.local_feature:
            return tokens
        last = self.blocks[-1]
        if self.gem_pool:
            tokens = self.norm(last(tokens))
            return tokens[:, 0] + gem(tokens[:, 1:])
        return self.norm(last.forward_cls(tokens))[:, 0]

    def forward(self, x: Tensor, cam_label=None, view_label=None) -> Tensor:
        return self.forward_features(x, cam_label, view_label)

    def forward_levels(self, x: Tensor, cam_label=None, view_label=None, levels: int = 1) -> list:
        """The final-normed tokens ``[B, T, D]`` after each of the last ``levels`` blocks (all
        ``depth`` blocks run, whatever ``local_feature`` says)."""
        if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= self.depth:
            raise ValueError(f"levels must be an integer in [1, depth={self.depth}], got {levels!r}")
        tokens = self.embed(x, cam_label, view_label)
        out = []
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens)
            if i >= self.depth - levels:
                out.append(self.norm(tokens))
        return out

    def attention_maps(self, x: Tensor, cam_label=None, view_label=None,
                       last_block: Optional[Block] = None) -> AttentionMaps:
        """Attention pictures of images ``x`` (see ``AttentionMaps``), computed explicitly.
        ``last_block`` replaces ``blocks[-1]`` (JPM's global branch ``b1[0]``)."""
        blocks = list(self.blocks[:-1]) + [last_block if last_block is not None else self.blocks[-1]]
        tokens = self.embed(x, cam_label, view_label)
        n = tokens.shape[1]
        eye = torch.eye(n, dtype=tokens.dtype, device=tokens.device)
        rollout = eye.expand(tokens.shape[0], n, n)
        for blk in blocks:
            attn = blk.attn.probs(blk.norm1(tokens))
            # Residual connections: half the flow stays on each token (rows still sum to 1).
            rollout = (0.5 * attn.mean(dim=1) + 0.5 * eye) @ rollout
            tokens = blk(tokens)
        return AttentionMaps(attn[:, :, 0, 1:], rollout[:, 0, 1:])

    def load_param(self, model_path: str, hw_ratio: int = 1) -> dict:
        """Upstream's name for ``load_pretrained(self, model_path, hw_ratio)``."""
        return load_pretrained(self, model_path, hw_ratio)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


def gem(tokens: Tensor, p: float = 3.0, eps: float = 1e-6) -> Tensor:
    """Generalised mean over tokens, ``[B, N, D] -> [B, D]``: ``mean(clamp(x, eps)^p)^(1/p)``."""
    return tokens.clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


def build_vit(arch: str = "vit_base_patch16", **kwargs) -> VisionTransformer:
    """``VisionTransformer`` of a named architecture (``ARCHS``); ``kwargs`` as the class takes."""
    return VisionTransformer(**{**arch_config(arch), **kwargs})


# ---------------------------------------------------------------------------------------------
# Pretrained weights.


def _patch_grid(posemb: Tensor, grid: tuple) -> Tensor:
    """The patch entries of ``posemb`` ``[1, 1 + gy * gx, D]`` as an image ``[1, D, gy, gx]``."""
    return posemb[:, 1:].reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)


def _with_cls(posemb: Tensor, patch_grid: Tensor) -> Tensor:
    """``posemb``'s cls entry followed by ``patch_grid`` ``[1, D, gy, gx]``: ``[1, 1 + gy * gx, D]``."""
    return torch.cat((posemb[:, :1], patch_grid.flatten(2).transpose(1, 2)), dim=1)


def resize_pos_embed(posemb: Tensor, num_y: int, num_x: int, hw_ratio: int = 1) -> Tensor:
    """Upstream's ``resize_pos_embed`` (loading weights of another grid): ``[1, 1 + n, D] ->
    [1, 1 + num_y * num_x, D]``. The cls entry is kept; the grid, taken as
    ``gs_h = int(sqrt(n * hw_ratio))`` by ``gs_h // hw_ratio`` (square for ``hw_ratio`` 1, 16x8
    for a 256x128 DINO checkpoint with ``hw_ratio`` 2), is resized bilinearly
    (``align_corners=False``)."""
    if posemb.dim() != 3 or posemb.shape[0] != 1:
        raise ValueError(f"posemb must be [1, 1 + n, D], got shape {tuple(posemb.shape)}")
    n = posemb.shape[1] - 1
    gs_h = int(math.sqrt(n * hw_ratio))
    gs_w = gs_h // hw_ratio
    if gs_h * gs_w != n:
        raise ValueError(f"a position embedding of {n} patches is not a grid of height/width "
                         f"ratio hw_ratio={hw_ratio} (taken as {gs_h}x{gs_w})")
    grid = F.interpolate(_patch_grid(posemb, (gs_h, gs_w)), size=(num_y, num_x), mode="bilinear",
                         align_corners=False)
    return _with_cls(posemb, grid)


class MultiResolutionViT(VisionTransformer):
    """The ViT of DINO's multi-crop: an image of another size than ``img_size`` (a local crop,
    128 x 64 for a 256 x 128 model) gets the position embedding resized to its grid, bicubically
    with upstream's scale factor ``(n + 0.1) / N`` per axis (DINO's ``vision_transformer.py``,
    ``interpolate_pos_encoding``). At ``img_size`` it is exactly :class:`VisionTransformer`,
    whose parameters and names it has."""

    def embed(self, x: Tensor, cam_label=None, view_label=None) -> Tensor:
        """Images ``[B, 3, h, w]`` (any size the patch embedding takes) -> tokens ``[B, 1 + n, D]``."""
        if x.dim() != 4 or tuple(x.shape[-2:]) == tuple(self.img_size):
            return super().embed(x, cam_label, view_label)  # (which also names a bad shape)
        embedding = self.patch_embed
        grid = embedding.proj(embedding.conv(x) if embedding.stem_conv else x)  # [B, D, gy, gx]
        tokens = grid.flatten(2).transpose(1, 2)
        tokens = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), tokens), dim=1)
        tokens = tokens + self.resized_pos_embed(*grid.shape[-2:])
        sie = self._sie(cam_label, view_label, x.device)
        if sie is not None:
            tokens = tokens + self.sie_coe * sie
        return self.pos_drop(tokens)

    def resized_pos_embed(self, num_y: int, num_x: int) -> Tensor:
        """``pos_embed`` ``[1, 1 + N, D]`` for a ``num_y x num_x`` grid: ``[1, 1 + num_y * num_x, D]``."""
        # The 0.1 keeps floor(N * scale) at n despite rounding (facebookresearch/dino#8).
        scale = ((num_y + 0.1) / self.num_y, (num_x + 0.1) / self.num_x)
        grid = F.interpolate(_patch_grid(self.pos_embed, (self.num_y, self.num_x)), scale_factor=scale,
                             mode="bicubic")
        if tuple(grid.shape[-2:]) != (num_y, num_x):
            raise ValueError(f"position embedding resized to {tuple(grid.shape[-2:])}, not the "
                             f"{(num_y, num_x)} grid of the input")
        return _with_cls(self.pos_embed, grid)


def read_pretrained(path: str) -> dict:
    """A checkpoint file's state_dict, loaded with ``weights_only=True``: a bare state_dict, or
    under ``'model'`` / ``'state_dict'``; a DINO checkpoint's ``'teacher'`` with ``module.`` and
    ``backbone.`` stripped and its projection head left out."""
    if not os.path.isfile(path):
        raise ValueError(f"pretrained weights {path!r}: no such file")
    try:
        # DINO checkpoints carry their argparse.Namespace of options: plain data, allowed.
        ckpt = weights_io.load(path, safe_globals=weights_io.PLAIN_DATA)
    except weights_io.WeightsFileError as error:  # the message says which file and why
        raise ValueError(f"{path}: cannot be read as a weights-only checkpoint ({error.problem})") from None
    ckpt = weights_io.unwrap(ckpt)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("teacher"), dict):
        ckpt = weights_io.select(weights_io.unwrap(ckpt, ("teacher",)), "backbone.")
    if not weights_io.is_state_dict(ckpt):
        raise ValueError(f"{path}: not a state_dict (a mapping of names to tensors)")
    return ckpt


def load_pretrained(model: VisionTransformer, path: str, hw_ratio: int = 1) -> dict:
    """Load ImageNet ViT/DeiT (timm / original layout), DeiT distilled or DINO weights from a local
    file into ``model`` (upstream's ``load_param``, strict).

    Skipped, as upstream: keys containing ``head``, ``dist`` or ``pre_logits`` (DeiT distilled:
    the distillation entry of ``pos_embed`` is dropped too). ``pos_embed`` is resized to the
    model's grid (``resize_pos_embed`` with ``hw_ratio``). ``fc.*`` (the unused ImageNet classifier)
    and ``sie_embed`` may be absent; any other missing, unexpected or misshapen key raises a
    ValueError naming the file and the keys. Returns ``{"loaded": [...], "skipped": [...]}``.
    """
    state = read_pretrained(path)
    distilled = "dist_token" in state or "distilled" in os.path.basename(path)
    own = model.state_dict()
    loaded, skipped = {}, []
    for key, value in state.items():
        if any(part in key for part in SKIPPED_KEY_PARTS):
            skipped.append(key)
            continue
        if key == "patch_embed.proj.weight" and value.dim() < 4 and key in own:
            value = value.reshape(own[key].shape[0], -1, *own[key].shape[2:])  # pre-conv timm files
        elif key == "pos_embed" and value.shape != own["pos_embed"].shape:
            if distilled:
                value = torch.cat([value[:, :1], value[:, 2:]], dim=1)
            value = resize_pos_embed(value, model.num_y, model.num_x, hw_ratio)
        if key.startswith("fc.") and (key not in own or own[key].shape != value.shape):
            skipped.append(key)  # a classifier of another size: unused anyway
            continue
        loaded[key] = value
    weights_io.check_fits(path, own, loaded, optional=("fc.", "sie_embed"))
    with torch.no_grad():
        for key, value in loaded.items():
            own[key].copy_(value)
    return {"loaded": sorted(loaded), "skipped": sorted(skipped)}


# ---------------------------------------------------------------------------------------------
# Patch-token maps for the matchers.

MATCHERS = ("transmatcher", "qaconv")


class ViTMatchingFeatures(nn.Module):
    """A ViT as the feature model of the fused matchers: the final-normed patch tokens of the
    last ``levels`` blocks, as ``num_y x num_x`` maps.

    - ``matcher="transmatcher"``: ``[B, num_y, num_x, levels * D]`` channels-last, one level per
      decoder layer (``TransMatcher(seq_len, d_model=num_features, num_decoder_layers=levels)``).
    - ``matcher="qaconv"``: ``[B, levels * D, num_y, num_x]``, L2-normalised over channels
      (``QAConv(num_features, height, width)``).

    ``num_features`` (D for TransMatcher, ``levels * D`` for QAConv), ``height``/``width`` (the
    grid) and ``seq_len`` size the matcher. SIE (``camera_num``/``view_num``) is optional; with it
    ``forward(x, cam_label, view_label)`` needs the labels. ``base`` is a ``VisionTransformer`` in
    upstream's layout, so a TransReID checkpoint's ``base.*`` weights fit it.
    """

    def __init__(self, arch: str = "vit_base_patch16", img_size=(256, 128), stride=16, levels: int = 1,
                 matcher: str = "transmatcher", camera_num: int = 0, view_num: int = 0,
                 sie_coe: float = 3.0, drop_path: float = 0.1, pretrained: Optional[str] = None,
                 stem_conv: bool = False, pretrain_hw_ratio: int = 1):
        super().__init__()
        if matcher not in MATCHERS:
            raise ValueError(f"matcher must be one of {MATCHERS}, got {matcher!r}")
        self.base = build_vit(arch, img_size=img_size, stride_size=stride, camera_num=camera_num,
                              view_num=view_num, sie_coe=sie_coe, drop_path_rate=drop_path,
                              stem_conv=stem_conv)
        if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= self.base.depth:
            raise ValueError(f"levels must be an integer in [1, depth={self.base.depth}], got {levels!r}")
        if pretrained is not None:
            load_pretrained(self.base, pretrained, pretrain_hw_ratio)
        self.levels, self.matcher = levels, matcher
        self.height, self.width = self.base.num_y, self.base.num_x
        self.seq_len = self.height * self.width
        d = self.base.embed_dim
        self.num_features = d if matcher == "transmatcher" else levels * d

    def forward(self, x: Tensor, cam_label=None, view_label=None) -> Tensor:
        levels = self.base.forward_levels(x, cam_label, view_label, self.levels)
        b = x.shape[0]
        maps = torch.cat([t[:, 1:] for t in levels], dim=-1).reshape(b, self.height, self.width, -1)
        if self.matcher == "transmatcher":
            return maps
        return F.normalize(maps.permute(0, 3, 1, 2), dim=1)


__all__ = ["ARCHS", "UPSTREAM_ARCHS", "VisionTransformer", "ViTMatchingFeatures", "AttentionMaps",
           "Attention", "Block", "PatchEmbed", "IBN", "DropPath", "Mlp", "arch_config", "build_vit",
           "grid_size", "load_pretrained", "read_pretrained", "resize_pos_embed", "MultiResolutionViT", "gem",
           "norm_linear", "norm_mlp"]
