"""TransMatcher and QAConv on the fused op against upstream's materialised matchers
(transmatcher_fast.reference), their state_dicts against upstream's layout, and match()."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

import transmatcher_fast as tmf
from transmatcher_fast import reference
from transmatcher_fast.models import head
from transmatcher_fast.models import qaconv as qaconv_module
from transmatcher_fast.models import transmatcher as transmatcher_module

import upstream_layouts

# (h, w): upstream's 24x8 map (seq_len 192) and a ragged one. d_model / dim_feedforward are small:
# the tests are about equivalence, which does not depend on the widths.
MAPS = [(24, 8), (7, 5)]
D_MODEL, DIM_FF, LAYERS = 16, 24, 3
# float64: equal up to rounding; float32 (ours) against the float64 reference: 1e-5 relative.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def randomize_batchnorms(module, rng):
    """Non-trivial BatchNorm affine parameters and running statistics, so eval mode is not the
    identity and a mixed-up BN shows."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=rng))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=rng))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=rng))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=rng))


def _record_batchnorm_inputs(module) -> tuple[dict, list]:
    """Forward pre-hooks on every BatchNorm of ``module`` that record, per module, the largest
    magnitude of the values it averages into its running mean (training mode only)."""
    largest, hooks = {}, []
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            def hook(m, args, name=name):
                if m.training and m.track_running_stats:
                    seen = args[0].detach().abs().max().item() if args[0].numel() else 0.0
                    largest[name] = max(largest.get(name, 0.0), seen)
            hooks.append(m.register_forward_pre_hook(hook))
    return largest, hooks


def run_step(fn, module, inputs, weight):
    """fn(module, *leaves) -> scores; returns scores, input grads and parameter grads of
    sum(scores * weight), all float64, plus the module's buffers after the call. ``"_scales"``
    holds the scale each running mean is compared at (see ``assert_same``)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    if len(inputs) == 2 and inputs[0] is inputs[1]:
        leaves = [leaves[0], leaves[0]]  # a batch matched against itself stays one tensor
    module.zero_grad(set_to_none=True)
    before = {name: b.detach().double().clone() for name, b in module.named_buffers()}
    largest_input, hooks = _record_batchnorm_inputs(module)
    try:
        scores = fn(module, *leaves)
    finally:
        for h in hooks:
            h.remove()
    (scores * weight.to(scores.dtype)).sum().backward()
    out = {"scores": scores.detach().double()}
    for i, leaf in enumerate(dict.fromkeys(leaves)):
        out[f"input{i}.grad"] = leaf.grad.double()
    for name, p in module.named_parameters():
        out[f"{name}.grad"] = None if p.grad is None else p.grad.double()
    scales = {}
    for name, b in module.named_buffers():
        out[f"buffer {name}"] = b.double()
        owner, _, kind = name.rpartition(".")
        if kind == "running_mean" and owner in largest_input:
            # new = (1 - m) * old + m * mean(x): a weighted mean of signed terms, which may cancel
            # to far below their own size. Each term carries rounding at its own magnitude, so
            # the result is exact only to the terms' scale, max(|old|, |x|), not to its own.
            scales[f"buffer {name}"] = max(before[name].abs().max().item(), largest_input[owner])
    out["_scales"] = scales
    return out


def assert_same(actual: dict, expected: dict, rtol: float) -> None:
    """Every tensor within rtol of the expected tensor's largest magnitude. Quantities that are
    sums of cancelling terms are compared at the scale of those terms instead of their own
    rounding noise: gradients that are zero in exact arithmetic (a bias followed by a
    training-mode BatchNorm) at the scale of the largest gradient, and BatchNorm running means at
    the scale of the values they average (``run_step``). Running variances average non-negative
    terms, which cannot cancel, so they keep their own scale."""
    actual = {k: v for k, v in actual.items() if k != "_scales"}
    term_scales = expected.get("_scales", {})
    expected = {k: v for k, v in expected.items() if k != "_scales"}
    assert actual.keys() == expected.keys()
    grad_scale = max((e.abs().max().item() for k, e in expected.items()
                      if k.endswith(".grad") and e is not None and e.numel()), default=0.0)
    for key, e in expected.items():
        a = actual[key]
        if e is None:
            assert a is None, f"{key}: expected no gradient"
            continue
        assert a is not None and a.shape == e.shape, key
        scale = e.abs().max().item() if e.numel() else 0.0
        if key.endswith(".grad"):
            scale = max(scale, grad_scale)
        scale = max(scale, term_scales.get(key, 0.0))
        err = (a - e).abs().max().item() if e.numel() else 0.0
        assert err <= rtol * max(scale, 1e-30), f"{key}: error {err:.3e}, scale {scale:.3e}"


def record_argmax(monkeypatch, model_module) -> list:
    """Makes ``model_module``'s matchers record the argmax indices of every ``max_sim`` call,
    as ``(q_index, g_index)`` in call order."""
    calls, op = [], model_module.max_sim

    def recording(query, gallery, score_embed=None):
        q_best, g_best, q_index, g_index = op(query, gallery, score_embed, return_indices=True)
        calls.append((q_index, g_index))
        return q_best, g_best
    monkeypatch.setattr(model_module, "max_sim", recording)
    return calls


def values_only(step: dict) -> dict:
    return {k: v for k, v in step.items() if not k.endswith(".grad")}


def assert_same_as_routed_reference(actual: dict, expected: dict, routed: dict, rtol: float) -> None:
    """``actual`` against the float64 reference ``routed`` through actual's argmax. The gradient
    of a max flows to one location, so where two maxima are equal within float32 rounding the
    float32 and float64 runs may route it to different locations, both right. Routing the
    reference through the run's own choice keeps the comparison exact; the choice is checked
    by the values: a location that is not a maximum would change the routed reference's scores
    and BatchNorm statistics away from the plain reference's ``expected``."""
    assert_same(values_only(routed), values_only(expected), rtol)
    assert_same(actual, routed, rtol)


def protocol(matcher, probe, gallery):
    matcher.make_kernel(probe)
    return matcher(gallery)


def new_transmatcher(h, w, rng, dtype, training):
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=rng)))
    matcher = tmf.TransMatcher(h * w, D_MODEL, LAYERS, DIM_FF)
    randomize_batchnorms(matcher, rng)
    return matcher.to(dtype).train(training)


# The smallest |input| of the head's ReLUs, relative to their largest, that a drawn case may have.
RELU_MARGIN = 1e-4


def relu_margin(matcher, probe, gallery) -> float:
    """min |x| / max |x| over the inputs x of every decoder layer's ReLU, in the float64
    reference (run on a copy: training-mode BatchNorms update their statistics)."""
    matcher, margins = copy.deepcopy(matcher), []
    for layer in matcher.decoder.layers:
        layer.relu.register_forward_hook(
            lambda m, args, out: margins.append((args[0].abs().min() / args[0].abs().max()).item()))
    with torch.no_grad():
        reference.transmatcher_scores(matcher, probe, gallery)
    return min(margins)


def draw_transmatcher_case(h, w, nq, ng, rng, training, tries=20):
    """A float64 matcher and probe/gallery features (gallery None: the probe batch against
    itself) whose head ReLUs see no input within RELU_MARGIN of 0.

    ReLU's gradient jumps at 0: an input within float32 rounding of 0 may fall on either side in
    float32 and float64, both right, and its gradient then differs by O(1). A case that close is
    drawn again from the same generator (with 2,880 ReLU inputs about one draw in five is;
    20 tries all failing has probability 1e-14), so the comparison stays exact on every seed.
    The other jump, between equal maxima, is too frequent to draw around: the comparison routes
    the reference through the run's own argmax instead (assert_same_as_routed_reference)."""
    for _ in range(tries):
        matcher = new_transmatcher(h, w, rng, torch.float64, training)
        probe = torch.randn(nq, h, w, LAYERS * D_MODEL, generator=rng, dtype=torch.float64)
        gallery = probe if ng is None else torch.randn(ng, h, w, LAYERS * D_MODEL, generator=rng,
                                                       dtype=torch.float64)
        if relu_margin(matcher, probe, gallery) >= RELU_MARGIN:
            return matcher, probe, gallery
    raise AssertionError(f"no case with ReLU inputs {RELU_MARGIN} of their scale away from 0 in {tries} draws")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("hw", MAPS, ids=lambda hw: f"{hw[0]}x{hw[1]}")
@pytest.mark.parametrize("same", [False, True], ids=["probe-gallery", "batch-vs-itself"])
def test_transmatcher_matches_upstream(hw, training, dtype, same, rng, monkeypatch):
    h, w = hw
    nq, ng = (5, 5) if same else (5, 4)
    matcher, probe, gallery = draw_transmatcher_case(h, w, nq, None if same else ng, rng, training)
    weight = torch.randn(nq, ng, generator=rng, dtype=torch.float64)
    expected = run_step(reference.transmatcher_scores, copy.deepcopy(matcher), (probe, gallery),
                        weight)
    inputs = (probe.to(dtype),) * 2 if same else (probe.to(dtype), gallery.to(dtype))
    argmax = record_argmax(monkeypatch, transmatcher_module)
    actual = run_step(protocol, copy.deepcopy(matcher).to(dtype), inputs, weight)
    assert len(argmax) == LAYERS
    routed = run_step(functools.partial(reference.transmatcher_scores, indices=argmax),
                      copy.deepcopy(matcher), (probe, gallery), weight)
    assert_same_as_routed_reference(actual, expected, routed, RTOL[dtype])
    # The template layer is never used: it gets no gradient, as upstream's.
    assert all(actual[f"decoder_layer.{n}.grad"] is None
               for n, _ in matcher.decoder_layer.named_parameters())


def _keep_undecayed_old_mean(bn):
    """A defective BatchNorm: its running mean becomes old + m * mean(x), the -m * old term
    dropped."""
    forward = bn.forward

    def defective(x):
        old = bn.running_mean.detach().clone()
        y = forward(x)
        with torch.no_grad():  # a new tensor: autograd saved the updated one
            bn.running_mean = bn.running_mean + bn.momentum * old
        return y
    bn.forward = defective


@pytest.mark.parametrize("defect", [None, "momentum", "dropped-term"])
def test_running_mean_comparison_still_fails_real_defects(defect):
    """At the seed where decoder.layers.1.bn3's running mean cancels to 2.9e-3 from terms of
    size 0.5 (float32 then differs by 3e-8, correct code), the comparison at the terms' scale
    passes, and still rejects a momentum 1 % off or a dropped term in the update."""
    rng = torch.Generator().manual_seed(233665487)
    matcher = new_transmatcher(7, 5, rng, torch.float64, True)
    probe = torch.randn(5, 7, 5, LAYERS * D_MODEL, generator=rng, dtype=torch.float64)
    weight = torch.randn(5, 5, generator=rng, dtype=torch.float64)
    expected = run_step(reference.transmatcher_scores, copy.deepcopy(matcher), (probe, probe), weight)
    ours = copy.deepcopy(matcher).float()
    bn3 = ours.decoder.layers[1].bn3
    if defect == "momentum":
        bn3.momentum = 0.101
    elif defect == "dropped-term":
        _keep_undecayed_old_mean(bn3)
    actual = run_step(protocol, ours, (probe.float(),) * 2, weight)
    if defect is None:
        assert_same(actual, expected, RTOL[torch.float32])
    else:
        with pytest.raises(AssertionError, match="decoder.layers.1.bn3.running_mean"):
            assert_same(actual, expected, RTOL[torch.float32])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_matching_head_in_row_blocks_matches_modules(training, momentum, rng, monkeypatch):
    """The memory-light head gives the modules' values, gradients and running statistics, also
    when it works through many row blocks."""
    monkeypatch.setattr(head, "_BLOCK_ELEMENTS", 7 * 24)  # blocks of 7 rows
    length, hidden, pairs = 10, 24, 23
    modules = torch.nn.ModuleList([
        torch.nn.BatchNorm1d(1, momentum=momentum), torch.nn.Linear(length, hidden),
        torch.nn.BatchNorm1d(hidden, momentum=momentum), torch.nn.Linear(hidden, 1),
    ]).double().train(training)
    randomize_batchnorms(modules, rng)
    q_best = torch.randn(pairs, length, generator=rng, dtype=torch.float64)
    g_best = torch.randn(pairs, length, generator=rng, dtype=torch.float64)
    weight = torch.randn(pairs, 1, generator=rng, dtype=torch.float64)

    def ours(m, q, g):
        return head.matching_head(q, g, m[0], m[1], m[2], m[3])

    def upstream(m, q, g):  # reference doc §1.3, the lines after the max pooling
        rows = m[0](torch.cat((q, g), dim=-1).view(-1, 1, length)).view(-1, length)
        return m[3](torch.relu(m[2](m[1](rows)))).view(-1, 2).sum(-1, keepdim=True)

    for _ in range(2):  # twice: the running statistics must compound the same way
        expected_modules = copy.deepcopy(modules)
        expected = run_step(upstream, expected_modules, (q_best, g_best), weight)
        actual = run_step(ours, modules, (q_best, g_best), weight)
        assert_same(actual, expected, 1e-10)


def test_transmatcher_state_dict_is_upstreams():
    matcher = tmf.TransMatcher(192)  # upstream's defaults: d_model 512, 3 layers, FF 2048
    layout = [(k, tuple(v.shape)) for k, v in matcher.state_dict().items()]
    assert layout == upstream_layouts.transmatcher(192, 512, 3, 2048)
    per_layer = sum(p.numel() for p in matcher.decoder_layer.parameters())
    assert per_layer == 700_933  # reference doc §1.3


def test_transmatcher_initialisation_is_upstreams():
    torch.manual_seed(0)
    length, d_model = 192, 512
    matcher = tmf.TransMatcher(length)
    embeds = [layer.score_embed.detach()[0, 0] for layer in
              [matcher.decoder_layer, *matcher.decoder.layers]]
    bound = 3 ** 0.5 / length  # xavier_uniform_ over fan_in = fan_out = L*L
    for e in embeds:
        assert e.abs().max() <= bound and e.abs().max() > 0.95 * bound
        assert not torch.allclose(e, e.T)  # the symmetric start was overwritten
    assert not torch.equal(embeds[1], embeds[2])  # independent copies
    layer = matcher.decoder.layers[0]
    assert layer.fc1.weight.abs().max() <= (6 / (2 * d_model)) ** 0.5
    assert layer.fc1.bias.abs().max() <= 1 / d_model ** 0.5  # Linear default kept
    assert layer.fc2.bias.abs().max() <= 1 / length ** 0.5
    for bn in (layer.bn1, layer.bn2, layer.bn3, matcher.decoder.norm):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
        assert torch.all(bn.running_var == 1) and int(bn.num_batches_tracked) == 0


def test_transmatcher_errors_name_arguments():
    matcher = tmf.TransMatcher(35, D_MODEL, LAYERS, DIM_FF)
    with pytest.raises(RuntimeError, match="make_kernel"):
        matcher(torch.randn(2, 7, 5, LAYERS * D_MODEL))
    matcher.make_kernel(torch.randn(2, 7, 5, LAYERS * D_MODEL))
    with pytest.raises(ValueError, match=r"memory \(gallery\).*\(3, 7, 5, 40\)"):
        matcher(torch.randn(3, 7, 5, 40))
    with pytest.raises(ValueError, match=r"seq_len = 35.*\(3, 6, 5, 16\)"):
        matcher(torch.randn(3, 6, 5, LAYERS * D_MODEL))
    with pytest.raises(ValueError, match="seq_len"):
        tmf.TransMatcher(0)
    with pytest.raises(ValueError, match="chunk"):
        matcher.eval().match(torch.randn(2, 7, 5, 48), torch.randn(3, 7, 5, 48), chunk=0)


@pytest.mark.parametrize("same", [False, True], ids=["probe-gallery", "batch-vs-itself"])
def test_match_equals_protocol(same, rng):
    matcher = new_transmatcher(7, 5, rng, torch.float64, training=False)
    probe = torch.randn(6, 7, 5, LAYERS * D_MODEL, generator=rng, dtype=torch.float64)
    gallery = probe if same else torch.randn(11, 7, 5, LAYERS * D_MODEL, generator=rng,
                                             dtype=torch.float64)
    expected = protocol(matcher, probe, gallery)
    for chunk in (3, 1, None):  # 3 leaves a ragged last chunk; None sizes it from free memory
        torch.testing.assert_close(matcher.match(probe, gallery, chunk=chunk), expected,
                                   rtol=1e-12, atol=1e-12)
    # Gradients flow through match too.
    weight = torch.randn(expected.shape, generator=rng, dtype=torch.float64)
    expected_grads = run_step(protocol, copy.deepcopy(matcher), (probe, gallery), weight)
    actual_grads = run_step(lambda m, p, g: m.match(p, g, chunk=4), copy.deepcopy(matcher),
                            (probe, gallery), weight)
    assert_same(actual_grads, expected_grads, 1e-10)


def test_match_in_training_mode_is_one_pass(rng):
    """BatchNorm batch statistics span all pairs, so match() must not chunk in training mode."""
    matcher = new_transmatcher(7, 5, rng, torch.float64, training=True)
    probe = torch.randn(4, 7, 5, LAYERS * D_MODEL, generator=rng, dtype=torch.float64)
    gallery = torch.randn(6, 7, 5, LAYERS * D_MODEL, generator=rng, dtype=torch.float64)
    expected = protocol(copy.deepcopy(matcher), probe, gallery)
    torch.testing.assert_close(matcher.match(probe, gallery, chunk=2), expected,
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# QAConv


def qaconv_features(n, c, h, w, rng, dtype):
    # The QAConv feature model L2-normalises every location.
    return F.normalize(torch.randn(n, c, h, w, generator=rng, dtype=torch.float64), dim=1).to(dtype)


def new_qaconv(c, h, w, rng, training):
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=rng)))
    matcher = tmf.QAConv(c, h, w).double()
    randomize_batchnorms(matcher, rng)
    with torch.no_grad():  # a learned, non-uniform head, so that a swapped direction shows
        matcher.fc.weight.add_(0.01 * torch.randn(matcher.fc.weight.shape, generator=rng,
                                                  dtype=torch.float64))
    return matcher.train(training)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("hw", MAPS, ids=lambda hw: f"{hw[0]}x{hw[1]}")
@pytest.mark.parametrize("api", ["make_kernel", "two_argument", "match"])
def test_qaconv_matches_upstream(api, hw, training, dtype, rng, monkeypatch):
    h, w = hw
    c = 16
    matcher = new_qaconv(c, h, w, rng, training)
    probe, gallery = (qaconv_features(n, c, h, w, rng, torch.float64) for n in (5, 4))
    weight = torch.randn(5, 4, generator=rng, dtype=torch.float64)
    expected = run_step(reference.qaconv_scores, copy.deepcopy(matcher), (probe, gallery), weight)
    fn = {"make_kernel": protocol,
          "two_argument": lambda m, p, g: m(p, g),
          "match": lambda m, p, g: m.match(p, g, chunk=3)}[api]
    argmax = record_argmax(monkeypatch, qaconv_module)
    actual = run_step(fn, copy.deepcopy(matcher).to(dtype), (probe.to(dtype), gallery.to(dtype)),
                      weight)
    # match() scores the gallery in chunks: one call per chunk, joined along the gallery axis.
    indices = tuple(torch.cat(parts, dim=1) for parts in zip(*argmax))
    routed = run_step(functools.partial(reference.qaconv_scores, indices=indices),
                      copy.deepcopy(matcher), (probe, gallery), weight)
    assert_same_as_routed_reference(actual, expected, routed, RTOL[dtype])


def test_qaconv_state_dict_and_initialisation_are_upstreams():
    matcher = tmf.QAConv(128, 24, 8)
    layout = [(k, tuple(v.shape)) for k, v in matcher.state_dict().items()]
    assert layout == upstream_layouts.qaconv(128, 24, 8)
    assert torch.all(matcher.fc.weight == 1 / 192)
    assert matcher.fc.bias.abs().max() <= 1 / 192 ** 0.5
    with pytest.raises(ValueError, match=r"probe must be \[n, num_features, height, width\]"):
        matcher(torch.randn(2, 128, 24, 7), torch.randn(2, 128, 24, 8))
    with pytest.raises(RuntimeError, match="make_kernel"):
        matcher(torch.randn(2, 128, 24, 8))


# ---------------------------------------------------------------------------------------------
# QAConv feature-model neck: 2.0 (conv without bias + neck_bn) and 2.1+ (conv with bias, no BN)


def upstream_qaconv_checkpoint(rng, version, neck=64):
    """A synthetic upstream QAConv checkpoint: ResNet-18 to layer3 (256 channels), a neck in the
    given layout, a 4x2 QAConv matcher; QAConv 2.1's main.py also saves the adaptive-schedule state."""
    model = [("base." + k, s) for k, s in upstream_layouts.resnet(18)]
    model += upstream_layouts.qaconv_neck(256, neck, version)
    checkpoint = {
        "model": upstream_layouts.random_state(model, rng),
        "criterion": {"matcher." + k: v for k, v in upstream_layouts.random_state(
            upstream_layouts.qaconv(neck, 4, 2), rng).items()},
        "optim": {}, "epoch": 7,
    }
    if version == "2.1":
        checkpoint.update(final_epochs=12, base_loss=3.5, lr_stepped=True)
    return checkpoint


@pytest.mark.parametrize("version", ["2.0", "2.1"])
def test_qaconv_neck_layout_is_detected_from_the_keys(version, rng):
    from transmatcher_fast.models.upstream_checkpoint import qaconv_neck_layout
    state = upstream_qaconv_checkpoint(rng, version)["model"]
    assert qaconv_neck_layout(state) == version
    assert qaconv_neck_layout({"module." + k: v for k, v in state.items()}) == version
    assert qaconv_neck_layout({k: v for k, v in state.items() if "neck" not in k}) is None
    mixed = dict(state, **{"neck_conv.bias": torch.zeros(64)} if version == "2.0"
                 else {"neck_bn.weight": torch.ones(64)})
    with pytest.raises(ValueError, match=r"'neck_conv\.bias'.*'neck_bn\.|neither QAConv 2\.0"):
        qaconv_neck_layout(mixed, "x.pth")
    with pytest.raises(ValueError, match="x.pth"):
        qaconv_neck_layout(mixed, "x.pth")


def test_set_qaconv_neck_layout_gives_upstreams_keys():
    from transmatcher_fast.models.matcher_features import set_qaconv_neck_layout
    from transmatcher_fast.models import QAConvFeatures
    model = QAConvFeatures(18, None, "layer3", 64)
    neck_keys = lambda m: [(k, tuple(v.shape)) for k, v in m.state_dict().items()  # noqa: E731
                           if k.startswith("neck")]
    assert neck_keys(model) == upstream_layouts.qaconv_neck(256, 64, "2.0")  # our default
    assert set_qaconv_neck_layout(model, "2.1") is model and model.neck_layout == "2.1"
    assert neck_keys(model) == upstream_layouts.qaconv_neck(256, 64, "2.1")
    set_qaconv_neck_layout(model.double(), "2.0")
    assert neck_keys(model) == upstream_layouts.qaconv_neck(256, 64, "2.0")
    assert model.neck_conv.weight.dtype == model.neck_bn.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="layout"):
        set_qaconv_neck_layout(model, "2.2")
    with pytest.raises(ValueError, match="no neck"):
        set_qaconv_neck_layout(QAConvFeatures(18, None, "layer3", 0), "2.1")
    with pytest.raises(TypeError, match="QAConvFeatures"):
        set_qaconv_neck_layout(tmf.QAConv(8, 2, 2), "2.1")


@pytest.mark.parametrize("version", ["2.0", "2.1"])
def test_load_upstream_qaconv_checkpoint_of_either_neck_layout(tmp_path, rng, version):
    checkpoint = upstream_qaconv_checkpoint(rng, version)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(checkpoint, path)
    model, matcher = tmf.load_upstream_checkpoint(str(path), height=64, width=32)
    own = model.state_dict()
    expected = {k for k in checkpoint["model"] if not k.startswith(("base.layer4.", "base.fc."))}
    assert set(own) == expected  # exactly the file's keys (minus the unused stages)
    for key, value in own.items():
        assert torch.equal(value, checkpoint["model"][key]), key
    # The feature model computes upstream's resmap forward for that layout.
    model.eval()
    images = torch.rand(2, 3, 64, 32, generator=rng)
    with torch.no_grad():
        x = model.base(images)
        state = checkpoint["model"]
        x = F.conv2d(x, state["neck_conv.weight"], state.get("neck_conv.bias"), padding=1)
        if version == "2.0":
            x = F.batch_norm(x, state["neck_bn.running_mean"], state["neck_bn.running_var"],
                             state["neck_bn.weight"], state["neck_bn.bias"], training=False)
        torch.testing.assert_close(model(images), F.normalize(x), rtol=1e-5, atol=1e-6)
        features = model(images)
        matcher.eval()
        torch.testing.assert_close(matcher(features, features),
                                   reference.qaconv_scores(matcher, features, features),
                                   rtol=1e-5, atol=1e-5)
