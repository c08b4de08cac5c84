"""Upstream TransReID as upstream computes it: the reference of the tests and the benchmark.

A compact re-implementation of damo-cv/TransReID ``model/backbones/vit_pytorch.py`` (class
``TransReID``, ``PatchEmbed_overlap``, ``resize_pos_embed``, ``load_param``) and
``model/make_model.py`` (``shuffle_unit``, ``build_transformer``, ``build_transformer_local``),
with TransReID-SSL's additions (ICS stem with IBN, GeM, DINO teachers, ``hw_ratio``). It keeps
upstream's module names, its explicit ``softmax(q k^T * scale) v`` attention, full-sequence blocks,
and JPM's four sequential ``b2`` calls on ``torch.cat`` groups. Config keys become keyword
arguments; ID-loss variants other than softmax, ``print``s and hybrid backbones are left out.
Independent of ``transmatcher_fast``.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = {  # the factories' hyper-parameters
    "vit_base_patch16": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, qkv_bias=True),
    "deit_small_patch16": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, qkv_bias=True),
    "vit_small_patch16": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, qkv_bias=True),
    "vit_small_patch16_transreid": dict(embed_dim=768, depth=8, num_heads=8, mlp_ratio=3.0,
                                        qkv_bias=False, qk_scale=768 ** -0.5),
    "vit_tiny_patch16": dict(embed_dim=192, depth=4, num_heads=3, mlp_ratio=4, qkv_bias=True),
}


def to_2tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def drop_path(x, drop_prob=0.0, training=False):
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    random_tensor.floor_()
    return x.div(keep_prob) * random_tensor


class DropPath(nn.Module):
    def __init__(self, drop_prob=None):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0,
                 attn_drop=0.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class IBN(nn.Module):
    def __init__(self, planes):
        super().__init__()
        self.half = int(planes / 2)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x):
        split = torch.split(x, self.half, 1)
        return torch.cat((self.IN(split[0].contiguous()), self.BN(split[1].contiguous())), 1)


class PatchEmbed_overlap(nn.Module):
    """TransReID's overlapping patches; with ``stem_conv`` TransReID-SSL's ``PatchEmbed``."""

    def __init__(self, img_size=224, patch_size=16, stride_size=16, in_chans=3, embed_dim=768, stem_conv=False):
        super().__init__()
        img_size, patch_size, stride = to_2tuple(img_size), to_2tuple(patch_size), to_2tuple(stride_size)
        self.num_x = (img_size[1] - patch_size[1]) // stride[1] + 1
        self.num_y = (img_size[0] - patch_size[0]) // stride[0] + 1
        self.num_patches = self.num_x * self.num_y
        self.img_size = img_size
        self.stem_conv = stem_conv
        if stem_conv:
            hidden_dim = 64
            stride_size = patch_size = patch_size[0] // 2
            self.conv = nn.Sequential(
                nn.Conv2d(in_chans, hidden_dim, kernel_size=7, stride=2, padding=3, bias=False),
                IBN(hidden_dim), nn.ReLU(inplace=True),
                nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, stride=1, padding=1, bias=False),
                IBN(hidden_dim), nn.ReLU(inplace=True),
                nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(hidden_dim), nn.ReLU(inplace=True))
            in_chans = hidden_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride_size)
        if not stem_conv:  # TransReID re-initialises its patch conv; the SSL copy does not
            n = self.proj.kernel_size[0] * self.proj.kernel_size[1] * self.proj.out_channels
            self.proj.weight.data.normal_(0, math.sqrt(2.0 / n))

    def forward(self, x):
        B, C, H, W = x.shape
        assert H == self.img_size[0] and W == self.img_size[1]
        if self.stem_conv:
            x = self.conv(x)
        return self.proj(x).flatten(2).transpose(1, 2)


class TransReIDBackbone(nn.Module):
    """Upstream's ``TransReID`` (backbone) class."""

    def __init__(self, img_size=224, patch_size=16, stride_size=16, in_chans=3, num_classes=1000, embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop_rate=0.0,
                 attn_drop_rate=0.0, camera=0, view=0, drop_path_rate=0.0, local_feature=False,
                 sie_xishu=1.0, gem_pool=False, stem_conv=False):
        super().__init__()
        self.num_features = self.embed_dim = self.in_planes = embed_dim
        self.local_feature = local_feature
        self.patch_embed = PatchEmbed_overlap(img_size, patch_size, stride_size, in_chans, embed_dim, stem_conv)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.cam_num, self.view_num, self.sie_xishu = camera, view, sie_xishu
        self.gem_pool = gem_pool
        if camera > 1 and view > 1:
            self.sie_embed = nn.Parameter(torch.zeros(camera * view, 1, embed_dim))
            nn.init.trunc_normal_(self.sie_embed, std=0.02)
        elif camera > 1:
            self.sie_embed = nn.Parameter(torch.zeros(camera, 1, embed_dim))
            nn.init.trunc_normal_(self.sie_embed, std=0.02)
        elif view > 1:
            self.sie_embed = nn.Parameter(torch.zeros(view, 1, embed_dim))
            nn.init.trunc_normal_(self.sie_embed, std=0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]  # (meta-safe)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, dpr[i])
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward_features(self, x, camera_id, view_id):
        B = x.shape[0]
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        if self.cam_num > 0 and self.view_num > 0:
            x = x + self.pos_embed + self.sie_xishu * self.sie_embed[camera_id * self.view_num + view_id]
        elif self.cam_num > 0:
            x = x + self.pos_embed + self.sie_xishu * self.sie_embed[camera_id]
        elif self.view_num > 0:
            x = x + self.pos_embed + self.sie_xishu * self.sie_embed[view_id]
        else:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        if self.local_feature:
            for blk in self.blocks[:-1]:
                x = blk(x)
            return x
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        if self.gem_pool:  # SSL: GeneralizedMeanPooling(3) over the patch tokens
            gf = F.adaptive_avg_pool1d(x[:, 1:].permute(0, 2, 1).clamp(min=1e-6).pow(3.0), 1).pow(1.0 / 3.0)
            return x[:, 0] + gf.squeeze(-1)  # upstream's .squeeze() also drops a batch of 1
        return x[:, 0]

    def forward(self, x, cam_label=None, view_label=None):
        return self.forward_features(x, cam_label, view_label)

    def load_param(self, model_path, hw_ratio=1):
        """SSL's ``load_param`` (a superset of TransReID's), quiet: returns the keys it could not copy."""
        with torch.serialization.safe_globals([argparse.Namespace]):  # (upstream: a full unpickle)
            param_dict = torch.load(model_path, map_location="cpu", weights_only=True)
        if "model" in param_dict:
            param_dict = param_dict["model"]
        if "state_dict" in param_dict:
            param_dict = param_dict["state_dict"]
        if "teacher" in param_dict:
            newmodel = {}
            for k, v in param_dict["teacher"].items():
                if k.startswith("module."):
                    k = k.replace("module.", "")
                if not k.startswith("backbone."):
                    continue
                newmodel[k.replace("backbone.", "")] = v
            param_dict = newmodel
        errors = []
        for k, v in param_dict.items():
            if "head" in k or "dist" in k or "pre_logits" in k:
                continue
            if "patch_embed.proj.weight" in k and len(v.shape) < 4:
                out_chans, _, kh, kw = self.patch_embed.proj.weight.shape
                v = v.reshape(out_chans, -1, kh, kw)
            elif k == "pos_embed" and v.shape != self.pos_embed.shape:
                if "distilled" in model_path:
                    v = torch.cat([v[:, 0:1], v[:, 2:]], dim=1)
                v = resize_pos_embed(v, self.pos_embed, self.patch_embed.num_y, self.patch_embed.num_x, hw_ratio)
            try:
                self.state_dict()[k].copy_(v)
            except Exception:  # upstream prints and goes on
                errors.append(k)
        return errors


def resize_pos_embed(posemb, posemb_new, hight, width, hw_ratio=1):
    posemb_token, posemb_grid = posemb[:, :1], posemb[0, 1:]
    gs_old_h = int(math.sqrt(len(posemb_grid) * hw_ratio))
    gs_old_w = gs_old_h // hw_ratio
    posemb_grid = posemb_grid.reshape(1, gs_old_h, gs_old_w, -1).permute(0, 3, 1, 2)
    posemb_grid = F.interpolate(posemb_grid, size=(hight, width), mode="bilinear")
    posemb_grid = posemb_grid.permute(0, 2, 3, 1).reshape(1, hight * width, -1)
    return torch.cat([posemb_token, posemb_grid], dim=1)


def backbone(arch, img_size=(256, 128), stride_size=16, drop_path_rate=0.1, camera=0, view=0,
             local_feature=False, sie_xishu=1.5, **kwargs):
    return TransReIDBackbone(img_size=img_size, patch_size=16, stride_size=stride_size, camera=camera, view=view,
                             drop_path_rate=drop_path_rate, local_feature=local_feature,
                             sie_xishu=sie_xishu, **ARCHS[arch], **kwargs)


def shuffle_unit(features, shift, group, begin=1):
    batchsize = features.size(0)
    dim = features.size(-1)
    feature_random = torch.cat([features[:, begin - 1 + shift:], features[:, begin:begin - 1 + shift]], dim=1)
    x = feature_random
    try:
        x = x.view(batchsize, group, -1, dim)
    except RuntimeError:
        x = torch.cat([x, x[:, -2:-1, :]], dim=1)
        x = x.view(batchsize, group, -1, dim)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, -1, dim)


def weights_init_kaiming(m):
    classname = m.__class__.__name__
    if classname.find("Linear") != -1:
        nn.init.kaiming_normal_(m.weight, a=0, mode="fan_out")
        nn.init.constant_(m.bias, 0.0)
    elif classname.find("Conv") != -1:
        nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
        if m.bias is not None:
            nn.init.constant_(m.bias, 0.0)
    elif classname.find("BatchNorm") != -1:
        if m.affine:
            nn.init.constant_(m.weight, 1.0)
            nn.init.constant_(m.bias, 0.0)


def weights_init_classifier(m):
    if m.__class__.__name__.find("Linear") != -1:
        nn.init.normal_(m.weight, std=0.001)
        if m.bias:
            nn.init.constant_(m.bias, 0.0)


class build_transformer(nn.Module):
    def __init__(self, num_classes, camera_num, view_num, arch="vit_base_patch16", img_size=(256, 128), stride=16,
                 sie_camera=False, sie_view=False, sie_coe=3.0, drop_path=0.1, neck_feat="before",
                 pretrained=None, pretrain_hw_ratio=1, stem_conv=False, gem_pooling=False):
        super().__init__()
        self.neck_feat = neck_feat
        self.base = backbone(arch, img_size=img_size, sie_xishu=sie_coe, camera=camera_num if sie_camera else 0,
                             view=view_num if sie_view else 0, stride_size=stride, drop_path_rate=drop_path,
                             gem_pool=gem_pooling, stem_conv=stem_conv)
        self.in_planes = self.base.in_planes
        if pretrained is not None:
            self.base.load_param(pretrained, hw_ratio=pretrain_hw_ratio)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.in_planes, self.num_classes, bias=False)
        self.classifier.apply(weights_init_classifier)
        self.bottleneck = nn.BatchNorm1d(self.in_planes)
        self.bottleneck.bias.requires_grad_(False)
        self.bottleneck.apply(weights_init_kaiming)

    def forward(self, x, label=None, cam_label=None, view_label=None):
        global_feat = self.base(x, cam_label=cam_label, view_label=view_label)
        feat = self.bottleneck(global_feat)
        if self.training:
            return self.classifier(feat), global_feat
        return feat if self.neck_feat == "after" else global_feat


class build_transformer_local(nn.Module):
    def __init__(self, num_classes, camera_num, view_num, arch="vit_base_patch16", img_size=(256, 128), stride=16,
                 sie_camera=False, sie_view=False, sie_coe=3.0, drop_path=0.1, neck_feat="before",
                 pretrained=None, pretrain_hw_ratio=1, stem_conv=False, shift_num=5, shuffle_groups=2,
                 divide_length=4, rearrange=True):
        super().__init__()
        self.neck_feat = neck_feat
        self.base = backbone(arch, img_size=img_size, sie_xishu=sie_coe, local_feature=True,
                             camera=camera_num if sie_camera else 0, view=view_num if sie_view else 0,
                             stride_size=stride, drop_path_rate=drop_path, stem_conv=stem_conv)
        self.in_planes = self.base.in_planes
        if pretrained is not None:
            self.base.load_param(pretrained, hw_ratio=pretrain_hw_ratio)
        block = self.base.blocks[-1]
        layer_norm = self.base.norm
        self.b1 = nn.Sequential(copy.deepcopy(block), copy.deepcopy(layer_norm))
        self.b2 = nn.Sequential(copy.deepcopy(block), copy.deepcopy(layer_norm))
        self.num_classes = num_classes
        for name in ("classifier", "classifier_1", "classifier_2", "classifier_3", "classifier_4"):
            setattr(self, name, nn.Linear(self.in_planes, self.num_classes, bias=False))
            getattr(self, name).apply(weights_init_classifier)
        for name in ("bottleneck", "bottleneck_1", "bottleneck_2", "bottleneck_3", "bottleneck_4"):
            setattr(self, name, nn.BatchNorm1d(self.in_planes))
            getattr(self, name).bias.requires_grad_(False)
            getattr(self, name).apply(weights_init_kaiming)
        self.shuffle_groups, self.shift_num, self.divide_length = shuffle_groups, shift_num, divide_length
        self.rearrange = rearrange

    def forward(self, x, label=None, cam_label=None, view_label=None):
        features = self.base(x, cam_label=cam_label, view_label=view_label)
        b1_feat = self.b1(features)
        global_feat = b1_feat[:, 0]
        feature_length = features.size(1) - 1
        patch_length = feature_length // self.divide_length
        token = features[:, 0:1]
        if self.rearrange:
            x = shuffle_unit(features, self.shift_num, self.shuffle_groups)
        else:
            x = features[:, 1:]
        local_feat_1 = self.b2(torch.cat((token, x[:, :patch_length]), dim=1))[:, 0]
        local_feat_2 = self.b2(torch.cat((token, x[:, patch_length:patch_length * 2]), dim=1))[:, 0]
        local_feat_3 = self.b2(torch.cat((token, x[:, patch_length * 2:patch_length * 3]), dim=1))[:, 0]
        local_feat_4 = self.b2(torch.cat((token, x[:, patch_length * 3:patch_length * 4]), dim=1))[:, 0]
        feat = self.bottleneck(global_feat)
        local_feat_1_bn = self.bottleneck_1(local_feat_1)
        local_feat_2_bn = self.bottleneck_2(local_feat_2)
        local_feat_3_bn = self.bottleneck_3(local_feat_3)
        local_feat_4_bn = self.bottleneck_4(local_feat_4)
        if self.training:
            cls_score = self.classifier(feat)
            cls_score_1 = self.classifier_1(local_feat_1_bn)
            cls_score_2 = self.classifier_2(local_feat_2_bn)
            cls_score_3 = self.classifier_3(local_feat_3_bn)
            cls_score_4 = self.classifier_4(local_feat_4_bn)
            return ([cls_score, cls_score_1, cls_score_2, cls_score_3, cls_score_4],
                    [global_feat, local_feat_1, local_feat_2, local_feat_3, local_feat_4])
        if self.neck_feat == "after":
            return torch.cat([feat, local_feat_1_bn / 4, local_feat_2_bn / 4, local_feat_3_bn / 4,
                              local_feat_4_bn / 4], dim=1)
        return torch.cat([global_feat, local_feat_1 / 4, local_feat_2 / 4, local_feat_3 / 4, local_feat_4 / 4], dim=1)


def make_model(num_classes, camera_num=0, view_num=0, jpm=False, **kwargs):
    """``make_model`` with the config as ``transmatcher_fast.TransReID``'s keyword arguments."""
    if jpm:
        kwargs.pop("gem_pooling", None)  # the local backbone never pools
        return build_transformer_local(num_classes, camera_num, view_num, **kwargs)
    for key in ("shift_num", "shuffle_groups", "divide_length", "rearrange"):
        kwargs.pop(key, None)
    return build_transformer(num_classes, camera_num, view_num, **kwargs)
