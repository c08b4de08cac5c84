"""DINO pieces (transmatcher_fast.models.dino, methods.optim_utils, the reference cosine_scheduler)
against hand computations and upstream's (facebookresearch/dino) formulas, layouts and behaviour. Tiny sizes: every test is about
semantics, not width."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from transmatcher_fast.methods import optim_utils
from transmatcher_fast.models import dino
from upstream_dino import cosine_scheduler


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _log_softmax(xs):
    m = max(xs)
    lse = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - lse for x in xs]


# ------------------------------------------------------------------------------------------------
# DINOLoss
# ------------------------------------------------------------------------------------------------

def _hand_loss(student, teacher, center, temp, ncrops, batch, student_temp=0.1):
    """The loss in plain Python: the pairs (teacher view iq, student view v != iq), written out."""
    pairs = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]
    assert ncrops == 4 and len(pairs) == 2 * ncrops - 2
    s, t, c = student.tolist(), teacher.tolist(), center[0].tolist()
    total = 0.0
    for iq, v in pairs:
        per_image = []
        for b in range(batch):
            q = _softmax([(x - ck) / temp for x, ck in zip(t[iq * batch + b], c)])
            log_p = _log_softmax([x / student_temp for x in s[v * batch + b]])
            per_image.append(-sum(qk * lk for qk, lk in zip(q, log_p)))
        total += sum(per_image) / batch
    return total / len(pairs)


def test_loss_matches_hand_computation_and_updates_center():
    torch.manual_seed(0)
    out_dim, batch, ncrops = 3, 2, 4  # 2 global + 2 local crops
    loss_fn = dino.DINOLoss(out_dim, ncrops, warmup_teacher_temp=0.04, teacher_temp=0.07,
                            warmup_teacher_temp_epochs=3, nepochs=5)
    student = torch.randn(ncrops * batch, out_dim)
    teacher = torch.randn(2 * batch, out_dim)

    loss = loss_fn(student, teacher, epoch=0)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(_hand_loss(student, teacher, torch.zeros(1, out_dim), 0.04, ncrops, batch),
                                        rel=1e-5)
    expected_center = 0.1 * teacher.mean(0, keepdim=True)  # 0.9 * 0 + 0.1 * batch mean
    torch.testing.assert_close(loss_fn.center, expected_center)

    # The second call centres with the updated centre and epoch 1's temperature.
    teacher2 = torch.randn(2 * batch, out_dim)
    loss2 = loss_fn(student, teacher2, epoch=1)
    assert loss2.item() == pytest.approx(_hand_loss(student, teacher2, expected_center, 0.055, ncrops, batch),
                                         rel=1e-5)
    torch.testing.assert_close(loss_fn.center, 0.9 * expected_center + 0.1 * teacher2.mean(0, keepdim=True))
    assert list(loss_fn.state_dict()) == ["center"]  # upstream's state_dict


def test_loss_skips_same_view_pairs():
    """A student that copies the teacher on view 0 and is uniform elsewhere: the (0, 0) pair would
    add a low term; the loss equals the mean over the other pairs only."""
    out_dim = 4  # batch 1, 3 crops
    loss_fn = dino.DINOLoss(out_dim, 3, 0.04, 0.04, 0, 1, student_temp=1.0)
    teacher = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0]])
    student = torch.tensor([[500.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    loss = loss_fn(student, teacher, 0)
    # Pairs: (0,1) (0,2) (1,0) (1,2). Uniform student: log(4) each; (1, 0): teacher 1 puts ~all
    # mass on dim 1 where the student's log-prob is -500.
    q1 = torch.softmax(teacher[1] / 0.04, -1)
    term_10 = -(q1 * torch.log_softmax(student[0], -1)).sum()
    expected = (3 * math.log(4) + term_10.item()) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_loss_is_float32_under_autocast():
    torch.manual_seed(1)
    loss_fn = dino.DINOLoss(8, 4, 0.04, 0.04, 0, 2)
    student, teacher = torch.randn(8, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    reference = dino.DINOLoss(8, 4, 0.04, 0.04, 0, 2)(student.float(), teacher.float(), 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(student, teacher, 0)
    assert loss.dtype == torch.float32 and loss_fn.center.dtype == torch.float32
    torch.testing.assert_close(loss, reference)


def test_teacher_temperature_schedule():
    loss_fn = dino.DINOLoss(4, 10, warmup_teacher_temp=0.04, teacher_temp=0.07,
                            warmup_teacher_temp_epochs=4, nepochs=6)
    np.testing.assert_allclose(loss_fn.teacher_temp_schedule, [0.04, 0.05, 0.06, 0.07, 0.07, 0.07])
    # TransReID-SSL: 0.04 with no warm-up, 100 epochs.
    ssl = dino.DINOLoss(4, 10, 0.04, 0.04, 0, 100)
    assert len(ssl.teacher_temp_schedule) == 100 and np.all(ssl.teacher_temp_schedule == 0.04)


def test_loss_rejects_bad_shapes_and_epochs():
    loss_fn = dino.DINOLoss(4, 4, 0.04, 0.04, 0, 2)
    with pytest.raises(ValueError, match="ncrops=4"):
        loss_fn(torch.randn(6, 4), torch.randn(4, 4), 0)
    with pytest.raises(ValueError, match="student_output"):
        loss_fn(torch.randn(8, 5), torch.randn(4, 4), 0)
    with pytest.raises(ValueError, match="epoch 2"):
        loss_fn(torch.randn(8, 4), torch.randn(4, 4), 2)
    with pytest.raises(ValueError, match="warmup_teacher_temp_epochs"):
        dino.DINOLoss(4, 4, 0.04, 0.04, 5, 2)


# ------------------------------------------------------------------------------------------------
# Schedules, EMA, gradient utilities
# ------------------------------------------------------------------------------------------------

def test_cosine_scheduler_formula():
    base, final, epochs, niter, warm, start = 1.0, 0.1, 4, 5, 1, 0.2
    sched = cosine_scheduler(base, final, epochs, niter, warmup_epochs=warm, start_warmup_value=start)
    assert sched.shape == (20,)
    np.testing.assert_allclose(sched[:5], np.linspace(start, base, 5))  # warm-up, both ends included
    n = 15
    expected = [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)]
    np.testing.assert_allclose(sched[5:], expected)
    assert sched[4] == sched[5] == base           # the cosine starts where the warm-up ends
    assert final < sched[-1] < final + 0.02      # and stops one step short of final

    plain = cosine_scheduler(0.996, 1, 3, 2)  # teacher momentum: 0.996 -> 1, no warm-up
    assert plain[0] == 0.996 and np.all(np.diff(plain) > 0)
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine_scheduler(1, 0, 2, 3, warmup_epochs=3)


def test_ema_update():
    torch.manual_seed(2)
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    optim_utils.ema_update(teacher, student, 0.9)
    for t, t_old, s in zip(teacher.parameters(), t0, student.parameters()):
        torch.testing.assert_close(t, 0.9 * t_old + 0.1 * s)
        assert t.grad is None
    with pytest.raises(ValueError, match="same parameters"):
        optim_utils.ema_update(nn.Linear(3, 2), nn.Linear(3, 3), 0.9)


def test_clip_gradients_per_parameter():
    model = nn.Linear(2, 2)
    model.weight.grad = torch.full((2, 2), 3.0)  # norm 6 -> scaled to 2
    model.bias.grad = torch.tensor([0.6, 0.8])   # norm 1 -> untouched
    norms = optim_utils.clip_gradients(model, 2.0)
    assert norms == pytest.approx([6.0, 1.0])
    assert model.weight.grad.norm().item() == pytest.approx(2.0, rel=1e-5)
    torch.testing.assert_close(model.bias.grad, torch.tensor([0.6, 0.8]))


def test_cancel_gradients_last_layer_and_param_groups():
    head = dino.DINOHead(4, 6, norm_last_layer=False, hidden_dim=8, bottleneck_dim=3)
    head(torch.randn(2, 4)).sum().backward()
    optim_utils.cancel_gradients_last_layer(0, head, freeze_last_layer=1)
    assert all(p.grad is None for n, p in head.named_parameters() if "last_layer" in n)
    assert head.mlp[0].weight.grad is not None
    head(torch.randn(2, 4)).sum().backward()
    optim_utils.cancel_gradients_last_layer(1, head, freeze_last_layer=1)  # epoch 1: kept
    assert all(p.grad is not None for n, p in head.named_parameters() if "last_layer" in n)

    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    regularized, free = optim_utils.get_params_groups(model)
    assert [p is model[0].weight for p in regularized["params"]] == [True]
    assert {id(p) for p in free["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    assert free["weight_decay"] == 0.0 and "weight_decay" not in regularized
    frozen = optim_utils.get_params_groups(dino.DINOHead(4, 6, hidden_dim=8, bottleneck_dim=3))
    assert all(p.requires_grad for g in frozen for p in g["params"])  # the frozen g is left out


# ------------------------------------------------------------------------------------------------
# DINOHead
# ------------------------------------------------------------------------------------------------

UPSTREAM_HEAD_KEYS = ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight",
                      "mlp.4.bias", "last_layer.weight_g", "last_layer.weight_v"]


def test_head_shapes_keys_and_frozen_magnitude():
    torch.manual_seed(3)
    head = dino.DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
    assert list(head.state_dict()) == UPSTREAM_HEAD_KEYS
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes["last_layer.weight_g"] == (32, 1) and shapes["last_layer.weight_v"] == (32, 8)
    x = torch.randn(5, 16)
    out = head(x)
    assert out.shape == (5, 32)
    # Unit rows on a unit bottleneck: the logits are cosines.
    assert out.abs().max() <= 1 + 1e-5
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(32))
    # trunc-normal(.02) MLP weights, zero biases.
    assert head.mlp[0].bias.abs().max() == 0 and head.mlp[0].weight.abs().max() <= 2
    assert 0.01 < head.mlp[0].weight.std().item() < 0.03

    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    opt = torch.optim.SGD(head.parameters(), lr=1.0)
    head(x).pow(2).sum().backward()
    opt.step()
    assert torch.all(g == 1)  # frozen: still 1 after a step

    free = dino.DINOHead(16, 32, norm_last_layer=False, hidden_dim=24, bottleneck_dim=8)
    assert free.last_layer.parametrizations.weight.original0.requires_grad

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the deprecated torch.nn.utils.weight_norm is not used
        dino.DINOHead(4, 6, hidden_dim=8, bottleneck_dim=3)


def test_head_layouts_one_layer_and_bn():
    assert list(dino.DINOHead(4, 6, nlayers=1, bottleneck_dim=3).state_dict()) == [
        "mlp.weight", "mlp.bias", "last_layer.weight_g", "last_layer.weight_v"]
    bn = dino.DINOHead(4, 6, use_bn=True, nlayers=2, hidden_dim=8, bottleneck_dim=3)
    assert [type(m).__name__ for m in bn.mlp] == ["Linear", "BatchNorm1d", "GELU", "Linear"]


class _UpstreamHead(nn.Module):
    """Upstream's DINOHead (no BN, 3 layers) on the deprecated torch.nn.utils.weight_norm."""

    def __init__(self, in_dim, out_dim, hidden_dim, bottleneck_dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.weight_g.fill_(1)
            self.last_layer.weight_g.mul_(torch.rand_like(self.last_layer.weight_g) + 0.5)  # not all 1

    def forward(self, x):
        return self.last_layer(nn.functional.normalize(self.mlp(x), dim=-1))


def test_head_loads_upstream_layout_and_saves_it():
    if not hasattr(nn.utils, "weight_norm"):
        pytest.skip("torch.nn.utils.weight_norm (upstream's) is gone from this torch")
    torch.manual_seed(4)
    x = torch.randn(3, 16)
    upstream = _UpstreamHead(16, 32, 24, 8)
    upstream_sd = upstream.state_dict()
    assert list(upstream_sd) == UPSTREAM_HEAD_KEYS

    # Upstream layout (weight_g / weight_v), inside a MultiCropWrapper as in a DINO checkpoint.
    ours = dino.MultiCropWrapper(nn.Identity(), dino.DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8))
    ours.load_state_dict({f"head.{k}": v for k, v in upstream_sd.items()}, strict=True)
    torch.testing.assert_close(ours.head(x), upstream(x))
    assert list(ours.state_dict()) == [f"head.{k}" for k in UPSTREAM_HEAD_KEYS]

    # And back: what we save loads into upstream's module.
    back = _UpstreamHead(16, 32, 24, 8)
    back.load_state_dict(ours.head.state_dict(), strict=True)
    torch.testing.assert_close(back(x), upstream(x))


def test_head_loads_parametrization_layout():
    """A state_dict saved by torch's parametrized weight_norm (original0 = g, original1 = v)."""
    torch.manual_seed(5)
    x = torch.randn(3, 16)
    source = dino.DINOHead(16, 32, norm_last_layer=False, hidden_dim=24, bottleneck_dim=8)
    with torch.no_grad():
        source.last_layer.parametrizations.weight.original0.mul_(2.5)
    new = {k.replace("last_layer.weight_g", "last_layer.parametrizations.weight.original0")
            .replace("last_layer.weight_v", "last_layer.parametrizations.weight.original1"): v
           for k, v in source.state_dict().items()}
    assert "last_layer.parametrizations.weight.original0" in new
    head = dino.DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
    head.load_state_dict(new, strict=True)
    torch.testing.assert_close(head(x), source(x))
    assert not head.last_layer.parametrizations.weight.original0.requires_grad  # still frozen


# ------------------------------------------------------------------------------------------------
# MultiCropWrapper
# ------------------------------------------------------------------------------------------------

class _CountingBackbone(nn.Module):
    """[B, 3, H, W] -> [B, 4]: a mean over space, then a linear map; records its inputs' shapes."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.fc = nn.Linear(4, 10)  # a classifier the wrapper must disable
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return self.fc(self.proj(x.mean((2, 3))))


def test_multicrop_runs_backbone_once_per_resolution():
    torch.manual_seed(5)
    backbone = _CountingBackbone()
    head = dino.DINOHead(4, 6, hidden_dim=8, bottleneck_dim=3)
    model = dino.MultiCropWrapper(backbone, head)
    assert isinstance(backbone.fc, nn.Identity)
    b = 2
    crops = [torch.randn(b, 3, 16, 8) for _ in range(2)] + [torch.randn(b, 3, 8, 4) for _ in range(3)]
    out = model(crops)
    assert backbone.calls == [(2 * b, 3, 16, 8), (3 * b, 3, 8, 4)]
    assert out.shape == (5 * b, 6)
    expected = head(torch.cat([backbone.proj(c.mean((2, 3))) for c in crops]))
    torch.testing.assert_close(out, expected)

    backbone.calls.clear()  # groups are runs of consecutive equal sizes
    model([crops[0], crops[2], crops[1]])
    assert backbone.calls == [(b, 3, 16, 8), (b, 3, 8, 4), (b, 3, 16, 8)]
    backbone.calls.clear()  # one width, two heights: two groups (upstream's width-only key would fail)
    model([torch.randn(b, 3, 16, 8), torch.randn(b, 3, 12, 8)])
    assert backbone.calls == [(b, 3, 16, 8), (b, 3, 12, 8)]
    backbone.calls.clear()
    assert model(crops[0]).shape == (b, 6) and backbone.calls == [(b, 3, 16, 8)]


def test_one_dino_step_end_to_end():
    """Teacher on the 2 global crops, student on all, loss, clipping, frozen last layer, EMA."""
    torch.manual_seed(6)
    student = dino.MultiCropWrapper(_CountingBackbone(), dino.DINOHead(4, 16, hidden_dim=8, bottleneck_dim=3))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
    loss_fn = dino.DINOLoss(16, 4, 0.04, 0.04, 0, 2)
    opt = torch.optim.AdamW(optim_utils.get_params_groups(student), lr=1e-2)
    crops = [torch.randn(3, 3, 16, 8) for _ in range(2)] + [torch.randn(3, 3, 8, 4) for _ in range(2)]
    last_v = student.head.last_layer.parametrizations.weight.original1.detach().clone()
    loss = loss_fn(student(crops), teacher(crops[:2]), 0)
    loss.backward()
    assert optim_utils.clip_gradients(student, 3.0)
    optim_utils.cancel_gradients_last_layer(0, student, 1)
    opt.step()
    torch.testing.assert_close(student.head.last_layer.parametrizations.weight.original1, last_v)
    before = [p.clone() for p in teacher.parameters()]
    optim_utils.ema_update(teacher, student, 0.996)
    assert any(not torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    assert math.isfinite(loss.item())


# ------------------------------------------------------------------------------------------------
# Collapse statistics
# ------------------------------------------------------------------------------------------------

def test_teacher_stats_tell_collapse():
    torch.manual_seed(7)
    k = 32
    healthy = dino.teacher_stats(torch.randn(64, k) * 0.2, None, 0.04)
    assert healthy.max_entropy == pytest.approx(math.log(k))
    assert healthy.entropy > 0.8 * math.log(k) and healthy.sample_entropy < 0.6 * math.log(k)
    assert healthy.feature_std.shape == (k,) and healthy.feature_std.min() > 0.1

    one_hot = torch.zeros(64, k)
    one_hot[:, 3] = 1.0  # every image on dimension 3
    dominant = dino.teacher_stats(one_hot, None, 0.04)
    assert dominant.entropy < 0.01 and dominant.feature_std.max() == 0
    # Centring removes the dominant dimension, leaving the uniform distribution.
    uniform = dino.teacher_stats(one_hot, one_hot.mean(0, keepdim=True), 0.04)
    assert uniform.sample_entropy == pytest.approx(math.log(k), rel=1e-5)
    assert set(uniform.as_dict()) == {"entropy", "sample_entropy", "max_entropy", "feature_std_mean", "feature_std_min"}
