"""Feature models (torchvision / IBN-Net-b backbones, neck, multi-level encoder), build_model,
pretrained-weight loading and upstream checkpoint loading."""

from __future__ import annotations

import pytest
import torch

import transmatcher_fast as tmf
from transmatcher_fast import reference
from transmatcher_fast.models import QAConvFeatures, ResNet, TransMatcherFeatures

import upstream_layouts


def layout(module):
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


@pytest.mark.parametrize("height", [384, 256])
def test_default_model_shapes(height):
    """Upstream's default: ResNet-50-IBN-b to layer3, neck 512, 2 encoder layers, 3 levels."""
    model, matcher = tmf.build_model(height=height)
    model.eval()
    with torch.no_grad():
        features = model(torch.rand(2, 3, height, 128))
    assert features.shape == (2, height // 16, 8, 3 * 512)
    assert matcher.seq_len == height // 16 * 8 and matcher.d_model == 512
    assert len(matcher.decoder.layers) == 3 and len(model.encoder.layers) == 2
    # Level 0 is the neck output itself, channels-last.
    with torch.no_grad():
        neck = model.neck_conv(model.base(torch.rand(1, 3, height, 128)))
    assert neck.shape == (1, 512, height // 16, 8)
    encoder_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("base."))
    assert abs(encoder_params - 11.0e6) < 0.1e6  # reference doc §1.4: ~4.72M + 2 x 3.15M


def test_features_are_neck_then_each_encoder_layer(rng):
    torch.manual_seed(0)
    model = TransMatcherFeatures(depth=18, ibn=None, final_layer="layer2", neck=16,
                                 num_encoder_layers=2, dim_feedforward=32).eval()
    images = torch.rand(2, 3, 64, 32, generator=rng)
    with torch.no_grad():
        out = model(images)
        x = model.neck_conv(model.base(images))  # [2, 16, 8, 4]
        seq = x.flatten(2).permute(2, 0, 1)
        e1 = model.encoder.layers[0](seq)
        e2 = model.encoder.layers[1](e1)
    assert out.shape == (2, 8, 4, 48)
    torch.testing.assert_close(out[..., :16], x.permute(0, 2, 3, 1))
    torch.testing.assert_close(out[..., 16:32], e1.permute(1, 0, 2).reshape(2, 8, 4, 16))
    torch.testing.assert_close(out[..., 32:], e2.permute(1, 0, 2).reshape(2, 8, 4, 16))


@pytest.mark.parametrize("depth", [18, 34])
@pytest.mark.parametrize("final_layer,channels,stride", [("layer2", 128, 8), ("layer3", 256, 16),
                                                         ("layer4", 512, 32)])
def test_backbone_stages(depth, final_layer, channels, stride):
    base = ResNet(depth, None, final_layer).eval()
    with torch.no_grad():
        out = base(torch.rand(1, 3, 128, 64))
    assert out.shape == (1, channels, 128 // stride, 64 // stride)


@pytest.mark.parametrize("depth,ibn", [(18, None), (34, None), (50, None), (50, "b")])
def test_backbone_layout_is_torchvisions_or_ibnnets(depth, ibn):
    full = upstream_layouts.resnet(depth, ibn)
    assert layout(ResNet(depth, ibn, "layer4")) == [kv for kv in full if not kv[0].startswith("fc.")]
    assert layout(ResNet(depth, ibn, "layer3")) == [
        kv for kv in full if not kv[0].startswith(("fc.", "layer4."))]


def test_qaconv_feature_model(rng):
    model, matcher = tmf.build_model("resnet18", ibn=None, matcher="qaconv", height=128, width=64)
    assert isinstance(model, QAConvFeatures) and isinstance(matcher, tmf.QAConv)
    with torch.no_grad():
        features = model.eval()(torch.rand(2, 3, 128, 64, generator=rng))
    assert features.shape == (2, 128, 8, 4)  # neck 128, channels-first
    torch.testing.assert_close(features.norm(dim=1), torch.ones(2, 8, 4))
    assert (matcher.num_features, matcher.height, matcher.width) == (128, 8, 4)
    assert matcher(features, features).shape == (2, 2)


def test_build_model_errors_name_arguments():
    with pytest.raises(ValueError, match="arch"):
        tmf.build_model("resnet42")
    with pytest.raises(ValueError, match="ibn"):
        tmf.build_model(ibn="a")
    with pytest.raises(ValueError, match="final_layer"):
        tmf.build_model(final_layer="layer5")
    with pytest.raises(ValueError, match="matcher"):
        tmf.build_model(matcher="vit")
    with pytest.raises(ValueError, match="height"):
        tmf.build_model(height=0)


# ---------------------------------------------------------------------------------------------
# Pretrained weights from a local file


@pytest.mark.parametrize("depth,ibn", [(18, None), (18, "b")])
def test_pretrained_round_trip(depth, ibn, tmp_path, rng):
    """A file with torchvision's (IBN-Net's) key names and shapes loads into the backbone; the
    stages after final_layer and fc are skipped."""
    state = upstream_layouts.random_state(upstream_layouts.resnet(depth, ibn), rng)
    path = tmp_path / "resnet.pth"
    torch.save(state, path)
    model, _ = tmf.build_model(f"resnet{depth}", ibn=ibn, neck=16, num_trans_layers=1,
                               dim_feedforward=16, pretrained=str(path))
    loaded = model.base.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith(("fc.", "layer4."))}
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    # A DataParallel-style prefix is accepted too.
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    ResNet(depth, ibn, "layer3").load_pretrained(str(path))


def test_pretrained_wrong_file_errors(tmp_path, rng):
    state = upstream_layouts.random_state(upstream_layouts.resnet(18), rng)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"resnet18\.pth.*ResNet-34.*missing keys.*layer1\.2\."):
        ResNet(34, None, "layer3").load_pretrained(str(path))
    with pytest.raises(ValueError, match=r"resnet18\.pth.*IBN-b.*unexpected keys.*bn1\.running_mean"):
        ResNet(18, "b", "layer3").load_pretrained(str(path))
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"shape mismatches.*layer1\.0\.conv1\.weight"):
        ResNet(18, None, "layer3").load_pretrained(str(path))
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        ResNet(18, None, "layer3").load_pretrained(str(path))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        ResNet(18, None, "layer3").load_pretrained(str(tmp_path / "missing.pth"))


# ---------------------------------------------------------------------------------------------
# Upstream checkpoints


def upstream_transmatcher_checkpoint(rng, ibn, prefix=""):
    """An upstream-format checkpoint of a small configuration: ResNet-18 (full network, as
    upstream saves it), neck 32, 1 encoder layer, 2 decoder layers, FF 48, 64x32 images."""
    model = upstream_layouts.resnet(18, ibn)
    model = [("base." + k, s) for k, s in model]
    model += [("neck_conv.weight", (32, 256, 3, 3)), ("neck_conv.bias", (32,))]
    encoder_layer = torch.nn.TransformerEncoderLayer(32, 1, 48, 0.0)
    model += [("encoder.layers.0." + k, tuple(v.shape)) for k, v in encoder_layer.state_dict().items()]
    matcher = upstream_layouts.transmatcher(seq_len=8, d_model=32, num_decoder_layers=2,
                                            dim_feedforward=48)
    return {
        "model": {prefix + k: v for k, v in upstream_layouts.random_state(model, rng).items()},
        "criterion": {"matcher." + k: v for k, v in
                      upstream_layouts.random_state(matcher, rng).items()},
        "optim": {"state": {}, "param_groups": [{"lr": 0.005, "momentum": 0.9, "params": [0, 1]}]},
        "epoch": 14,
    }


@pytest.mark.parametrize("ibn,prefix", [(None, ""), ("b", "module.")])
def test_load_upstream_transmatcher_checkpoint(ibn, prefix, tmp_path, rng):
    checkpoint = upstream_transmatcher_checkpoint(rng, ibn, prefix)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(checkpoint, path)
    model, matcher = tmf.load_upstream_checkpoint(str(path), height=64, width=32)
    assert isinstance(model, TransMatcherFeatures) and isinstance(matcher, tmf.TransMatcher)
    assert (model.depth, model.final_layer, model.neck, model.num_features) == (18, "layer3", 32, 32)
    assert model.base.ibn == ibn
    saved = {k[len(prefix):]: v for k, v in checkpoint["model"].items()}
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    for key, value in matcher.state_dict().items():
        assert torch.equal(value, checkpoint["criterion"]["matcher." + key]), key
    # The loaded pair runs end to end and scores like upstream's materialised matcher.
    model.eval(), matcher.eval()
    with torch.no_grad():
        features = model(torch.rand(3, 3, 64, 32, generator=rng))
        assert features.shape == (3, 4, 2, 64)
        matcher.make_kernel(features)
        torch.testing.assert_close(matcher(features),
                                   reference.transmatcher_scores(matcher, features, features),
                                   rtol=1e-5, atol=1e-5)


def test_load_upstream_qaconv_checkpoint(tmp_path, rng):
    model = [("base." + k, s) for k, s in upstream_layouts.resnet(18)]
    model += [("neck_conv.weight", (64, 256, 3, 3)), *upstream_layouts.batchnorm("neck_bn", 64)]
    checkpoint = {
        "model": upstream_layouts.random_state(model, rng),
        "criterion": {"matcher." + k: v for k, v in upstream_layouts.random_state(
            upstream_layouts.qaconv(64, 4, 2), rng).items()},
        "optim": {}, "epoch": 3,
    }
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(checkpoint, path)
    model, matcher = tmf.load_upstream_checkpoint(str(path), height=64, width=32)
    assert isinstance(model, QAConvFeatures) and isinstance(matcher, tmf.QAConv)
    assert (matcher.num_features, matcher.height, matcher.width) == (64, 4, 2)
    for key, value in matcher.state_dict().items():
        assert torch.equal(value, checkpoint["criterion"]["matcher." + key]), key
    with pytest.raises(ValueError, match="height= and width="):
        tmf.load_upstream_checkpoint(str(path))  # 384x128 images do not give a 4x2 map


def test_load_upstream_checkpoint_errors(tmp_path, rng):
    checkpoint = upstream_transmatcher_checkpoint(rng, None)
    del checkpoint["criterion"]["matcher.decoder.layers.1.fc3.bias"]
    checkpoint["model"]["extra.weight"] = torch.zeros(1)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"checkpoint\.pth\.tar.*'model'.*unexpected keys.*extra\.weight"):
        tmf.load_upstream_checkpoint(str(path))
    del checkpoint["model"]["extra.weight"]
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"matcher.*missing keys.*decoder\.layers\.1\.fc3\.bias"):
        tmf.load_upstream_checkpoint(str(path))
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not in upstream's format"):
        tmf.load_upstream_checkpoint(str(path))
    with pytest.raises(FileNotFoundError):
        tmf.load_upstream_checkpoint(str(tmp_path / "missing.pth.tar"))


@pytest.mark.parametrize("layout", ["2.0", "2.1"])
def test_qaconv_neck_layout_argument(layout, rng):
    from transmatcher_fast.models import qaconv_neck_layout, set_qaconv_neck_layout

    assert set_qaconv_neck_layout is tmf.models.matcher_features.set_qaconv_neck_layout
    model, matcher = tmf.build_model("resnet18", ibn=None, matcher="qaconv", height=64, width=32,
                                     neck=16, neck_layout=layout)
    assert model.neck_layout == layout
    keys = set(model.state_dict())
    assert qaconv_neck_layout(model.state_dict()) == layout
    if layout == "2.1":
        assert "neck_conv.bias" in keys and not any(k.startswith("neck_bn.") for k in keys)
        assert isinstance(model.neck_bn, torch.nn.Identity)
    else:
        assert "neck_conv.bias" not in keys and "neck_bn.running_mean" in keys
    with torch.no_grad():
        features = model.eval()(torch.rand(2, 3, 64, 32, generator=rng))
    assert features.shape == (2, 16, 4, 2)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(2, 4, 2))
    # The same keys as a model set to the layout afterwards: a state_dict moves between them.
    direct = QAConvFeatures(18, None, "layer3", 16, neck_layout=layout)
    direct.load_state_dict(model.state_dict())
    assert QAConvFeatures(18, None, "layer3", 0, neck_layout=layout).neck_layout is None


def test_qaconv_neck_layout_errors():
    with pytest.raises(ValueError, match="neck_layout"):
        QAConvFeatures(18, None, "layer3", 16, neck_layout="2.2")
    with pytest.raises(ValueError, match="neck_layout"):
        tmf.build_model("resnet18", ibn=None, matcher="transmatcher", neck_layout="2.1")


def test_load_trained_reads_the_qaconv_neck_layout(tmp_path):
    from transmatcher_fast.engine import checkpoint as checkpoints
    from transmatcher_fast.engine.evaluate import load_trained

    config = dict(arch="resnet18", ibn=None, final_layer="layer3", neck=16, nhead=1, num_trans_layers=1,
                  dim_feedforward=32, dropout=0.0, height=64, width=32, matcher="qaconv")
    for layout in ("2.0", "2.1"):
        model, matcher = tmf.build_model(**config, neck_layout=layout)
        path = checkpoints.save_atomic({"model": model.state_dict(), "matcher": matcher.state_dict(),
                                        "config": config}, tmp_path / f"{layout}.pt")
        loaded, _, got = load_trained(path)
        assert loaded.neck_layout == layout and got["neck_layout"] == layout
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
