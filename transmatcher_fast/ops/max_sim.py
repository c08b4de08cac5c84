"""``max_sim``: the fused query x gallery similarity with global max pooling, and its autograd.

For query images ``i`` and gallery images ``j``::

    S[i,j,s,t] = <gallery[j,s], query[i,t]> * sigmoid(score_embed[s,t])
    q_best[i,j,t] = max_s S        g_best[i,j,s] = max_t S

without ever materialising ``S``. The op is registered with ``torch.library`` as
``transmatcher_fast::max_sim`` (fake implementation and autograd included), so it runs under
``torch.compile`` and ``torch.autocast``; each call runs on the backend that ``dispatch.select``
picks for its device. The backward reads only the saved argmax indices.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

from .. import _extension, reference
from . import decomposed, dispatch, precision, tuning

_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------------------------
# Input validation: errors name the argument and the shapes involved.


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def _validate(query, gallery, score_embed) -> None:
    for name, value in (("query", query), ("gallery", gallery)):
        if not isinstance(value, Tensor):
            raise TypeError(f"max_sim: {name} must be a torch.Tensor, got {type(value).__name__}")
    if query.dim() != 3:
        raise ValueError(f"max_sim: query must be [Nq, Lq, D], got shape {_shape(query)}")
    if gallery.dim() != 3:
        raise ValueError(f"max_sim: gallery must be [Ng, Lg, D], got shape {_shape(gallery)}")
    if query.dtype not in _INPUT_DTYPES:
        raise TypeError(
            f"max_sim: query dtype must be one of float32/float16/bfloat16/float64, got "
            f"{query.dtype} (query shape {_shape(query)})"
        )
    if gallery.dtype != query.dtype:
        raise TypeError(
            f"max_sim: gallery dtype {gallery.dtype} differs from query dtype {query.dtype} "
            f"(query shape {_shape(query)}, gallery shape {_shape(gallery)})"
        )
    if gallery.device != query.device:
        raise ValueError(
            f"max_sim: gallery is on {gallery.device} but query is on {query.device} "
            f"(query shape {_shape(query)}, gallery shape {_shape(gallery)})"
        )
    if gallery.shape[2] != query.shape[2]:
        raise ValueError(
            f"max_sim: feature size D differs: query shape {_shape(query)} has D={query.shape[2]}, "
            f"gallery shape {_shape(gallery)} has D={gallery.shape[2]}"
        )
    if query.shape[1] == 0 or gallery.shape[1] == 0:
        raise ValueError(
            f"max_sim: images need at least one location: query shape {_shape(query)}, "
            f"gallery shape {_shape(gallery)}"
        )
    if score_embed is None:
        return
    if not isinstance(score_embed, Tensor):
        raise TypeError(
            f"max_sim: score_embed must be a torch.Tensor or None, got {type(score_embed).__name__}"
        )
    expected = (gallery.shape[1], query.shape[1])
    if _shape(score_embed) != expected:
        raise ValueError(
            f"max_sim: score_embed must be [Lg, Lq] = {expected} for query shape {_shape(query)} "
            f"and gallery shape {_shape(gallery)}, got shape {_shape(score_embed)}"
        )
    if not score_embed.dtype.is_floating_point:
        raise TypeError(
            f"max_sim: score_embed must be floating point, got {score_embed.dtype} "
            f"(score_embed shape {_shape(score_embed)})"
        )
    if score_embed.device != query.device:
        raise ValueError(
            f"max_sim: score_embed is on {score_embed.device} but query is on {query.device} "
            f"(score_embed shape {_shape(score_embed)}, query shape {_shape(query)})"
        )


_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps")


def _autocast_enabled(device: torch.device) -> bool:
    return device.type in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device.type)


def _autocast(query: Tensor, gallery: Tensor) -> tuple[Tensor, Tensor]:
    """Under autocast, the inputs take the autocast dtype, as torch.matmul's do (float64 is left
    alone, as autocast leaves it); the score_embed gate stays in its own precision."""
    kind = query.device.type
    if query.dtype == torch.float64 or not _autocast_enabled(query.device):
        return query, gallery
    dtype = torch.get_autocast_dtype(kind)
    same = gallery is query
    query = query.to(dtype)
    return query, (query if same else gallery.to(dtype))


# --------------------------------------------------------------------------------------------
# Backends: forward(query, gallery, score_embed) -> (q_best, g_best, q_index, g_index);
# backward(grads..., saved..., needs) -> (grad_query, grad_gallery, grad_score_embed) or None each.


def _output_specs(query: Tensor, gallery: Tensor):
    """(shape, dtype) of q_best, g_best, q_index, g_index: values in float32 (float64 for
    float64 inputs; 16-bit inputs are computed in float32), indices in int32."""
    nq, lq, _ = query.shape
    ng, lg, _ = gallery.shape
    dtype = reference.output_dtype(query.dtype)
    return (((nq, ng, lq), dtype), ((nq, ng, lg), dtype),
            ((nq, ng, lq), torch.int32), ((nq, ng, lg), torch.int32))


def _new_outputs(q: Tensor, g: Tensor) -> tuple:
    """Uninitialised (poisoned when testing) q_best, g_best, q_index, g_index for a kernel."""
    return tuple(dispatch.new_output(shape, dtype, q.device) for shape, dtype in _output_specs(q, g))


def _gradient_buffers(q, g, score_embed, dtype, need_query, need_gallery, need_score_embed):
    """Uninitialised gradients in the kernels' accumulation dtype (the op casts them back to the
    inputs' dtypes), None where not needed."""
    return tuple(dispatch.new_output(x.shape, dtype, q.device) if need else None
                 for x, need in ((q, need_query), (g, need_gallery),
                                 (score_embed, need_score_embed)))


def _kernel_dtype(t: Tensor) -> torch.dtype:
    """The dtype the compiled kernels read: the CUDA kernels read 16-bit inputs as they are; the
    CPU kernel reads bfloat16 as it is (its block GEMMs run on bfloat16 operands where the CPU has
    bfloat16 dot products) and float16 as float32 (torch's CPU float16 GEMM is slower than
    converting). Both accumulate in float32."""
    if t.dtype == torch.bfloat16 or (t.device.type == "cuda" and t.dtype == torch.float16):
        return t.dtype
    return reference.output_dtype(t.dtype)


def _as_kernel_input(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype).contiguous()


def _extension_forward(query, gallery, score_embed):
    """The C++ CPU kernel or the CUDA extension (same op schema; dispatch by device)."""
    dtype = _kernel_dtype(query)
    q = _as_kernel_input(query, dtype)
    g = q if gallery is query else _as_kernel_input(gallery, dtype)
    e = None if score_embed is None else _as_kernel_input(score_embed, reference.output_dtype(dtype))
    outs = _new_outputs(q, g)
    tf32 = q.is_cuda and _allows_tf32(q.dtype)
    query_group = _launch_entry(q, g, tf32).get("cuda", {}).get("query_group", 0) if q.is_cuda else 0
    torch.ops.transmatcher_fast_C.max_sim_forward(q, g, e, *outs, tf32, query_group)
    return outs


def _extension_backward(grad_q_best, grad_g_best, query, gallery, score_embed, q_best, g_best,
                        q_index, g_index, need_query, need_gallery, need_score_embed):
    dtype = _kernel_dtype(query)
    out_dtype = q_best.dtype
    q = _as_kernel_input(query, dtype)
    g = q if gallery is query else _as_kernel_input(gallery, dtype)
    e = None if score_embed is None else _as_kernel_input(score_embed, out_dtype)
    grads = [None if grad is None else _as_kernel_input(grad, out_dtype)
             for grad in (grad_q_best, grad_g_best)]
    dq, dg, de = _gradient_buffers(q, g, score_embed, out_dtype,
                                   need_query, need_gallery, need_score_embed)
    torch.ops.transmatcher_fast_C.max_sim_backward(
        *grads, q, g, e, q_best, g_best, q_index, g_index, dq, dg, de
    )
    return dq, dg, de


def _allows_tf32(dtype: torch.dtype) -> bool:
    """float32 follows torch's matmul precision setting, as torch.matmul does."""
    return dtype == torch.float32 and precision.float32_matmul_allows_tf32()


def _launch_entry(query: Tensor, gallery: Tensor, tf32: bool) -> dict:
    """The committed launch table's entry for this call's shape class (ops/tuning.py)."""
    return tuning.entry(query.shape[0] * gallery.shape[0], query.dtype, tf32, query.device)


def _in_compute_dtype(dtype, *tensors):
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _reference_forward(query, gallery, score_embed):
    # Computed like the kernels: features and gate in float32 (float64 for float64 inputs).
    dtype = reference.output_dtype(query.dtype)
    return reference.max_sim_chunked(
        *_in_compute_dtype(dtype, query, gallery, score_embed), return_indices=True
    )


def _reference_backward(grad_q_best, grad_g_best, query, gallery, score_embed, q_best, g_best,
                        q_index, g_index, need_query, need_gallery, need_score_embed):
    # Recomputes the blocks of _reference_forward, hence the same argmax as the saved indices.
    dtype = q_best.dtype
    dq, dg, de = reference.max_sim_chunked_backward(
        grad_q_best, grad_g_best, *_in_compute_dtype(dtype, query, gallery, score_embed)
    )
    return (dq if need_query else None, dg if need_gallery else None,
            de if need_score_embed else None)


def _triton_kernels():
    # Imported on first use: triton is optional, and TRITON_INTERPRET must be read after the
    # caller has set it (the interpreter runs the kernels on CPU tensors, for tests).
    from ..kernels import max_sim as kernels

    return kernels


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return _triton_interpreting() or torch.cuda.is_available()


def _gate(score_embed: Optional[Tensor]) -> Optional[Tensor]:
    return None if score_embed is None else torch.sigmoid(score_embed.float()).contiguous()


def _triton_forward(query, gallery, score_embed):
    kernels = _triton_kernels()
    q = query.contiguous()
    g = q if gallery is query else gallery.contiguous()
    tf32 = _allows_tf32(q.dtype)
    measured = _launch_entry(q, g, tf32).get("triton")
    config = kernels.forward_config(q.shape[1], g.shape[1], q.shape[2], q.dtype, measured)
    return kernels.forward(q, g, _gate(score_embed), _new_outputs(q, g), config,
                           kernels.input_precision(q.dtype, tf32))


def _triton_backward(grad_q_best, grad_g_best, query, gallery, score_embed, q_best, g_best,
                     q_index, g_index, need_query, need_gallery, need_score_embed):
    q = query.contiguous()
    g = q if gallery is query else gallery.contiguous()
    grads = [None if grad is None else grad.float().contiguous()
             for grad in (grad_q_best, grad_g_best)]
    dq, dg, de = _gradient_buffers(q, g, score_embed, torch.float32,
                                   need_query, need_gallery, need_score_embed)
    kernels = _triton_kernels()
    kernels.backward(*grads, q, g, _gate(score_embed), q_best, g_best, q_index, g_index, dq, dg,
                     de, precision=kernels.input_precision(q.dtype, _allows_tf32(q.dtype)))
    return dq, dg, de


dispatch.register_backend(
    dispatch.Backend("reference", None, _reference_forward, _reference_backward)
)
dispatch.register_backend(
    dispatch.Backend("cpu", frozenset({"cpu"}), _extension_forward, _extension_backward,
                     _extension.has_cpu_kernels)
)
dispatch.register_backend(
    dispatch.Backend("cuda", frozenset({"cuda"}), _extension_forward, _extension_backward,
                     _extension.has_cuda_kernels,
                     frozenset({torch.float32, torch.float16, torch.bfloat16}))
)
dispatch.register_backend(
    dispatch.Backend("triton", frozenset({"cuda", "cpu"} if _triton_interpreting() else {"cuda"}),
                     _triton_forward, _triton_backward, _triton_available,
                     frozenset({torch.float32, torch.float16, torch.bfloat16}))
)


# --------------------------------------------------------------------------------------------
# The torch.library ops.


def _no_autocast(device: torch.device):
    """Kernels run in the dtypes they are given: autocast stays off inside them."""
    if _autocast_enabled(device):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _select(query: Tensor, gallery: Tensor) -> dispatch.Backend:
    return dispatch.select(query.device, query.dtype, query.shape[0] * gallery.shape[0])


@torch.library.custom_op("transmatcher_fast::max_sim", mutates_args=())
def _max_sim_op(
    query: Tensor, gallery: Tensor, score_embed: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with _no_autocast(query.device):
        return tuple(_select(query, gallery).forward(query, gallery, score_embed))


@_max_sim_op.register_fake
def _max_sim_fake(query, gallery, score_embed):
    return tuple(query.new_empty(shape, dtype=dtype) for shape, dtype in _output_specs(query, gallery))


@torch.library.custom_op("transmatcher_fast::max_sim_backward", mutates_args=())
def _max_sim_backward_op(
    grad_q_best: Optional[Tensor],
    grad_g_best: Optional[Tensor],
    query: Tensor,
    gallery: Tensor,
    score_embed: Optional[Tensor],
    q_best: Tensor,
    g_best: Tensor,
    q_index: Tensor,
    g_index: Tensor,
    need_query: bool,
    need_gallery: bool,
    need_score_embed: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """The three gradients, contiguous, in their inputs' dtypes; one not needed is an empty
    tensor (``need_score_embed`` implies a ``score_embed``). ``backend`` is the one that ran the
    forward, so the saved indices are its own."""
    with _no_autocast(query.device):
        grads = dispatch.by_name(backend).backward(
            grad_q_best, grad_g_best, query, gallery, score_embed, q_best, g_best,
            q_index, g_index, need_query, need_gallery, need_score_embed,
        )
    like = (query, gallery, score_embed)
    return tuple(
        grad.to(x.dtype).contiguous() if grad is not None else query.new_empty(0)
        for grad, x in zip(grads, like)
    )


@_max_sim_backward_op.register_fake
def _max_sim_backward_fake(grad_q_best, grad_g_best, query, gallery, score_embed, q_best, g_best,
                           q_index, g_index, need_query, need_gallery, need_score_embed, backend):
    return tuple(
        x.new_empty(x.shape) if need else query.new_empty(0)
        for x, need in ((query, need_query), (gallery, need_gallery),
                        (score_embed, need_score_embed))
    )


def _setup_context(ctx, inputs, output):
    query, gallery, score_embed = inputs
    q_best, g_best, q_index, g_index = output
    ctx.mark_non_differentiable(q_index, g_index)
    ctx.save_for_backward(query, gallery, score_embed, q_best, g_best, q_index, g_index)
    ctx.backend = _select(query, gallery).name  # the backend that just ran the forward


def _backward(ctx, grad_q_best, grad_g_best, _grad_q_index, _grad_g_index):
    query, gallery, score_embed, q_best, g_best, q_index, g_index = ctx.saved_tensors
    need_query, need_gallery, need_score_embed = ctx.needs_input_grad
    grads = _max_sim_backward_op(
        grad_q_best, grad_g_best, query, gallery, score_embed, q_best, g_best, q_index, g_index,
        need_query, need_gallery, need_score_embed and score_embed is not None, ctx.backend,
    )
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


_max_sim_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public entry point.


def max_sim(
    query: Tensor,
    gallery: Tensor,
    score_embed: Optional[Tensor] = None,
    *,
    return_indices: bool = False,
):
    """Fused dot product, score-embedding gate, sigmoid and global max pooling.

    Args:
        query: ``[Nq, Lq, D]`` features (float32, float16, bfloat16; float64 too).
        gallery: ``[Ng, Lg, D]``, same dtype and device; may be the same tensor as ``query``.
        score_embed: ``[Lg, Lq]`` pre-sigmoid logits ``E`` (upstream's ``score_embed``, indexed
            [gallery location, query location]), or None for no gate (QAConv).
        return_indices: also return the int32 argmax locations.

    Returns:
        ``q_best [Nq, Ng, Lq]`` (best gallery location per query location) and
        ``g_best [Nq, Ng, Lg]`` (best query location per gallery location), float32 (float64 for
        float64 inputs); with ``return_indices``, also ``q_index`` and ``g_index`` of the same
        shapes. Among equal maxima the lowest index wins; NaN propagates.
    """
    _validate(query, gallery, score_embed)
    query, gallery = _autocast(query, gallery)
    if not return_indices and decomposed.replaces_fused_op():
        # An ONNX export records plain operators that any runtime runs (see ops.decomposed).
        return decomposed.max_sim_decomposed(query, gallery, score_embed)
    q_best, g_best, q_index, g_index = _max_sim_op(query, gallery, score_embed)
    if return_indices:
        return q_best, g_best, q_index, g_index
    return q_best, g_best
