"""``transmatcher-fast export --format onnx``: every method's features.onnx (and the fused
matchers' matcher.onnx) against PyTorch through onnxruntime, the dynamic batch axis, the custom
op's contract, export.json, and bad input. Tiny random models; nothing is downloaded."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

from helpers import one_line_error
from transmatcher_fast import cli, weights_io
from transmatcher_fast.cli import build_parser
from transmatcher_fast.engine import onnx_export
from transmatcher_fast.engine.evaluate import load_trained
from transmatcher_fast.engine.trainer import TrainConfig
from transmatcher_fast.methods import get_method

onnx = pytest.importorskip("onnx", reason="ONNX export tests need onnx (pip install onnx)")
pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (pip install onnxscript)")
ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime (pip install onnxruntime)")

HEIGHT, WIDTH = 64, 32
# A tiny model of each method (64 x 32 images; a ViT's stride-16 grid is 4 x 2 patches).
TINY = {
    "transmatcher": ["--method", "transmatcher", "-a", "resnet18", "--ibn", "none", "--neck", "16",
                     "--num-trans-layers", "2", "--dim-feedforward", "32"],
    "qaconv": ["--method", "qaconv", "-a", "resnet18", "--ibn", "none", "--neck", "16",
               "--loss", "triplet"],
    "transreid_jpm": ["--method", "transreid", "-a", "vit_tiny_patch16", "--jpm", "--sie-camera",
                      "--divide-length", "2"],
    "transreid": ["--method", "transreid", "-a", "vit_tiny_patch16"],
    "vit_tokens": ["--method", "transmatcher", "-a", "vit_tiny_patch16", "--num-trans-layers", "2",
                   "--dim-feedforward", "32"],
    "dino": ["--method", "dino", "-a", "vit_tiny_patch16"],
}
FUSED = ("transmatcher", "qaconv", "vit_tokens")
# matcher.onnx's loop blocks: small, so that the sizes below cross block boundaries.
BLOCKS = ["--query-block", "2", "--gallery-block", "3"]


def write_checkpoint(kind: str, path) -> None:
    """A checkpoint as ``train`` writes it, of a random model with non-trivial BN statistics."""
    args = build_parser().parse_args(["train", "--height", str(HEIGHT), "--width", str(WIDTH),
                                      "--pretrained", "none", *TINY[kind]])
    values = {k: v for k, v in vars(args).items() if k not in ("command", "run", "config")}
    if kind == "dino":
        values["dino_out_dim"] = 64  # the pre-training head, not exported: kept small
    config = TrainConfig.from_dict(values)
    model_args = {"num_classes": 5, "camera_num": 3, "view_num": 0}
    torch.manual_seed(0)
    parts = get_method(config.method).build(config, model_args, pretrained=False)
    for part in parts.values():
        for module in part.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    torch.save({"config": dataclasses.asdict(config), "model_args": model_args,
                **{name: part.state_dict() for name, part in parts.items()}}, path)


def session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3  # no notes about shared initialisers
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def rel(actual, expected) -> float:
    """The largest difference at the scale of the values."""
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.abs(np.asarray(actual, dtype=np.float64) - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """kind -> (checkpoint, export folder, export.json); qaconv through the command line."""
    cache = {}

    def get(kind):
        if kind not in cache:
            root = tmp_path_factory.mktemp(kind)
            checkpoint, out = root / "checkpoint.pt", root / "onnx"
            write_checkpoint(kind, checkpoint)
            if kind == "qaconv":
                assert cli.main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out",
                                 str(out), "--dynamic-batch", *BLOCKS]) == 0
            else:
                onnx_export.export_onnx(checkpoint, out, dynamic_batch=True, query_block=2, gallery_block=3)
            cache[kind] = (checkpoint, out, json.loads((out / "export.json").read_text()))
        return cache[kind]
    return get


@pytest.mark.parametrize("kind", list(TINY))
def test_features_and_scores_equal_pytorch(kind, exported):
    checkpoint, out, record = exported(kind)
    model, matcher, config = load_trained(checkpoint)
    features_session = session(out / "features.onnx")
    names = [i.name for i in features_session.get_inputs()]
    generator = torch.Generator().manual_seed(3)
    features = None
    for batch in (1, 3):  # two batch sizes through one session: the batch axis is dynamic
        images = torch.rand(batch, 3, HEIGHT, WIDTH, generator=generator)
        cams = torch.randint(0, 3, (batch,), generator=generator)
        feeds = {"images": images.numpy()}
        side = {}
        if record["side_inputs"]:
            side = {"cam_label": cams, "view_label": torch.zeros_like(cams)}
            feeds.update({n: side[n].numpy() for n in names if n != "images"})
        with torch.no_grad():
            features = model(images, **side)
        actual = features_session.run(None, feeds)[0]
        assert actual.shape == tuple(features.shape)
        assert rel(actual, features) < 1e-4, kind
    assert ("matcher.onnx" in record["files"]) == (kind in FUSED)
    if kind not in FUSED:
        return
    scores_session = session(out / "matcher.onnx")
    for num_query, num_gallery in ((1, 1), (2, 3), (3, 7), (5, 4)):  # partial and whole blocks
        query = torch.randn(num_query, *features.shape[1:], generator=generator)
        gallery = torch.randn(num_gallery, *features.shape[1:], generator=generator)
        with torch.no_grad():
            expected = matcher.match(query, gallery)
        actual = scores_session.run(None, {"query": query.numpy(), "gallery": gallery.numpy()})[0]
        assert actual.shape == (num_query, num_gallery)
        assert rel(actual, expected) < 1e-4, (kind, num_query, num_gallery)


def test_matcher_graph_is_standard_ops_in_loops(exported):
    _, out, record = exported("transmatcher")
    ops = record["files"]["matcher.onnx"]["ops"]
    assert ops["Loop"] == 2 and ops["MatMul"] >= 2 and ops["ReduceMax"] >= 4
    assert not [op for op in ops if "::" in op]  # no custom domain: any runtime runs it
    model = onnx.load(str(out / "matcher.onnx"))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["query", "gallery"]
    assert [o.name for o in model.graph.output] == ["scores"]


def test_export_json_says_how_to_feed_the_model(exported):
    checkpoint, out, record = exported("transreid_jpm")
    assert record["method"] == "transreid" and record["opset"] == onnx_export.DEFAULT_OPSET
    assert record["input"]["mean"] == [0.5, 0.5, 0.5] and record["input"]["std"] == [0.5, 0.5, 0.5]
    assert record["input"]["value_range"] == [0.0, 1.0]
    assert record["input"]["resize"] == {"height": HEIGHT, "width": WIDTH, "interpolation": "bilinear"}
    assert record["input"]["shape"] == ["batch", 3, HEIGHT, WIDTH]
    assert record["side_inputs"] == ["cam_label", "view_label"]
    assert record["checkpoint"]["sha256"] == weights_io.file_sha256(checkpoint)
    assert record["versions"]["torch"] == str(torch.__version__)
    assert set(record["files"]) == {"features.onnx"}
    for name, info in record["files"].items():
        assert info["bytes"] == (out / name).stat().st_size
    matcher_record = exported("qaconv")[2]
    assert matcher_record["input"]["mean"] == [0.0, 0.0, 0.0] and matcher_record["method"] == "qaconv"
    assert matcher_record["input"]["resize"]["interpolation"] == "bicubic"


class _MaxSimForTheReferenceEvaluator:
    """The custom op's contract, in NumPy, as a runtime plugin would implement it."""

    @staticmethod
    def op():
        from onnx.reference.op_run import OpRun

        class MaxSim(OpRun):
            op_domain = "transmatcher_fast"

            def _run(self, query, gallery, score_embed=None):
                scores = np.einsum("itd,jsd->ijst", query, gallery)
                if score_embed is not None:
                    scores = scores * (1.0 / (1.0 + np.exp(-score_embed)))
                return (scores.max(2).astype(np.float32), scores.max(3).astype(np.float32),
                        scores.argmax(2).astype(np.int32), scores.argmax(3).astype(np.int32))

        MaxSim.__name__ = "max_sim"
        return MaxSim


def test_custom_op_export_keeps_one_node_of_the_documented_contract(tmp_path, capsys):
    from onnx.reference import ReferenceEvaluator

    checkpoint = tmp_path / "checkpoint.pt"
    write_checkpoint("transmatcher", checkpoint)
    out = tmp_path / "onnx"
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--custom-op",
                     *BLOCKS]) == 0
    assert "matcher.onnx" in capsys.readouterr().out
    record = json.loads((out / "export.json").read_text())
    assert record["custom_op"] and record["input"]["shape"] == [1, 3, HEIGHT, WIDTH]
    ops = record["files"]["matcher.onnx"]["ops"]
    assert ops["transmatcher_fast::max_sim"] == 2 and "ReduceMax" not in ops  # one per layer
    model = onnx.load(str(out / "matcher.onnx"))
    nodes = [n for body in _bodies(model.graph) for n in body.node if n.domain == "transmatcher_fast"]
    assert all(len(n.input) == 3 and len(n.output) == 4 and n.op_type == "max_sim" for n in nodes)
    assert any(o.domain == "transmatcher_fast" and o.version == 1 for o in model.opset_import)
    # A runtime with the op (here onnx's reference evaluator and a NumPy plugin) gives the scores.
    _, matcher, _ = load_trained(checkpoint)
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(3, 4, 2, 32, generator=generator)
    gallery = torch.randn(4, 4, 2, 32, generator=generator)
    evaluator = ReferenceEvaluator(model, new_ops=[_MaxSimForTheReferenceEvaluator.op()])
    actual = evaluator.run(None, {"query": query.numpy(), "gallery": gallery.numpy()})[0]
    with torch.no_grad():
        assert rel(actual, matcher.match(query, gallery)) < 1e-4
    # features.onnx has a fixed batch without --dynamic-batch.
    features = session(out / "features.onnx")
    assert features.get_inputs()[0].shape == [1, 3, HEIGHT, WIDTH]


def _bodies(graph):
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.g.node:
                yield from _bodies(attribute.g)


def test_bad_input_is_one_line_before_any_export(tmp_path, exported, monkeypatch):
    checkpoint = exported("qaconv")[0]
    out = tmp_path / "out"
    assert "no such file" in one_line_error(["export", "--checkpoint", tmp_path / "missing.pt", "--out", out])
    (tmp_path / "notes.txt").write_text("not weights\n")
    assert "not a checkpoint" in one_line_error(["export", "--checkpoint", tmp_path / "notes.txt",
                                                 "--out", out])
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    message = one_line_error(["export", "--checkpoint", tmp_path / "other.pt", "--out", out])
    assert "neither a transmatcher-fast checkpoint" in message and "weights" in message
    message = one_line_error(["export", "--checkpoint", checkpoint, "--out", out, "--opset", "12"])
    assert "--opset 12: unsupported; choose 18 to" in message
    (tmp_path / "file").write_text("")
    assert "is a file, not a folder" in one_line_error(["export", "--checkpoint", checkpoint,
                                                        "--out", tmp_path / "file"])
    for package in ("onnx", "onnxscript"):
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, package, None)  # as if it were not installed
            message = one_line_error(["export", "--checkpoint", checkpoint, "--out", out])
        assert f"the {package} package is not installed" in message, message
        assert "pip install onnx onnxscript" in message
    assert not out.exists()
    with pytest.raises(SystemExit) as info:
        cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--format", "tensorrt"])
    assert info.value.code == 2


def test_export_help_names_every_option_and_its_default(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["export", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--checkpoint", "--format {onnx}", "--out", "--opset", "--dynamic-batch", "--custom-op",
                   "--batch-size", "--query-block", "--gallery-block"):
        assert option in text, option
    assert f"(default: {onnx_export.DEFAULT_OPSET})" in text and "(default: onnx)" in text
