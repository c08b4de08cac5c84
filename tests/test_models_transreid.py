"""TransReID and its ViT backbone against upstream's computation (tests/upstream_transreid.py):
state_dict layouts, initialisation, outputs and gradients, JPM grouping, SIE, position-embedding
resizing, pretrained loading, matcher feature maps, attention maps, torch.compile."""

from __future__ import annotations

import argparse
import fractions
import math

import pytest
import torch

from transmatcher_fast import QAConv, TransMatcher
from transmatcher_fast.models import (VIT_ARCHS, TransReID, VisionTransformer, ViTMatchingFeatures, build_vit,
                                      jpm_index, load_pretrained, resize_pos_embed)
from transmatcher_fast.models.vit import Block, norm_linear, norm_mlp

import upstream_transreid as upstream

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine a descheduled OpenMP worker
    makes each small op wait (50x slower forwards seen with 2 threads on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(arch="vit_tiny_patch16", img_size=(64, 32))  # 4 x 2 grid
# 10 x 5 grid at stride 12: N = 50, so JPM uses 4 x 12 patches and drops two.
STRIDED = dict(arch="vit_tiny_patch16", img_size=(128, 64), stride=12)


def layout(module):
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def trainable(module):
    return [(k, p.requires_grad) for k, p in module.named_parameters()]


def pair(seed=0, num_classes=7, camera_num=3, view_num=2, **cfg):
    """Ours and upstream's model from the same seed (so with the same weights)."""
    torch.manual_seed(seed)
    ours = TransReID(num_classes, camera_num, view_num, **cfg)
    torch.manual_seed(seed)
    ref = upstream.make_model(num_classes, camera_num, view_num, **cfg)
    return ours, ref


def flat(out):
    """Training outputs (tensor pairs, or lists with JPM) as one vector."""
    parts = [t for group in out for t in (group if isinstance(group, list) else [group])]
    return torch.cat([t.flatten() for t in parts])


def labels(batch, generator):
    return torch.randint(0, 3, (batch,), generator=generator), torch.randint(0, 2, (batch,), generator=generator)


# -- layout and initialisation ---------------------------------------------------------------------


def test_arch_table():
    assert VIT_ARCHS["vit_base_patch16"] == dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True)
    for name in ("deit_small_patch16", "vit_small_patch16"):
        assert VIT_ARCHS[name] == dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, qkv_bias=True)
    assert VIT_ARCHS["vit_small_patch16_transreid"] == dict(embed_dim=768, depth=8, num_heads=8, mlp_ratio=3.0,
                                                            qkv_bias=False, qk_scale=768 ** -0.5)
    with torch.device("meta"):
        vit_b = build_vit("vit_base_patch16", img_size=(256, 128))
    backbone = sum(p.numel() for n, p in vit_b.named_parameters() if not n.startswith("fc."))
    assert abs(backbone - 86.0e6) < 0.5e6  # reference doc §1.4: ~86 M
    assert vit_b.blocks[0].attn.scale == 64 ** -0.5


@pytest.mark.parametrize("arch", sorted(upstream.ARCHS))
@pytest.mark.parametrize("jpm", [False, True])
def test_state_dict_layout_is_upstreams(arch, jpm):
    """Keys, shapes, order and frozen BNNeck biases equal upstream's (ViT-B, DeiT-S ... at 256x128).
    (JPM with a 384-wide ViT: the TransReID repo hard-codes 768 and fails; the SSL repo, as here,
    takes the backbone's width.)"""
    cfg = dict(arch=arch, img_size=(256, 128), stride=12, sie_camera=True, jpm=jpm)
    with torch.device("meta"):
        ours = TransReID(751, 6, 0, **cfg)
        ref = upstream.make_model(751, 6, 0, **cfg)
    assert layout(ours) == layout(ref)
    assert trainable(ours) == trainable(ref)
    d = ours.in_planes
    keys = dict(layout(ours))
    assert keys["base.pos_embed"] == (1, 21 * 10 + 1, d) and keys["base.sie_embed"] == (6, 1, d)
    assert keys["base.fc.weight"] == (1000, d)  # upstream's unused ImageNet head is in its state_dict
    assert not dict(ours.named_parameters())["bottleneck.bias"].requires_grad
    assert ("b2.0.attn.qkv.weight" in keys) == jpm and ("classifier_4.weight" in keys) == jpm


@pytest.mark.parametrize("camera_num,view_num,rows", [(6, 8, 48), (6, 0, 6), (0, 8, 8), (6, 1, 6), (1, 1, 0)])
def test_sie_embed_shapes(camera_num, view_num, rows):
    ours, ref = pair(camera_num=camera_num, view_num=view_num, sie_camera=True, sie_view=True, **TINY)
    assert layout(ours) == layout(ref)
    shape = dict(layout(ours)).get("base.sie_embed")
    assert shape == ((rows, 1, 192) if rows else None)


def test_ssl_layout_is_upstreams():
    """TransReID-SSL: ICS stem (IBN halves, BN, proj 8x8) and GeM (no parameters)."""
    ours, ref = pair(stem_conv=True, gem_pooling=True, **TINY)
    assert layout(ours) == layout(ref)
    keys = dict(layout(ours))
    assert keys["base.patch_embed.conv.1.IN.weight"] == (32,)
    assert keys["base.patch_embed.conv.1.BN.running_var"] == (32,)
    assert keys["base.patch_embed.conv.7.weight"] == (64,) and keys["base.patch_embed.proj.weight"] == (192, 64, 8, 8)


@pytest.mark.parametrize("jpm", [False, True])
def test_same_seed_same_weights_as_upstream(jpm):
    """Same parameters in the same random order: the same seed gives upstream's initial weights."""
    ours, ref = pair(jpm=jpm, sie_camera=True, **STRIDED)
    for (k, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k
    std = ours.classifier.weight.std().item()
    assert 0.0008 < std < 0.0012  # N(0, 0.001)


def test_upstream_arch_names():
    with torch.device("meta"):
        assert build_vit("deit_base_patch16_224_TransReID").embed_dim == 768
        assert build_vit("deit_small_patch16_224_TransReID").embed_dim == 384
    with pytest.raises(ValueError, match="two networks"):
        build_vit("vit_small_patch16_224_TransReID")


# -- outputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("jpm", [False, True])
@pytest.mark.parametrize("sie", ["none", "camera", "both"])
def test_forward_shapes_and_backward(jpm, sie):
    cfg = dict(sie_camera=sie != "none", sie_view=sie == "both", jpm=jpm, **TINY)
    torch.manual_seed(0)
    model = TransReID(7, 3, 2, **cfg)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 64, 32, generator=gen)
    cam, view = labels(4, gen)
    scores, feats = model(x, cam_label=cam, view_label=view)
    k = 4 if jpm else 0
    if jpm:
        assert isinstance(scores, list) and len(scores) == len(feats) == k + 1
        assert all(s.shape == (4, 7) for s in scores) and all(f.shape == (4, 192) for f in feats)
    else:
        assert scores.shape == (4, 7) and feats.shape == (4, 192)
    flat((scores, feats)).square().sum().backward()
    no_grad = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    unused = {"base.fc.weight", "base.fc.bias"}  # as upstream: never in forward
    if jpm:  # as upstream: the backbone's own last block and norm are idle, b1/b2 run instead
        unused |= {n for n, _ in model.named_parameters() if n.startswith(("base.blocks.3.", "base.norm."))}
    assert no_grad == unused
    model.eval()
    with torch.no_grad():
        assert model(x, cam_label=cam, view_label=view).shape == (4, 192 * (k + 1))
        model.neck_feat = "after"
        assert model(x, cam_label=cam, view_label=view).shape == (4, 192 * (k + 1))


@pytest.mark.parametrize("jpm", [False, True])
def test_outputs_and_gradients_match_upstream(jpm):
    """Stride 12, camera + view SIE: eval features (both necks) and training outputs in float32;
    every gradient in float64."""
    ours, ref = pair(jpm=jpm, sie_camera=True, sie_view=True, drop_path=0.0, **STRIDED)
    ours.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 128, 64, generator=gen)
    cam, view = labels(5, gen)
    for neck_feat in ("before", "after"):
        ours.eval().neck_feat = ref.eval().neck_feat = neck_feat
        with torch.no_grad():
            torch.testing.assert_close(ours(x, cam_label=cam, view_label=view), ref(x, cam_label=cam, view_label=view),
                                       rtol=1e-4, atol=1e-5)
    ours.train(), ref.train()
    torch.testing.assert_close(flat(ours(x, cam_label=cam, view_label=view)), flat(ref(x, cam_label=cam, view_label=view)),
                               rtol=1e-4, atol=1e-5)
    # Running statistics were updated alike.
    torch.testing.assert_close(ours.bottleneck.running_mean, ref.bottleneck.running_mean)
    ours.double(), ref.double()
    for model in (ours, ref):
        model.zero_grad()
        out = model(x.double(), cam_label=cam, view_label=view)
        (flat(out) * torch.linspace(-1, 1, flat(out).numel(), dtype=torch.float64)).square().sum().backward()
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_drop_path_trains_and_eval_ignores_it():
    ours, ref = pair(jpm=True, sie_camera=True, drop_path=0.3, **TINY)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, 64, 32, generator=gen)
    cam = torch.tensor([0, 2, 1])
    ours.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, cam_label=cam), ref(x, cam_label=cam), rtol=1e-4, atol=1e-5)
    ours.train()
    torch.manual_seed(0)
    a = flat(ours(x, cam_label=cam))
    b = flat(ours(x, cam_label=cam))
    assert not torch.allclose(a, b)  # stochastic depth is on in training


def test_ssl_stem_and_gem_match_upstream():
    ours, ref = pair(stem_conv=True, gem_pooling=True, drop_path=0.0, **TINY)
    x = torch.randn(3, 3, 64, 32, generator=torch.Generator().manual_seed(4))
    for train in (True, False):
        ours.train(train), ref.train(train)
        with torch.no_grad():
            torch.testing.assert_close(flat(ours(x)) if train else ours(x), flat(ref(x)) if train else ref(x),
                                       rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # GeM's feature is cls + GeM(patches): one image too (upstream squeezes it away)
        assert ours(x[:1]).shape == (1, 192)


def test_odd_patch_count_matches_upstream():
    """80x48 at stride 16: a 5 x 3 grid, N = 15 is odd, so the shuffle pads one token."""
    ours, ref = pair(jpm=True, img_size=(80, 48), arch="vit_tiny_patch16")
    x = torch.randn(2, 3, 80, 48, generator=torch.Generator().manual_seed(5))
    ours.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)


# -- JPM --------------------------------------------------------------------------------------------


def test_jpm_index_16x8_by_hand():
    """256x128 at stride 16: shift by 4 patches, 2-way interleave, 4 groups of 32 (reference doc §2.2)."""
    index = jpm_index(128, shift_num=5, shuffle_groups=2, divide_length=4)
    assert index.shape == (4, 33) and (index[:, 0] == 0).all()
    shifted = [(p + 4) % 128 for p in range(128)]  # patch indices after the shift
    interleaved = [shifted[g * 64 + i] for i in range(64) for g in range(2)]
    for j in range(4):
        assert index[j, 1:].tolist() == [p + 1 for p in interleaved[32 * j:32 * (j + 1)]]
    # Group 0 is patches 4-19 and 68-83, alternating; group 3 holds patches 0-3.
    assert index[0, 1:].tolist() == [t for i in range(16) for t in (5 + i, 69 + i)]
    assert {1, 2, 3, 4} <= set(index[3].tolist())
    assert sorted(index[:, 1:].flatten().tolist()) == list(range(1, 129))  # a permutation
    # Rows 0-2 and 8-10 of the 16 x 8 grid.
    assert {(t - 1) // 8 for t in index[0, 1:].tolist()} == {0, 1, 2, 8, 9, 10}


def test_jpm_index_odd_padding_by_hand():
    """N = 5, shift 2, G = 2, k = 2: shifted [2,3,4,5,1], padded with 5, interleaved
    [2,5,3,1,4,5], groups of 5 // 2 = 2."""
    assert jpm_index(5, shift_num=2, shuffle_groups=2, divide_length=2).tolist() == [[0, 2, 5], [0, 3, 1]]
    assert jpm_index(5, divide_length=2, rearrange=False).tolist() == [[0, 1, 2], [0, 3, 4]]


@pytest.mark.parametrize("n,shift,groups,k", [(128, 5, 2, 4), (210, 5, 2, 4), (441, 8, 2, 4), (15, 5, 2, 4),
                                              (50, 3, 2, 3), (60, 1, 3, 5), (10, 4, 5, 2)])
def test_jpm_index_is_upstreams_shuffle(n, shift, groups, k):
    features = torch.arange(n + 1, dtype=torch.float64).view(1, n + 1, 1)  # token ids as values
    shuffled = upstream.shuffle_unit(features, shift, groups)[0, :, 0].long()
    p = n // k
    index = jpm_index(n, shift, groups, k)
    assert index.shape == (k, p + 1)
    assert index[:, 1:].flatten().tolist() == shuffled[:k * p].tolist()


def test_jpm_index_errors():
    with pytest.raises(ValueError, match="shuffle_groups=3"):
        jpm_index(7, shuffle_groups=3)  # 7 + 1 padded is not a multiple of 3; upstream crashes
    with pytest.raises(ValueError, match="divide_length"):
        jpm_index(3, divide_length=4)
    with pytest.raises(ValueError, match="shift_num"):
        jpm_index(8, shift_num=0)


# -- SIE --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("camera_num,view_num,sie_camera,sie_view,index", [
    (3, 2, True, True, lambda c, v: c * 2 + v),
    (3, 2, True, False, lambda c, v: c),
    (3, 2, False, True, lambda c, v: v),
])
def test_sie_rows_added_once_to_every_token(camera_num, view_num, sie_camera, sie_view, index):
    torch.manual_seed(0)
    model = TransReID(7, camera_num, view_num, sie_camera=sie_camera, sie_view=sie_view, sie_coe=3.0, **TINY)
    base = model.base
    with torch.no_grad():
        rows = 0.1 * torch.arange(base.sie_embed.shape[0], dtype=torch.float32)  # row r: all 0.1 * r
        base.sie_embed.copy_(rows.view(-1, 1, 1).expand_as(base.sie_embed))
    x = torch.randn(4, 3, 64, 32)
    cam, view = torch.tensor([0, 1, 2, 2]), torch.tensor([1, 0, 1, 0])
    with torch.no_grad():
        tokens = base.embed(x, cam_label=cam, view_label=view)
        plain = torch.cat([base.cls_token.expand(4, -1, -1), base.patch_embed(x)], dim=1) + base.pos_embed
    expected = torch.tensor([0.1 * index(c, v) for c, v in zip(cam.tolist(), view.tolist())])
    torch.testing.assert_close(tokens - plain, 3.0 * expected.view(4, 1, 1).expand_as(plain))
    ref = upstream.make_model(7, camera_num, view_num, sie_camera=sie_camera, sie_view=sie_view, **TINY)
    ref.load_state_dict(model.state_dict())
    ref.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, cam_label=cam, view_label=view), ref(x, cam_label=cam, view_label=view),
                                   rtol=1e-4, atol=1e-5)


def test_sie_needs_labels():
    model = TransReID(7, 3, 0, sie_camera=True, **TINY).eval()
    with pytest.raises(ValueError, match="cam_label"):
        model(torch.randn(1, 3, 64, 32))


# -- position embedding -----------------------------------------------------------------------------


def linear_weights(n_in, n_out):
    """Bilinear, align_corners=False, by hand: output i samples input (i + 0.5) * n_in / n_out - 0.5."""
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(math.floor(src), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        w[i, lo] += 1 - frac
        w[i, hi] += frac
    return w


def test_resize_pos_embed_by_hand():
    # 2 -> 4 along an axis: weights [1, 0], [.75, .25], [.25, .75], [0, 1].
    assert linear_weights(2, 4).tolist() == [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]]
    grid = torch.tensor([[1.0, 2.0], [3.0, 5.0]], dtype=torch.float64)
    posemb = torch.cat([torch.tensor([7.0], dtype=torch.float64), grid.flatten()]).view(1, 5, 1)
    out = resize_pos_embed(posemb, 4, 3)
    expected = linear_weights(2, 4) @ grid @ linear_weights(2, 3).t()
    assert out[0, 0, 0] == 7.0  # the cls entry is kept
    torch.testing.assert_close(out[0, 1:, 0], expected.flatten())
    # ImageNet's 14 x 14 grid to 21 x 10 (256x128, stride 12), two channels.
    posemb = torch.randn(1, 197, 2, dtype=torch.float64)
    out = resize_pos_embed(posemb, 21, 10)
    for c in range(2):
        g = posemb[0, 1:, c].view(14, 14)
        torch.testing.assert_close(out[0, 1:, c], (linear_weights(14, 21) @ g @ linear_weights(14, 10).t()).flatten())


def test_resize_pos_embed_hw_ratio():
    """TransReID-SSL: a 128-patch DINO grid is 16 x 8 with hw_ratio 2 (not sqrt(128) square)."""
    posemb = torch.randn(1, 129, 1, dtype=torch.float64)
    g = posemb[0, 1:, 0].view(16, 8)
    out = resize_pos_embed(posemb, 21, 10, hw_ratio=2)
    torch.testing.assert_close(out[0, 1:, 0], (linear_weights(16, 21) @ g @ linear_weights(8, 10).t()).flatten())
    torch.testing.assert_close(resize_pos_embed(posemb, 16, 8, hw_ratio=2), posemb)  # same grid: unchanged
    with pytest.raises(ValueError, match="hw_ratio=1"):
        resize_pos_embed(posemb, 21, 10)


# -- pretrained weights ----------------------------------------------------------------------------


def imagenet_state(arch="vit_tiny_patch16", img_size=(224, 224), seed=10, stem_conv=False):
    """A timm-layout ImageNet state_dict: our backbone at 224, with ``head`` instead of ``fc``."""
    torch.manual_seed(seed)
    state = build_vit(arch, img_size=img_size, stem_conv=stem_conv).state_dict()
    state = {("head." + k[3:] if k.startswith("fc.") else k): v for k, v in state.items()}
    state["pre_logits.fc.weight"] = torch.zeros(3, 3)
    return state


def check_backbone_loaded(base, state, num_y, num_x, hw_ratio=1, skip=("pos_embed",)):
    own = base.state_dict()
    for k, v in state.items():
        if k.startswith(("head", "pre_logits")) or "dist" in k or k in skip:
            continue
        assert torch.equal(own[k], v), k
    assert torch.equal(own["pos_embed"], resize_pos_embed(state["pos_embed"], num_y, num_x, hw_ratio))


@pytest.mark.parametrize("wrap", ["bare", "model", "state_dict"])
def test_load_imagenet_checkpoint(tmp_path, wrap):
    state = imagenet_state()
    path = tmp_path / "jx_vit_tiny_p16_224.pth"
    torch.save(state if wrap == "bare" else {wrap: state}, path)
    torch.manual_seed(0)
    model = TransReID(7, pretrained=str(path), **STRIDED)
    check_backbone_loaded(model.base, state, 10, 5)
    # Upstream's loader gives the same weights.
    ref = upstream.make_model(7, 0, 0, pretrained=str(path), **STRIDED)
    for k, v in ref.state_dict().items():
        if k.startswith("base.") and not k.startswith("base.fc."):
            assert torch.equal(model.state_dict()[k], v), k


def test_load_old_linear_patch_weights(tmp_path):
    state = imagenet_state()
    conv = state["patch_embed.proj.weight"]
    state["patch_embed.proj.weight"] = conv.reshape(conv.shape[0], -1)  # pre-conv timm files
    torch.save(state, tmp_path / "old.pth")
    model = build_vit("vit_tiny_patch16", img_size=(64, 32))
    report = load_pretrained(model, str(tmp_path / "old.pth"))
    assert torch.equal(model.patch_embed.proj.weight, conv)
    assert "head.weight" in report["skipped"] and "pos_embed" in report["loaded"]


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224.pth", "deit_tiny.pth"])
def test_load_deit_distilled(tmp_path, name):
    state = imagenet_state()
    d = state["pos_embed"].shape[-1]
    pos = state["pos_embed"]
    dist_pos = torch.randn(1, 1, d)
    state["pos_embed"] = torch.cat([pos[:, :1], dist_pos, pos[:, 1:]], dim=1)  # [1, 198, D]
    state["dist_token"] = torch.randn(1, 1, d)
    state["head_dist.weight"], state["head_dist.bias"] = torch.randn(1000, d), torch.randn(1000)
    path = tmp_path / name
    torch.save({"model": state}, path)
    model = build_vit("vit_tiny_patch16", img_size=(64, 32))
    report = load_pretrained(model, str(path))
    assert {"dist_token", "head_dist.weight"} <= set(report["skipped"])
    state["pos_embed"] = pos  # what must have been loaded: the dist entry dropped
    check_backbone_loaded(model, state, 4, 2)
    if "distilled" in name:  # upstream detects DeiT distilled by file name
        ref = upstream.backbone("vit_tiny_patch16", img_size=(64, 32))
        assert ref.load_param(str(path)) == []
        assert torch.equal(ref.pos_embed, model.pos_embed)


def dino_checkpoint(state):
    teacher = {f"module.backbone.{k}": v for k, v in state.items() if not k.startswith(("head", "pre_logits"))}
    teacher["module.head.mlp.0.weight"] = torch.randn(4, 192)
    teacher["module.head.last_layer.weight_g"] = torch.randn(1, 4)
    return {"student": {k.replace("module.", ""): v for k, v in teacher.items()}, "teacher": teacher,
            "epoch": 100, "args": argparse.Namespace(arch="vit_small", out_dim=65536)}


@pytest.mark.parametrize("stem_conv", [False, True])
def test_load_dino_teacher_with_hw_ratio(tmp_path, stem_conv):
    """A LUPerson DINO checkpoint (256x128: a 16 x 8 grid) into 128x64 (TransReID-SSL, hw_ratio 2)."""
    state = imagenet_state(img_size=(256, 128), stem_conv=stem_conv)
    path = tmp_path / "checkpoint.pth"
    torch.save(dino_checkpoint(state), path)
    cfg = dict(arch="vit_tiny_patch16", img_size=(128, 64), stem_conv=stem_conv, pretrain_hw_ratio=2)
    torch.manual_seed(0)
    model = TransReID(7, pretrained=str(path), **cfg)
    check_backbone_loaded(model.base, state, 8, 4, hw_ratio=2)
    ref = upstream.make_model(7, 0, 0, pretrained=str(path), **cfg)
    torch.testing.assert_close(model.base.pos_embed, ref.base.pos_embed)
    # At the checkpoint's own grid the position embedding is copied as it is.
    same = build_vit("vit_tiny_patch16", img_size=(256, 128), stem_conv=stem_conv)
    load_pretrained(same, str(path), hw_ratio=2)
    assert torch.equal(same.pos_embed, state["pos_embed"])


def test_load_errors_name_file_and_keys(tmp_path):
    model = build_vit("vit_tiny_patch16", img_size=(64, 32))
    state = imagenet_state()
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "blocks.1.norm1.weight"}, "blocks.1.norm1.weight"),
        "unexpected": ({**state, "blocks.9.attn.qkv.weight": torch.zeros(1)}, "blocks.9.attn.qkv.weight"),
        "misshapen": ({**state, "blocks.0.mlp.fc1.bias": torch.zeros(5)}, r"blocks.0.mlp.fc1.bias: file \(5,\)"),
    }
    for name, (bad, key) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(bad, path)
        with pytest.raises(ValueError, match=key) as info:
            load_pretrained(model, str(path))
        assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="no such file"):
        load_pretrained(model, str(tmp_path / "absent.pth"))
    torch.save({"x": fractions.Fraction(1, 3)}, tmp_path / "code.pth")  # a class weights_only refuses
    with pytest.raises(ValueError, match="weights-only"):
        load_pretrained(model, str(tmp_path / "code.pth"))
    # An ImageNet 16x16 patch conv does not fit the ICS stem.
    torch.save(state, tmp_path / "imagenet.pth")
    with pytest.raises(ValueError, match="patch_embed.conv.0.weight"):
        load_pretrained(build_vit("vit_tiny_patch16", img_size=(64, 32), stem_conv=True),
                        str(tmp_path / "imagenet.pth"))


def test_last_block_copied_after_pretrained_load(tmp_path):
    state = imagenet_state()
    torch.save(state, tmp_path / "vit.pth")
    model = TransReID(7, jpm=True, pretrained=str(tmp_path / "vit.pth"), **TINY)
    last = model.base.depth - 1
    for branch in (model.b1, model.b2):
        for k, v in branch[0].state_dict().items():
            assert torch.equal(v, state[f"blocks.{last}.{k}"]), k
        assert torch.equal(branch[1].weight, state["norm.weight"])
        assert branch[0] is not model.base.blocks[-1]
        assert branch[0].attn.qkv.weight.data_ptr() != model.base.blocks[-1].attn.qkv.weight.data_ptr()
    assert model.b1[0].attn.qkv.weight.data_ptr() != model.b2[0].attn.qkv.weight.data_ptr()


def test_load_trained_upstream_checkpoint(tmp_path):
    """An upstream training checkpoint (DataParallel's ``module.`` prefixes) loads as it is."""
    _, ref = pair(seed=3, jpm=True, sie_camera=True, **TINY)
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, tmp_path / "transformer_120.pth")
    torch.manual_seed(9)
    model = TransReID(7, 3, 2, jpm=True, sie_camera=True, **TINY)
    model.load_param(str(tmp_path / "transformer_120.pth"))
    x, cam = torch.randn(2, 3, 64, 32), torch.tensor([1, 2])
    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, cam_label=cam), ref(x, cam_label=cam))
    five = TransReID(7, 3, 2, jpm=True, sie_camera=True, divide_length=5, **TINY)
    with pytest.raises(ValueError, match="transformer_120.pth.*missing keys.*classifier_5.weight"):
        five.load_param(str(tmp_path / "transformer_120.pth"))


# -- matchers, pictures, compile, pieces ---------------------------------------------------------


def test_matching_features_feed_the_matchers():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 128, 64)
    gallery = torch.randn(3, 3, 128, 64)
    tm = ViTMatchingFeatures("vit_tiny_patch16", img_size=(128, 64), levels=2).eval()
    assert (tm.height, tm.width, tm.seq_len, tm.num_features) == (8, 4, 32, 192)
    with torch.no_grad():
        f, g = tm(x), tm(gallery)
        levels = tm.base.forward_levels(x, levels=2)
    assert f.shape == (2, 8, 4, 2 * 192)
    torch.testing.assert_close(f[..., 192:], levels[1][:, 1:].reshape(2, 8, 4, 192))
    matcher = TransMatcher(tm.seq_len, tm.num_features, num_decoder_layers=2, dim_feedforward=32).eval()
    matcher.make_kernel(f)
    with torch.no_grad():
        assert matcher(g).shape == (2, 3)

    qa = ViTMatchingFeatures("vit_tiny_patch16", img_size=(128, 64), matcher="qaconv", camera_num=3).eval()
    cam = torch.tensor([0, 2])
    with torch.no_grad():
        f = qa(x, cam)
        g = qa(gallery, torch.tensor([1, 1, 0]))
    assert f.shape == (2, 192, 8, 4) and qa.num_features == 192
    torch.testing.assert_close(f.norm(dim=1), torch.ones(2, 8, 4))
    with torch.no_grad():
        assert QAConv(qa.num_features, qa.height, qa.width).eval()(f, g).shape == (2, 3)
    with pytest.raises(ValueError, match="cam_label"):
        qa(x)
    # Training works through the matcher.
    tm.train()
    matcher.train()
    scores = matcher.decoder(tm(x), tm(x))
    scores.sum().backward()
    assert tm.base.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("jpm", [False, True])
def test_attention_maps(jpm):
    ours, ref = pair(jpm=jpm, sie_camera=True, **STRIDED)
    ours.eval(), ref.eval()
    x, cam = torch.randn(2, 3, 128, 64), torch.tensor([0, 2])
    with torch.no_grad():
        maps = ours.attention_maps(x, cam)
    heads, n = 3, 50
    assert maps.cls_attention.shape == (2, heads, n) and maps.rollout.shape == (2, n)
    sums = maps.cls_attention.sum(-1)
    assert ((sums > 0) & (sums < 1)).all()  # the rest goes to the cls token itself
    assert (maps.rollout >= 0).all()
    total = maps.rollout.sum(-1)
    assert ((total > 0) & (total < 1 + 1e-6)).all()
    # The last layer's cls attention, explicitly from upstream's modules.
    with torch.no_grad():
        base = ref.base
        t = torch.cat([base.cls_token.expand(2, -1, -1), base.patch_embed(x)], 1) + base.pos_embed \
            + base.sie_xishu * base.sie_embed[cam]
        for blk in base.blocks[:-1]:
            t = blk(t)
        last = ref.b1[0] if jpm else base.blocks[-1]
        attn = last.attn
        b, n1, c = t.shape
        qkv = attn.qkv(last.norm1(t)).reshape(b, n1, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        probs = ((qkv[0] @ qkv[1].transpose(-2, -1)) * attn.scale).softmax(-1)
    torch.testing.assert_close(maps.cls_attention, probs[:, :, 0, 1:])


def test_torch_compile():
    torch.manual_seed(0)
    model = TransReID(5, 3, 0, sie_camera=True, jpm=True, drop_path=0.0, **TINY)
    compiled = torch.compile(model, backend="aot_eager")  # dynamo + AOT autograd, no C++ build here
    x, cam = torch.randn(2, 3, 64, 32), torch.tensor([0, 2])
    out = compiled(x, cam_label=cam)
    flat(out).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    expected = model(x, cam_label=cam)
    flat(expected).square().sum().backward()
    torch.testing.assert_close(flat(out), flat(expected))
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad, msg=n)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, cam_label=cam), model(x, cam_label=cam))


def test_fused_pieces_gradcheck():
    torch.manual_seed(0)
    block = Block(8, 2, mlp_ratio=1.5, qkv_bias=True).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    norm = block.norm1
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    w = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: norm_linear(x, norm, w, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x: norm_mlp(x, block.norm2, block.mlp), (x,))
    torch.testing.assert_close(block.forward_cls(x), block(x)[:, :1])
    assert torch.autograd.gradcheck(lambda x: block(x), (x,))
    assert torch.autograd.gradcheck(lambda x: block.forward_cls(x), (x,))


def saved_bytes(model, x, cam):
    """Bytes of the distinct storages, parameters aside, autograd keeps for backward of one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, cam_label=cam)
    return sum(seen.values()), out


def test_keeps_less_for_backward_than_upstream():
    ours, ref = pair(jpm=True, sie_camera=True, **STRIDED)
    x, cam = torch.randn(4, 3, 128, 64), torch.tensor([0, 1, 2, 0])
    ours_bytes, _ = saved_bytes(ours, x, cam)
    ref_bytes, _ = saved_bytes(ref, x, cam)
    assert ours_bytes < 0.6 * ref_bytes, (ours_bytes, ref_bytes)


def test_constructor_errors():
    with pytest.raises(ValueError, match="arch must be one of"):
        TransReID(7, arch="vit_huge")
    with pytest.raises(ValueError, match="stride"):
        TransReID(7, stride=0, **TINY)
    with pytest.raises(ValueError, match="stride must be 16"):
        TransReID(7, stride=12, stem_conv=True, **TINY)
    with pytest.raises(ValueError, match="neck_feat"):
        TransReID(7, neck_feat="middle", **TINY)
    with pytest.raises(ValueError, match="gem_pooling"):
        TransReID(7, jpm=True, gem_pooling=True, **TINY)
    with pytest.raises(ValueError, match="num_classes"):
        TransReID(0, **TINY)
    with pytest.raises(ValueError, match="divide_length"):
        TransReID(7, jpm=True, divide_length=9, **TINY)
    with pytest.raises(ValueError, match="img_size"):
        TransReID(7, arch="vit_tiny_patch16", img_size=(8, 8))
    with pytest.raises(ValueError, match="levels"):
        ViTMatchingFeatures("vit_tiny_patch16", img_size=(64, 32), levels=5)
    with pytest.raises(ValueError, match="matcher"):
        ViTMatchingFeatures("vit_tiny_patch16", img_size=(64, 32), matcher="cosine")
    model = TransReID(7, **TINY).eval()
    with pytest.raises(ValueError, match=r"x must be \[B, 3, 64, 32\]"):
        model(torch.randn(1, 3, 64, 64))
    assert isinstance(model.base, VisionTransformer)
