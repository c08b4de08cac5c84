"""ONNX export of a trained checkpoint: ``features.onnx``, ``matcher.onnx`` and ``export.json``.

- ``features.onnx``: input ``images [N, 3, H, W]`` float32, normalised as the model's evaluation
  transform does; output ``features``, what the model returns in eval mode. A model that takes
  side information (TransReID's SIE) has the int64 ``[N]`` inputs ``cam_label`` and
  ``view_label`` too.
- ``matcher.onnx`` (a matcher with ``match(query, gallery)``: the fused ones): inputs ``query``
  and ``gallery`` (features as ``features.onnx`` gives them), output ``scores [Nq, Ng]`` =
  ``matcher.match(query, gallery)``. One ``query_block x gallery_block`` block of pairs is
  exported for fixed sizes, the fused op decomposed (``ops.decomposed``: matmul, gate, max), and
  ``onnx_loop`` runs it in ONNX ``Loop``s over any ``Nq``, ``Ng`` in memory bounded by the block.
  With ``custom_op`` the op stays one node ``transmatcher_fast::max_sim`` (:func:`max_sim_schema`;
  for a runtime with a plugin).
- ``export.json``: the input size and normalisation, opset, method, the checkpoint's SHA-256,
  package / torch / onnx versions, each file's inputs, outputs, op counts and size.

The exporter is torch's torch.export-based one (``dynamo=True``, which needs ``onnxscript``).
The TorchScript-based one (``dynamo=False``) is still there in torch 2.13 but traced
TransMatcher's scoring head (an autograd Function filling row blocks in place) into constants:
a graph that ignores its inputs. torch.export traces it correctly.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import io
import json
import logging
import platform
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import __version__, weights_io
from ..ops import decomposed
from .evaluate import eval_transform, load_trained
from .onnx_loop import loop_over_blocks
from .validate import UserError

# The torch.export-based exporter writes opset 18 (and converts to later ones); the block loop's
# Pad takes its axes as an input from opset 18.
MIN_OPSET = 18
DEFAULT_OPSET = 18
DOMAIN = "transmatcher_fast"  # the custom op's domain (and torch.library namespace)
INSTALL_HINT = "pip install onnx onnxscript (or: pip install 'transmatcher-fast[onnx]'); onnxruntime runs the files"


def max_opset() -> int:
    """The latest opset the exporter writes (torch's ``ONNX_MAX_OPSET``)."""
    from torch.onnx import _constants

    return int(_constants.ONNX_MAX_OPSET)


def check_requirements(opset: int) -> None:
    """A :class:`UserError` when ``onnx`` or ``onnxscript`` is missing or ``opset`` is out of
    the exporter's range (checked before any model is loaded)."""
    for package in ("onnx", "onnxscript"):
        try:
            importlib.import_module(package)
        except ImportError:
            raise UserError(f"the {package} package is not installed (ONNX export needs it); "
                            f"install it: {INSTALL_HINT}") from None
    if not MIN_OPSET <= opset <= max_opset():
        raise UserError(f"--opset {opset}: unsupported; choose {MIN_OPSET} to {max_opset()} "
                        f"(default {DEFAULT_OPSET})")


def describe_transform(transform) -> Dict[str, Any]:
    """Resize size and interpolation, value range and mean / std of an evaluation transform (a
    ``Compose`` of resize, to-tensor and optional normalise steps), as export.json states them."""
    info: Dict[str, Any] = {"value_range": [0.0, 1.0], "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    for step in getattr(transform, "transforms", ()):
        if hasattr(step, "size") and hasattr(step, "interpolation"):
            width, height = step.size
            info["resize"] = {"height": int(height), "width": int(width),
                              "interpolation": _interpolation(step.interpolation)}
        if hasattr(step, "mean") and hasattr(step, "std"):
            info["mean"] = [round(float(v), 6) for v in torch.as_tensor(step.mean).flatten()]
            info["std"] = [round(float(v), 6) for v in torch.as_tensor(step.std).flatten()]
    return info


def _interpolation(value) -> str:
    from PIL import Image

    names = {Image.BICUBIC: "bicubic", Image.BILINEAR: "bilinear", Image.NEAREST: "nearest"}
    return names.get(value, str(value))


class _Features(nn.Module):
    """The feature model as a graph: images (+ SIE labels when the model takes them) -> features."""

    def __init__(self, model: nn.Module, side_info: bool):
        super().__init__()
        self.model, self.side_info = model, side_info

    def forward(self, images: Tensor, cam_label: Optional[Tensor] = None,
                view_label: Optional[Tensor] = None) -> Tensor:
        if self.side_info:
            return self.model(images, cam_label=cam_label, view_label=view_label)
        return self.model(images)


class _BlockScores(nn.Module):
    """``matcher.match`` of one fixed-size block of query and gallery features."""

    def __init__(self, matcher: nn.Module):
        super().__init__()
        self.matcher = matcher

    def forward(self, query: Tensor, gallery: Tensor) -> Tensor:
        return self.matcher.match(query, gallery)


def max_sim_schema():
    """The ONNX schema of the custom op ``transmatcher_fast::max_sim`` (version 1)."""
    from onnx.defs import OpSchema

    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    return OpSchema(
        "max_sim", DOMAIN, 1,
        "q_best[i,j,t] = max_s S, g_best[i,j,s] = max_t S with S[i,j,s,t] = <gallery[j,s], "
        "query[i,t]> * sigmoid(score_embed[s,t]) (no gate without score_embed); the indices are "
        "the argmax locations, the lowest among equal maxima.",
        inputs=[param("query", "T", "[Nq, Lq, D]"), param("gallery", "T", "[Ng, Lg, D]"),
                param("score_embed", "T", "[Lg, Lq] pre-sigmoid logits", param_option=optional)],
        outputs=[param("q_best", "T", "[Nq, Ng, Lq]"), param("g_best", "T", "[Nq, Ng, Lg]"),
                 param("q_index", "tensor(int32)", "[Nq, Ng, Lq]"),
                 param("g_index", "tensor(int32)", "[Nq, Ng, Lg]")],
        type_constraints=[("T", ["tensor(float)"], "float32")])


def _custom_op_translation() -> Dict[Any, Any]:
    """The exporter's translation of the fused op into one ``transmatcher_fast::max_sim`` node."""
    import onnxscript

    op = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), "max_sim", max_sim_schema())

    def translate(query, gallery, score_embed=None):
        return op(query, gallery, score_embed)

    return {torch.ops.transmatcher_fast.max_sim.default: translate}


@contextlib.contextmanager
def _quiet():
    """The exporter's progress lines and notes (e.g. the torchvision ops it skips) are not news."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _export(module: nn.Module, args: Tuple[Tensor, ...], *, opset: int, input_names, output_names,
            dynamic_shapes=None, custom_op: bool = False):
    """``torch.onnx.export`` (torch.export-based) of ``module`` on ``args``: its ONNX model.
    Inside it ``max_sim`` records its decomposition, or the custom op with ``custom_op``."""
    table = _custom_op_translation() if custom_op else None
    with torch.no_grad(), decomposed.keep_fused(custom_op), _quiet():
        program = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                    input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, custom_translation_table=table,
                                    verbose=False)
    return program.model_proto


def _save(model, path: Path) -> None:
    """An ONNX model to ``path`` through a temporary beside it (never a torn file)."""
    weights_io.atomic_write(path, lambda file: file.write(model.SerializeToString()))


def graph_summary(path) -> Dict[str, Any]:
    """Inputs, outputs, op-type counts (Loop bodies included) and size of an ONNX file."""
    import onnx

    model = onnx.load(str(path))
    counts: collections.Counter = collections.Counter()

    def walk(graph):
        for node in graph.node:
            custom = node.domain not in ("", "ai.onnx")
            counts[f"{node.domain}::{node.op_type}" if custom else node.op_type] += 1
            for attribute in node.attribute:
                if attribute.g.node:
                    walk(attribute.g)
                for sub in attribute.graphs:
                    walk(sub)

    walk(model.graph)
    initialisers = {i.name for i in model.graph.initializer}

    def shapes(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in values if v.name not in initialisers}

    return {"inputs": shapes(model.graph.input), "outputs": shapes(model.graph.output),
            "ops": dict(sorted(counts.items())), "bytes": Path(path).stat().st_size}


def _export_features(model: nn.Module, path: Path, height: int, width: int, *, opset: int,
                     dynamic_batch: bool, batch_size: int) -> Tensor:
    side_info = bool(getattr(model, "side_info", False))
    # A dynamic axis is traced with two images (torch.export specialises a size of 1).
    batch = max(2, batch_size) if dynamic_batch else batch_size
    images = torch.rand(batch, 3, height, width)
    args: Tuple[Tensor, ...] = (images,)
    names = ["images"]
    if side_info:
        labels = torch.zeros(batch, dtype=torch.long)
        args, names = (images, labels, labels.clone()), names + ["cam_label", "view_label"]
    wrapper = _Features(model, side_info)
    with torch.no_grad():
        features = wrapper(*args)
    shapes = tuple({0: torch.export.Dim("batch")} for _ in names) if dynamic_batch else None
    _save(_export(wrapper, args, opset=opset, input_names=names, output_names=["features"],
                  dynamic_shapes=shapes), path)
    return features


def _export_matcher(matcher: nn.Module, features: Tensor, path: Path, *, opset: int, custom_op: bool,
                    query_block: int, gallery_block: int) -> None:
    """One ``query_block x gallery_block`` block of ``matcher.match`` exported for fixed sizes,
    then looped over any sizes."""
    feature_shape = tuple(features.shape[1:])
    query = torch.randn(query_block, *feature_shape)
    gallery = torch.randn(gallery_block, *feature_shape)
    block = _export(_BlockScores(matcher), (query, gallery), opset=opset,
                    input_names=["query", "gallery"], output_names=["scores"], custom_op=custom_op)
    _save(loop_over_blocks(block, query_block, gallery_block), path)


def export_onnx(checkpoint, out_dir, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False,
                custom_op: bool = False, batch_size: int = 1, query_block: int = 1,
                gallery_block: int = 32) -> Dict[str, Any]:
    """Write ``features.onnx``, ``matcher.onnx`` (fused matchers) and ``export.json`` of the
    checkpoint ``checkpoint`` into ``out_dir``; returns what export.json holds.

    ``dynamic_batch``: the batch axis of features.onnx is dynamic (else fixed at
    ``batch_size``). matcher.onnx always takes any number of query and gallery images, in
    blocks of ``query_block x gallery_block`` pairs."""
    check_requirements(opset)
    for name, value in (("batch_size", batch_size), ("query_block", query_block),
                        ("gallery_block", gallery_block)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    out_dir = Path(out_dir)
    model, matcher, config = load_trained(checkpoint, "cpu")
    height, width = int(config["height"]), int(config["width"])
    out_dir.mkdir(parents=True, exist_ok=True)
    # A re-export into the same folder must not leave new and old files side by side when a
    # later step fails: the set is removed first, and export.json (written last) marks it done.
    for stale in ("export.json", "matcher.onnx", "features.onnx"):
        (out_dir / stale).unlink(missing_ok=True)

    features = _export_features(model, out_dir / "features.onnx", height, width, opset=opset,
                                dynamic_batch=dynamic_batch, batch_size=batch_size)
    files = {"features.onnx": graph_summary(out_dir / "features.onnx")}
    fused = callable(getattr(matcher, "match", None))
    if fused:
        _export_matcher(matcher, features, out_dir / "matcher.onnx", opset=opset, custom_op=custom_op,
                        query_block=query_block, gallery_block=gallery_block)
        files["matcher.onnx"] = graph_summary(out_dir / "matcher.onnx")
        comparison = ("matcher.onnx scores, higher = more similar; the distance that eval ranks by "
                      "is 1 - sigmoid(score / 10)")
    else:
        (out_dir / "matcher.onnx").unlink(missing_ok=True)  # an earlier export's, now stale
        comparison = getattr(matcher, "distance_name", None) or "distance of the features"
        comparison = f"{comparison} (computed outside the graph)"

    import onnx

    record = {
        "format": "onnx",
        "method": config.get("method"),
        "opset": opset,
        "dynamic_batch": dynamic_batch,
        "custom_op": custom_op and fused,
        "input": {"name": "images", "shape": ["batch" if dynamic_batch else batch_size, 3, height, width],
                  "dtype": "float32", "layout": "NCHW, RGB",
                  "height": height, "width": width, **describe_transform(eval_transform(config, height, width)),
                  "normalise": "x = (pixel / 255 - mean) / std, per channel"},
        "side_inputs": [n for n in ("cam_label", "view_label") if n in files["features.onnx"]["inputs"]],
        "comparison": comparison,
        "matcher_blocks": {"query": query_block, "gallery": gallery_block} if fused else None,
        "files": files,
        "checkpoint": {"path": str(Path(checkpoint).resolve()), "sha256": weights_io.file_sha256(checkpoint),
                       "bytes": Path(checkpoint).stat().st_size},
        "versions": {"transmatcher_fast": __version__, "torch": str(torch.__version__),
                     "onnx": onnx.__version__, "python": platform.python_version()},
    }
    weights_io.atomic_write(out_dir / "export.json",
                            lambda file: file.write(json.dumps(record, indent=2) + "\n"), mode="w")
    return record
