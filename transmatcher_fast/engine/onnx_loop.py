"""An ONNX graph that runs a fixed-size pair block over any number of query and gallery rows.

``loop_over_blocks(block, query_block, gallery_block)`` takes an ONNX model of
``block(query [Bq, ...], gallery [Bg, ...]) -> scores [Bq, Bg]`` (exported for those fixed sizes)
and returns a model ``(query [Nq, ...], gallery [Ng, ...]) -> scores [Nq, Ng]``:

    pad query and gallery with zero rows to whole blocks
    for each query block (ONNX Loop):
        for each gallery block (ONNX Loop):  the block's nodes
        the row of blocks, concatenated
    drop the padding's rows and columns

so memory follows the block, never ``Nq x Ng``, and any runtime that implements ``Loop``
(opset 11+) runs it. The block's weights become the outer graph's initialisers, which the loop
bodies read from the enclosing scope.
"""

from __future__ import annotations

import numpy as np

_PREFIX = "block/"


def _graph_attributes(node) -> bool:
    return any(a.g.node or len(a.graphs) for a in node.attribute)


def loop_over_blocks(block, query_block: int, gallery_block: int):
    """The looped model of ``block`` (an ``onnx.ModelProto`` with inputs query, gallery and one
    ``[query_block, gallery_block]`` output). Inputs ``query`` and ``gallery`` with a dynamic
    first axis, output ``scores [num_query, num_gallery]``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = block.graph
    initialisers = {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initialisers]
    if len(inputs) != 2 or len(graph.output) != 1:
        raise ValueError(f"the block must have two inputs and one output, got "
                         f"{[v.name for v in inputs]} -> {[v.name for v in graph.output]}")
    if any(_graph_attributes(n) for n in graph.node):
        raise ValueError("the block must not hold subgraphs (If / Loop nodes)")
    query_in, gallery_in = inputs
    elem = query_in.type.tensor_type.elem_type

    def renamed(name: str) -> str:
        if not name:
            return name  # an omitted optional input
        return {query_in.name: "query_block", gallery_in.name: "gallery_block"}.get(name, _PREFIX + name)

    block_nodes = []
    for node in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = _PREFIX + node.name if node.name else ""
        copy.input[:] = [renamed(n) for n in node.input]
        copy.output[:] = [renamed(n) for n in node.output]
        block_nodes.append(copy)
    weights = []
    for tensor in graph.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        copy.name = renamed(tensor.name)
        weights.append(copy)

    def const(name, values):
        return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)

    constants = [const("bq", [query_block]), const("bg", [gallery_block]),
                 const("bq_minus_1", [query_block - 1]), const("bg_minus_1", [gallery_block - 1]),
                 const("zero", [0]), const("zeros2", [0, 0]), const("axis0", [0]),
                 const("axes01", [0, 1]), const("minus1", [-1]),
                 const("blocks_shape", [-1, query_block, gallery_block]),
                 numpy_helper.from_array(np.array(True), "true")]
    node = helper.make_node

    # Inner body: one gallery block of the current query block.
    inner = helper.make_graph(
        [node("Unsqueeze", ["j", "axis0"], ["j1"]),
         node("Mul", ["j1", "bg"], ["g_start"]),
         node("Add", ["g_start", "bg"], ["g_end"]),
         node("Slice", ["gallery_padded", "g_start", "g_end", "axis0"], ["gallery_block"]),
         *block_nodes,
         node("Reshape", [renamed(graph.output[0].name), "minus1"], ["block_scores"]),
         node("Identity", ["inner_cond"], ["inner_cond_out"])],
        "gallery_blocks",
        [helper.make_tensor_value_info("j", TensorProto.INT64, []),
         helper.make_tensor_value_info("inner_cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("inner_cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("block_scores", elem, [query_block * gallery_block])])

    # Outer body: one query block against every gallery block, as one row [Bq, padded Ng],
    # flattened. Every loop output is flat and reshaped after the loop: a runtime may stack the
    # iterations' outputs (onnxruntime) or concatenate them (onnx's reference evaluator).
    outer = helper.make_graph(
        [node("Unsqueeze", ["i", "axis0"], ["i1"]),
         node("Mul", ["i1", "bq"], ["q_start"]),
         node("Add", ["q_start", "bq"], ["q_end"]),
         node("Slice", ["query_padded", "q_start", "q_end", "axis0"], ["query_block"]),
         node("Loop", ["num_gallery_blocks", "true"], ["columns"], body=inner),
         node("Reshape", ["columns", "blocks_shape"], ["blocks"]),
         node("Transpose", ["blocks"], ["blocks_t"], perm=[1, 0, 2]),
         node("Reshape", ["blocks_t", "minus1"], ["row"]),
         node("Identity", ["outer_cond"], ["outer_cond_out"])],
        "query_blocks",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("outer_cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("outer_cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("row", elem, [None])])

    def padded(name, size, step, step_minus_1, blocks):
        """``name`` padded with zero rows to whole blocks, and the number of blocks."""
        return [node("Shape", [name], [size], end=1),
                node("Mod", [size, step], [f"{name}_rest"]),
                node("Sub", [step, f"{name}_rest"], [f"{name}_short"]),
                node("Mod", [f"{name}_short", step], [f"{name}_pad"]),
                node("Concat", ["zero", f"{name}_pad"], [f"{name}_pads"], axis=0),
                node("Pad", [name, f"{name}_pads", "", "axis0"], [f"{name}_padded"]),
                node("Add", [size, step_minus_1], [f"{name}_ceil"]),
                node("Div", [f"{name}_ceil", step], [f"{blocks}_1d"]),
                node("Squeeze", [f"{blocks}_1d", "axis0"], [blocks])]

    main_nodes = [
        *padded("query", "num_query", "bq", "bq_minus_1", "num_query_blocks"),
        *padded("gallery", "num_gallery", "bg", "bg_minus_1", "num_gallery_blocks"),
        node("Mul", ["num_gallery_blocks_1d", "bg"], ["padded_gallery_size"]),
        node("Concat", ["minus1", "padded_gallery_size"], ["flat_shape"], axis=0),
        node("Loop", ["num_query_blocks", "true"], ["rows"], body=outer),
        node("Reshape", ["rows", "flat_shape"], ["padded_scores"]),
        node("Concat", ["num_query", "num_gallery"], ["scores_end"], axis=0),
        node("Slice", ["padded_scores", "zeros2", "scores_end", "axes01"], ["scores"]),
    ]

    def dynamic(value, first):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        return helper.make_tensor_value_info(value.name, elem, [first] + dims[1:])

    main = helper.make_graph(
        main_nodes, "matcher",
        [dynamic(query_in, "num_query"), dynamic(gallery_in, "num_gallery")],
        [helper.make_tensor_value_info("scores", elem, ["num_query", "num_gallery"])],
        initializer=weights + constants)
    # The inputs keep their names: query and gallery feed the padding nodes above.
    main.input[0].name, main.input[1].name = "query", "gallery"
    model = helper.make_model(main, opset_imports=list(block.opset_import), ir_version=block.ir_version,
                              producer_name="transmatcher_fast")
    model.functions.extend(block.functions)
    return model
