"""Triton kernels for ``max_sim``: the fused gated similarity with global max pooling, and its
backward from the saved argmax indices.

For query image ``i`` and gallery image ``j`` the forward computes, tile by tile on tensor cores,

    S_ij[s, t] = <g_j[s], q_i[t]> * sig[s, t]         (sig = sigmoid(score_embed), or 1)

and keeps ``q_best[i,j,t] = max_s S`` and ``g_best[i,j,s] = max_t S`` with their argmax; ``S``
exists only as one register tile at a time. The backward routes each output's gradient to the
one (s, t) its saved argmax names (``S`` is never recomputed): d query and d gallery are
gathers of feature rows (max_sim_gather: O(Nq*Ng*(Lq+Lg)*D), no atomics, a fixed order, so
bit-identical run to run), and ``d score_embed`` is ``(1 - sig) * sum_ij M_ij`` with ``M`` the
routing weighted by ``grad * best`` (``best`` the saved maximum); it has no D dimension, and
goes through fp32 partials (one per slice of query images) added up in a fixed order.

Three forward kernels, chosen per shape by the launch table (ops/tuning.py): "tiled" (one
program per pair, one score tile at a time; the default), "strip" (one program per pair, a
query tile against the whole gallery image at once) and "pairs" (kernels/max_sim_pairs.py:
persistent, a query tile and its gate held while the program walks several gallery images; max
and argmax without 64-bit keys). benchmarks/triton_resources.py reports what each compiles to.

Conventions: features are contiguous ``[N, L, D]``; ``sig`` is a float32 ``[Lg, Lq]`` computed once
per call; outputs are float32 values and int32 indices; among equal maxima the lowest index wins
and a NaN wins over any number (as ``torch.max``). Offsets that can pass 2**31 are 64-bit.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
import triton
import triton.language as tl

from . import max_sim_gather, max_sim_score_embed
from .max_sim_common import (_ABLATION_CODES, ABLATIONS, FULL, MAX_ONLY, MMA_ONLY,
                             _gallery_blocks, _kept, _max_nan, _store_best, _store_kept)
from .max_sim_pairs import _max_sim_forward_pairs_kernel

try:  # host-side TMA descriptors (triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older triton: the "pairs" variant loads through pointers
    TensorDescriptor = None


# --------------------------------------------------------------------------------------------
# Argmax helpers: torch.max semantics (the first NaN wins, then the larger, then the lower index).


@triton.jit
def _max_with_index(x, index, axis: tl.constexpr):
    """Maximum of float32 ``x`` along ``axis`` and the int32 ``index`` (same shape) where it is.

    One integer max over a 64-bit key: the float's bits made order-preserving in the high half
    (every NaN above +inf; -0.0 made +0.0, so the two tie as in torch), ``2**31 - 1 - index`` in
    the low half (a tie goes to the lower index). An integer max has no NaN semantics to differ
    between the interpreter and the compiled code, and it is one reduction, not two."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    ordered = tl.where(x != x, 0x7FFFFFFF, ordered)
    key = tl.max((ordered.to(tl.int64) << 32) | (0x7FFFFFFF - index).to(tl.int64), axis)
    high = (key >> 32).to(tl.int32)
    best = tl.where(high >= 0, high, high ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
    return best, 0x7FFFFFFF - key.to(tl.int32)


@triton.jit
def _follows(v_new, v_old):
    """Whether a later block's maximum replaces the running one (its indices are all higher, so
    a tie keeps the old)."""
    return (v_new > v_old) | ((v_new != v_new) & (v_old == v_old))


@triton.jit
def _pair_of(pid, num_query, num_gallery, GROUP_Q: tl.constexpr):
    """The (query, gallery) image pair of program ``pid``. Consecutive programs walk GROUP_Q query
    images for one gallery image, then the next gallery image, so the images in flight stay in L2."""
    pairs_per_group = GROUP_Q * num_gallery
    first_q = (pid // pairs_per_group) * GROUP_Q
    group_size = tl.minimum(num_query - first_q, GROUP_Q)
    i = first_q + (pid % pairs_per_group) % group_size
    j = (pid % pairs_per_group) // group_size
    return i, j


@triton.jit
def _gated(acc, sig_ptr, offs_s, offs_t, s_in, t_in, len_q, HAS_GATE: tl.constexpr):
    """A score tile: the dot products times the gate, -inf where the tile is padding."""
    if HAS_GATE:
        sig = tl.load(sig_ptr + offs_s[:, None] * len_q + offs_t[None, :],
                      mask=s_in[:, None] & t_in[None, :], other=0.0)
        acc = acc * sig
    return tl.where(s_in[:, None] & t_in[None, :], acc, float("-inf"))


# --------------------------------------------------------------------------------------------
# Forward.


@triton.jit
def _max_sim_forward_kernel(
    q_ptr, g_ptr, sig_ptr,
    q_best_ptr, g_best_ptr, q_index_ptr, g_index_ptr,
    num_query, num_gallery, len_q, len_g, dim,
    HAS_GATE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_Q: tl.constexpr, INPUT_PRECISION: tl.constexpr, ABLATION: tl.constexpr = FULL,
):
    # One program per (query image, gallery image) pair, one [BLOCK_S, BLOCK_T] score tile at a
    # time; the running g_best across query blocks lives in the output itself.
    i, j = _pair_of(tl.program_id(0), num_query, num_gallery, GROUP_Q)
    q_image = q_ptr + i.to(tl.int64) * len_q * dim
    g_image = g_ptr + j.to(tl.int64) * len_g * dim
    pair = i.to(tl.int64) * num_gallery + j
    arange_s = tl.arange(0, BLOCK_S)
    arange_t = tl.arange(0, BLOCK_T)
    arange_k = tl.arange(0, BLOCK_K)
    keep = tl.zeros((BLOCK_S, BLOCK_T), tl.float32)  # MMA_ONLY's running tile

    for t0 in range(0, len_q, BLOCK_T):
        offs_t = t0 + arange_t
        t_in = offs_t < len_q
        q_run = tl.full((BLOCK_T,), float("-inf"), tl.float32)
        q_arg = tl.zeros((BLOCK_T,), tl.int32)
        for s0 in range(0, len_g, BLOCK_S):
            offs_s = s0 + arange_s
            s_in = offs_s < len_g
            acc = tl.zeros((BLOCK_S, BLOCK_T), tl.float32)
            for k0 in range(0, dim, BLOCK_K):
                offs_k = k0 + arange_k
                k_in = offs_k < dim
                g = tl.load(g_image + offs_s[:, None] * dim + offs_k[None, :],
                            mask=s_in[:, None] & k_in[None, :], other=0.0)
                q = tl.load(q_image + offs_t[:, None] * dim + offs_k[None, :],
                            mask=t_in[:, None] & k_in[None, :], other=0.0)
                acc = tl.dot(g, tl.trans(q), acc, input_precision=INPUT_PRECISION)
            if ABLATION == MMA_ONLY:
                keep += acc
            elif ABLATION == MAX_ONLY:
                acc = _gated(acc, sig_ptr, offs_s, offs_t, s_in, t_in, len_q, HAS_GATE)
                q_run = _max_nan(q_run, tl.reduce(acc, 0, _max_nan))
                row_max = tl.reduce(acc, 1, _max_nan)
                g_offs = pair * len_g + offs_s
                if t0 > 0:
                    row_max = _max_nan(row_max, tl.load(g_best_ptr + g_offs, mask=s_in, other=0.0))
                tl.store(g_best_ptr + g_offs, row_max, mask=s_in)
            else:
                acc = _gated(acc, sig_ptr, offs_s, offs_t, s_in, t_in, len_q, HAS_GATE)
                # Best gallery location per query location: this block's, then the running one.
                block_max, block_arg = _max_with_index(
                    acc, tl.broadcast_to(offs_s[:, None], (BLOCK_S, BLOCK_T)), 0)
                take = _follows(block_max, q_run)
                q_run = tl.where(take, block_max, q_run)
                q_arg = tl.where(take, block_arg, q_arg)

                # Best query location per gallery location. With several query blocks, the
                # running value lives in the output itself (this program alone owns them).
                row_max, row_arg = _max_with_index(
                    acc, tl.broadcast_to(offs_t[None, :], (BLOCK_S, BLOCK_T)), 1)
                g_offs = pair * len_g + offs_s
                if t0 > 0:
                    old_max = tl.load(g_best_ptr + g_offs, mask=s_in, other=0.0)
                    old_arg = tl.load(g_index_ptr + g_offs, mask=s_in, other=0)
                    take_row = _follows(row_max, old_max)
                    row_max = tl.where(take_row, row_max, old_max)
                    row_arg = tl.where(take_row, row_arg, old_arg)
                tl.store(g_best_ptr + g_offs, row_max, mask=s_in)
                tl.store(g_index_ptr + g_offs, row_arg, mask=s_in)
        if ABLATION != MMA_ONLY:
            _store_best(q_best_ptr, q_index_ptr, pair * len_q + offs_t, t_in, q_run, q_arg,
                        ABLATION)
        # The next query block reads back the g_best just written, maybe by other threads.
        tl.debug_barrier()
    if ABLATION == MMA_ONLY:
        _store_kept(q_best_ptr, pair * len_q + arange_t, arange_t < len_q, keep)


@triton.jit
def _strip_dot(g_image, offs_s, s_in, offs_k, k_in, q_t, acc, dim,
               INPUT_PRECISION: tl.constexpr):
    g = tl.load(g_image + offs_s[:, None] * dim + offs_k[None, :],
                mask=s_in[:, None] & k_in[None, :], other=0.0)
    return tl.dot(g, q_t, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _strip_epilogue(acc, sig_ptr, offs_s, offs_t, s_in, t_in, len_q, q_run, q_arg, g_run, g_arg,
                    HAS_GATE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
                    ABLATION: tl.constexpr):
    """Folds one gallery block's score tile into the query tile's running q_best and into the
    block's running g_best (both in registers; later blocks have higher indices)."""
    acc = _gated(acc, sig_ptr, offs_s, offs_t, s_in, t_in, len_q, HAS_GATE)
    if ABLATION == MAX_ONLY:
        q_run = _max_nan(q_run, tl.reduce(acc, 0, _max_nan))
        g_run = _max_nan(g_run, tl.reduce(acc, 1, _max_nan))
        return q_run, q_arg, g_run, g_arg
    col_max, col_arg = _max_with_index(acc, tl.broadcast_to(offs_s[:, None], (BLOCK_S, BLOCK_T)), 0)
    take = _follows(col_max, q_run)
    q_run = tl.where(take, col_max, q_run)
    q_arg = tl.where(take, col_arg, q_arg)
    row_max, row_arg = _max_with_index(acc, tl.broadcast_to(offs_t[None, :], (BLOCK_S, BLOCK_T)), 1)
    take = _follows(row_max, g_run)
    g_run = tl.where(take, row_max, g_run)
    g_arg = tl.where(take, row_arg, g_arg)
    return q_run, q_arg, g_run, g_arg


@triton.jit
def _max_sim_forward_strip_kernel(
    q_ptr, g_ptr, sig_ptr,
    q_best_ptr, g_best_ptr, q_index_ptr, g_index_ptr,
    num_query, num_gallery, len_q, len_g, dim,
    HAS_GATE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, NUM_S: tl.constexpr,
    GROUP_Q: tl.constexpr, INPUT_PRECISION: tl.constexpr, ABLATION: tl.constexpr = FULL,
):
    # One program per image pair, as the tiled kernel, but each query tile meets the whole
    # gallery image at once: NUM_S (<= 4) accumulators, one per gallery block, share every query
    # load, so each query tile is read once instead of once per gallery block, q_best is complete
    # after one pass, and g_best runs in registers across query tiles (no read-back).
    i, j = _pair_of(tl.program_id(0), num_query, num_gallery, GROUP_Q)
    q_image = q_ptr + i.to(tl.int64) * len_q * dim
    g_image = g_ptr + j.to(tl.int64) * len_g * dim
    pair = i.to(tl.int64) * num_gallery + j
    arange_t = tl.arange(0, BLOCK_T)
    arange_k = tl.arange(0, BLOCK_K)
    offs_s0, offs_s1, offs_s2, offs_s3, s_in0, s_in1, s_in2, s_in3 = _gallery_blocks(len_g, BLOCK_S)
    g_run0 = tl.full((BLOCK_S,), float("-inf"), tl.float32)
    g_run1, g_run2, g_run3 = g_run0, g_run0, g_run0
    g_arg0 = tl.zeros((BLOCK_S,), tl.int32)
    g_arg1, g_arg2, g_arg3 = g_arg0, g_arg0, g_arg0
    keep = tl.zeros((BLOCK_S, BLOCK_T), tl.float32)  # MMA_ONLY's running tile

    for t0 in range(0, len_q, BLOCK_T):
        offs_t = t0 + arange_t
        t_in = offs_t < len_q
        acc0 = tl.zeros((BLOCK_S, BLOCK_T), tl.float32)
        acc1, acc2, acc3 = acc0, acc0, acc0
        for k0 in range(0, dim, BLOCK_K):
            offs_k = k0 + arange_k
            k_in = offs_k < dim
            q = tl.load(q_image + offs_t[:, None] * dim + offs_k[None, :],
                        mask=t_in[:, None] & k_in[None, :], other=0.0)
            q_t = tl.trans(q)
            acc0 = _strip_dot(g_image, offs_s0, s_in0, offs_k, k_in, q_t, acc0, dim, INPUT_PRECISION)
            if NUM_S > 1:
                acc1 = _strip_dot(g_image, offs_s1, s_in1, offs_k, k_in, q_t, acc1, dim,
                                  INPUT_PRECISION)
            if NUM_S > 2:
                acc2 = _strip_dot(g_image, offs_s2, s_in2, offs_k, k_in, q_t, acc2, dim,
                                  INPUT_PRECISION)
            if NUM_S > 3:
                acc3 = _strip_dot(g_image, offs_s3, s_in3, offs_k, k_in, q_t, acc3, dim,
                                  INPUT_PRECISION)
        if ABLATION == MMA_ONLY:
            keep = _kept(keep, acc0, acc1, acc2, acc3, NUM_S)
        else:
            q_run = tl.full((BLOCK_T,), float("-inf"), tl.float32)
            q_arg = tl.zeros((BLOCK_T,), tl.int32)
            q_run, q_arg, g_run0, g_arg0 = _strip_epilogue(
                acc0, sig_ptr, offs_s0, offs_t, s_in0, t_in, len_q, q_run, q_arg, g_run0, g_arg0,
                HAS_GATE, BLOCK_S, BLOCK_T, ABLATION)
            if NUM_S > 1:
                q_run, q_arg, g_run1, g_arg1 = _strip_epilogue(
                    acc1, sig_ptr, offs_s1, offs_t, s_in1, t_in, len_q, q_run, q_arg, g_run1,
                    g_arg1, HAS_GATE, BLOCK_S, BLOCK_T, ABLATION)
            if NUM_S > 2:
                q_run, q_arg, g_run2, g_arg2 = _strip_epilogue(
                    acc2, sig_ptr, offs_s2, offs_t, s_in2, t_in, len_q, q_run, q_arg, g_run2,
                    g_arg2, HAS_GATE, BLOCK_S, BLOCK_T, ABLATION)
            if NUM_S > 3:
                q_run, q_arg, g_run3, g_arg3 = _strip_epilogue(
                    acc3, sig_ptr, offs_s3, offs_t, s_in3, t_in, len_q, q_run, q_arg, g_run3,
                    g_arg3, HAS_GATE, BLOCK_S, BLOCK_T, ABLATION)
            _store_best(q_best_ptr, q_index_ptr, pair * len_q + offs_t, t_in, q_run, q_arg,
                        ABLATION)

    g_offs = pair * len_g
    if ABLATION == MMA_ONLY:
        _store_kept(q_best_ptr, pair * len_q + arange_t, arange_t < len_q, keep)
    else:
        _store_best(g_best_ptr, g_index_ptr, g_offs + offs_s0, s_in0, g_run0, g_arg0, ABLATION)
        if NUM_S > 1:
            _store_best(g_best_ptr, g_index_ptr, g_offs + offs_s1, s_in1, g_run1, g_arg1, ABLATION)
        if NUM_S > 2:
            _store_best(g_best_ptr, g_index_ptr, g_offs + offs_s2, s_in2, g_run2, g_arg2, ABLATION)
        if NUM_S > 3:
            _store_best(g_best_ptr, g_index_ptr, g_offs + offs_s3, s_in3, g_run3, g_arg3, ABLATION)


# --------------------------------------------------------------------------------------------
# Launch configuration.

VARIANTS = ("tiled", "strip", "pairs")
MAX_STRIP_BLOCKS = 4  # gallery blocks (accumulators) one strip or pairs program holds


@dataclass(frozen=True)
class ForwardConfig:
    """A forward launch. ``variant``: "tiled" (one score tile at a time), "strip" (a query
    tile against every gallery block of the image at once; needs Lg <= 4 * block_s) or "pairs"
    (persistent: a query tile and its gate held while the program walks ``group_g`` gallery
    images, each met whole as in "strip"; ``group_q`` does not apply). ``tma``: "pairs" loads
    its feature tiles through TMA tensor descriptors (UTMALDG on sm_90) instead of pointers."""
    block_s: int = 64
    block_t: int = 64
    block_k: int = 64
    group_q: int = 8
    num_warps: int = 4
    num_stages: int = 3
    variant: str = "tiled"
    group_g: int = 16
    tma: bool = False

    @property
    def name(self) -> str:
        group = f"G{self.group_g}" if self.variant == "pairs" else f"g{self.group_q}"
        return (f"{self.variant}-{self.block_s}x{self.block_t}x{self.block_k}-{group}"
                f"-w{self.num_warps}-s{self.num_stages}" + ("-tma" if self.tma else ""))


@dataclass(frozen=True)
class BackwardConfig:
    """``block_s`` x ``block_t``: the d score_embed tiles; ``block_d`` x ``chunk``: the slice of
    D and the routes a gather program reads at a time (max_sim_gather)."""
    block_s: int = 64
    block_t: int = 64
    block_d: int = 128
    chunk: int = 16
    num_warps: int = 4
    score_embed_partials: int = 32


def _pow2_at_least(n: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(n))


def _fitted(config: ForwardConfig, len_q: int, len_g: int, dim: int,
            dtype: torch.dtype) -> ForwardConfig:
    """``config`` with blocks no larger than the shape needs. A strip becomes tiled where it
    cannot hold the whole gallery image, and where D % 16 != 0 (no divisibility to specialise
    on: it spills there, float32 on sm_90 and 16-bit on sm_80; benchmarks/triton_resources.py)."""
    config = replace(config, block_s=min(config.block_s, _pow2_at_least(len_g)),
                     block_t=min(config.block_t, _pow2_at_least(len_q)),
                     block_k=min(config.block_k, _pow2_at_least(dim)))
    too_long = triton.cdiv(len_g, config.block_s) > MAX_STRIP_BLOCKS
    if config.variant in ("strip", "pairs") and (too_long or dim % 16 != 0):
        config = replace(config, variant="tiled", group_g=ForwardConfig.group_g)
    if config.variant != "pairs":
        config = replace(config, tma=False)
    return config


def forward_config(len_q: int, len_g: int, dim: int, dtype: torch.dtype,
                   measured: Optional[dict] = None) -> ForwardConfig:
    """The forward launch: the built-in default (64x64 location tiles), or the fields that a
    measured launch table names (ops/tuning.py), fitted to the shape."""
    default = ForwardConfig(block_k=64 if dtype.itemsize <= 2 else 32)
    if dtype == torch.float32 and dim % 16 != 0:
        default = replace(default, num_warps=8)  # 4 warps spill there in exact FP32 on sm_90
    if measured:
        unknown = set(measured) - {f.name for f in fields(ForwardConfig)}
        if unknown or measured.get("variant", "tiled") not in VARIANTS:
            raise ValueError(f"Triton max_sim: launch table entry {measured} names unknown "
                             f"fields {sorted(unknown)} or variant (expected one of {VARIANTS})")
        default = replace(default, **measured)
    return _fitted(default, len_q, len_g, dim, dtype)


def forward_candidates(len_q: int, len_g: int, dim: int, dtype: torch.dtype) -> list:
    """The launches the GPU suite measures for a shape (distinct after fitting), default first.
    Each compiles for sm_90 without spills (tests/test_triton_compile.py)."""
    block_k = 64 if dtype.itemsize <= 2 else 32
    tiled = ForwardConfig(block_k=block_k)
    strip = replace(tiled, variant="strip", num_warps=8, num_stages=2)  # 4 warps spill
    pairs = replace(strip, variant="pairs")
    # group_q changes the order of the pairs only (DRAM reuse: 1-25 GB a call against
    # 0.6-1.4 TB read from L2): the GPU suite skips those unless --order-variants.
    raw = [forward_config(len_q, len_g, dim, dtype)]
    raw += [replace(tiled, group_q=g) for g in (1, 4, 16)]
    raw += [replace(tiled, num_stages=n) for n in (2, 4)]
    raw += [replace(tiled, num_warps=8), replace(tiled, block_t=128, block_k=32, num_warps=8)]
    raw += [strip, replace(strip, num_stages=3), replace(strip, block_k=32, num_stages=3)]
    raw += [pairs, replace(pairs, num_stages=3), replace(pairs, block_k=32, num_stages=3),
            replace(pairs, tma=True)]
    unique = []
    for config in raw:
        config = _fitted(config, len_q, len_g, dim, dtype)
        if config not in unique:
            unique.append(config)
    return unique


def backward_config(len_q: int, len_g: int, dim: int, dtype: torch.dtype) -> BackwardConfig:
    return BackwardConfig(block_s=min(64, _pow2_at_least(len_g)),
                          block_t=min(64, _pow2_at_least(len_q)),
                          block_d=min(128, _pow2_at_least(dim)))


def input_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """float32 in TF32 or exact ("ieee"), as torch's matmul precision says (the caller reads it:
    ops/precision.py); 16-bit inputs use the tensor cores with float32 accumulation either way."""
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit dots
    return "tf32" if allow_tf32 else "ieee"


def pairs_constexprs(config: ForwardConfig, len_q: int, len_g: int, dim: int) -> dict:
    """The "pairs" kernel's specialisation for a shape: full blocks need no masks."""
    num_s = triton.cdiv(len_g, config.block_s)
    return {"NUM_S": num_s, "EVEN_L": len_g == num_s * config.block_s and len_q % config.block_t == 0,
            "EVEN_K": dim % config.block_k == 0}


def _persistent_programs(device: torch.device) -> int:
    """Programs of a persistent launch: one per SM (the "pairs" forward holds one block per SM:
    ~200 registers x 256 threads). The interpreter gets a few, so that each program takes
    several work items."""
    if device.type != "cuda":
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tma_ready(query: torch.Tensor, gallery: torch.Tensor) -> bool:
    """Whether TMA descriptors can cover the features: 16-byte aligned starts and rows (the
    fitted "pairs" variant already has D % 16 == 0) and row counts within TMA's int32."""
    return (TensorDescriptor is not None
            and all(t.data_ptr() % 16 == 0 and t.shape[0] * t.shape[1] < 2 ** 31
                    for t in (query, gallery)))


def _descriptor(features: torch.Tensor, block_rows: int, block_k: int):
    """A TMA descriptor over the [N * L, D] rows of ``features``, loading [block_rows, block_k]
    tiles (out-of-range rows and features read as zeros)."""
    return TensorDescriptor.from_tensor(features.view(-1, features.shape[-1]), [block_rows, block_k])


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' (cuda:1 stays on 1)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# Launch wrappers.


def _check(query: torch.Tensor, gallery: torch.Tensor, sig: Optional[torch.Tensor]) -> None:
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"Triton max_sim: query dtype must be float32/float16/bfloat16, got {query.dtype}")
    if not (query.is_contiguous() and gallery.is_contiguous()):
        raise ValueError("Triton max_sim: query and gallery must be contiguous")
    if sig is not None and (sig.dtype != torch.float32 or not sig.is_contiguous()):
        raise ValueError("Triton max_sim: the gate must be a contiguous float32 [Lg, Lq] tensor")


def forward(query: torch.Tensor, gallery: torch.Tensor, sig: Optional[torch.Tensor],
            outputs: tuple, config: Optional[ForwardConfig] = None,
            precision: Optional[str] = None, ablation: Optional[str] = None) -> tuple:
    """Fills ``outputs = (q_best, g_best, q_index, g_index)`` and returns them.

    ``sig`` is ``sigmoid(score_embed)`` as contiguous float32 ``[Lg, Lq]``, or None for no gate.
    ``precision`` ("tf32" / "ieee") applies to float32 inputs; default exact. ``ablation``: one
    of ABLATIONS, for benchmarks only (the GPU suite's ncu section; the op never passes one):
    the outputs it does not compute are left as they were, and "gate_off" drops ``sig``.
    """
    code = FULL.value
    if ablation is not None:
        if ablation not in ABLATIONS:
            raise ValueError(f"Triton max_sim: ablation must be one of {ABLATIONS}, "
                             f"got {ablation!r}")
        sig = None if ablation == "gate_off" else sig
        code = _ABLATION_CODES[ablation]
    _check(query, gallery, sig)
    num_query, len_q, dim = query.shape
    num_gallery, len_g, _ = gallery.shape
    q_best, g_best, q_index, g_index = outputs
    if num_query == 0 or num_gallery == 0:
        return outputs
    config = (_fitted(config, len_q, len_g, dim, query.dtype) if config
              else forward_config(len_q, len_g, dim, query.dtype))
    num_s = triton.cdiv(len_g, config.block_s)
    grid, args, extra = (num_query * num_gallery,), (), {"GROUP_Q": config.group_q}
    features = (query, gallery)
    if config.tma and not _tma_ready(query, gallery):
        config = replace(config, tma=False)
    if config.variant == "strip":
        kernel, extra["NUM_S"] = _max_sim_forward_strip_kernel, num_s
    elif config.variant == "pairs":
        kernel, args = _max_sim_forward_pairs_kernel, (config.group_g,)
        work = num_query * triton.cdiv(num_gallery, config.group_g)
        grid = (min(work, _persistent_programs(query.device)),)
        extra = dict(pairs_constexprs(config, len_q, len_g, dim), TMA=config.tma)
        if config.tma:
            features = (_descriptor(query, config.block_t, config.block_k),
                        _descriptor(gallery, config.block_s, config.block_k))
    else:
        kernel = _max_sim_forward_kernel
    with _on_device(query):
        kernel[grid](
            *features, sig if sig is not None else query,
            q_best, g_best, q_index, g_index,
            num_query, num_gallery, len_q, len_g, dim, *args,
            HAS_GATE=sig is not None,
            BLOCK_S=config.block_s, BLOCK_T=config.block_t, BLOCK_K=config.block_k, **extra,
            INPUT_PRECISION=precision or input_precision(query.dtype, False), ABLATION=code,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return outputs


def backward(grad_q_best: Optional[torch.Tensor], grad_g_best: Optional[torch.Tensor],
             query: torch.Tensor, gallery: torch.Tensor, sig: Optional[torch.Tensor],
             q_best: torch.Tensor, g_best: torch.Tensor,
             q_index: torch.Tensor, g_index: torch.Tensor,
             grad_query: Optional[torch.Tensor], grad_gallery: Optional[torch.Tensor],
             grad_score_embed: Optional[torch.Tensor],
             config: Optional[BackwardConfig] = None, precision: Optional[str] = None) -> None:
    """Fills the float32 gradient buffers that are given (None = not needed).

    ``grad_q_best`` / ``grad_g_best`` are contiguous float32 or None (no gradient from that output).
    d query and d gallery are gathers of feature rows in float32 (max_sim_gather: ``precision``
    does not apply). ``grad_score_embed`` needs ``sig``; it is ``(1 - sig) * sum_p partial_p``
    with one partial per slice of query images, summed in a fixed order.
    """
    _check(query, gallery, sig)
    num_query, len_q, dim = query.shape
    num_gallery, len_g, _ = gallery.shape
    if grad_score_embed is not None and sig is None:
        raise ValueError("Triton max_sim backward: grad_score_embed needs the gate")
    empty = num_query == 0 or num_gallery == 0 or (grad_q_best is None and grad_g_best is None)
    if empty:
        for grad in (grad_query, grad_gallery, grad_score_embed):
            if grad is not None:
                grad.zero_()
        return
    config = config or backward_config(len_q, len_g, dim, query.dtype)
    any_grad = grad_q_best if grad_q_best is not None else grad_g_best
    grads = dict(grad_q_ptr=grad_q_best if grad_q_best is not None else any_grad,
                 grad_g_ptr=grad_g_best if grad_g_best is not None else any_grad,
                 HAS_GRAD_Q=grad_q_best is not None, HAS_GRAD_G=grad_g_best is not None)
    gather = dict(block_d=config.block_d, chunk=config.chunk, num_warps=config.num_warps)
    with _on_device(query):
        if grad_query is not None:
            max_sim_gather.launch(gallery, sig, grad_query, grad_q_best, q_index, grad_g_best,
                                  g_index, num_query, len_q, own_is_query=True, **gather)
        if grad_score_embed is not None:
            # One fp32 partial per slice of query images, summed in a fixed order: deterministic.
            num_partials = min(num_query, config.score_embed_partials)
            partial = torch.empty((num_partials, len_g, len_q), dtype=torch.float32,
                                  device=query.device)
            grid = (num_partials, triton.cdiv(len_g, config.block_s),
                    triton.cdiv(len_q, config.block_t))
            max_sim_score_embed._max_sim_backward_score_embed_kernel[grid](
                q_index_ptr=q_index, g_index_ptr=g_index, q_best_ptr=q_best, g_best_ptr=g_best,
                partial_ptr=partial, num_query=num_query, num_gallery=num_gallery,
                len_q=len_q, len_g=len_g, BLOCK_S=config.block_s, BLOCK_T=config.block_t,
                num_warps=8, **grads,
            )
            torch.sum(partial, dim=0, out=grad_score_embed)
            grad_score_embed.mul_(1.0 - sig)
        if grad_gallery is not None:
            max_sim_gather.launch(query, sig, grad_gallery, grad_g_best, g_index, grad_q_best,
                                  q_index, num_gallery, len_g, own_is_query=False, **gather)
