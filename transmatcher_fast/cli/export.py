"""``export``: a checkpoint as ONNX files (``features.onnx``, ``matcher.onnx``, ``export.json``)."""

from __future__ import annotations

import argparse

from .common import _positive_int


def run_export(args: argparse.Namespace) -> int:
    from ..engine import onnx_export, validate

    # Everything that can be wrong with the command is said before the model is loaded.
    onnx_export.check_requirements(args.opset)
    out = validate.check_output_dir(args.out, "--out")
    validate.read_checkpoint(args.checkpoint)  # a file that is no checkpoint, in one line
    record = onnx_export.export_onnx(args.checkpoint, out, opset=args.opset,
                                     dynamic_batch=args.dynamic_batch, custom_op=args.custom_op,
                                     batch_size=args.batch_size, query_block=args.query_block,
                                     gallery_block=args.gallery_block)
    for name, info in record["files"].items():
        ops = ", ".join(f"{op} {count}" for op, count in sorted(info["ops"].items(), key=lambda kv: -kv[1]))
        print(f"wrote {out / name} ({info['bytes'] / 1e6:.2f} MB): inputs {info['inputs']}, "
              f"outputs {info['outputs']}; ops: {ops}")
    source = record["input"]
    print(f"wrote {out / 'export.json'}: method {record['method']}, opset {record['opset']}, input "
          f"{source['height']}x{source['width']} in [0, 1], mean {source['mean']}, std {source['std']}")
    return 0


def add_export_parser(commands) -> None:
    from ..engine.onnx_export import DEFAULT_OPSET

    export = commands.add_parser(
        "export", help="write a checkpoint as ONNX (features.onnx, matcher.onnx, export.json)",
        description="Write --checkpoint as ONNX into --out: features.onnx (images -> features), "
                    "matcher.onnx for the fused matchers (query, gallery features -> scores) and "
                    "export.json (input size, normalisation, opset, method, checkpoint SHA-256).")
    export.add_argument("--checkpoint", required=True,
                        help="a checkpoint of transmatcher-fast train, or upstream's checkpoint.pth.tar")
    export.add_argument("--format", choices=("onnx",), default="onnx")
    export.add_argument("--out", required=True, help="output folder (created)")
    export.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    export.add_argument("--dynamic-batch", action="store_true",
                        help="features.onnx takes any batch size (else --batch-size); matcher.onnx "
                             "always takes any number of query and gallery images")
    export.add_argument("--batch-size", "-b", type=_positive_int, default=1,
                        help="the fixed batch size of features.onnx without --dynamic-batch")
    export.add_argument("--custom-op", action="store_true",
                        help="matcher.onnx keeps the fused op as one node transmatcher_fast::max_sim "
                             "(a runtime needs a plugin for it; see the README) instead of its "
                             "decomposition into standard ops")
    export.add_argument("--query-block", type=_positive_int, default=1,
                        help="query images per block of matcher.onnx's loop")
    export.add_argument("--gallery-block", type=_positive_int, default=32,
                        help="gallery images per block of matcher.onnx's loop (memory follows "
                             "query-block x gallery-block pairs)")
    export.set_defaults(run=run_export)
