"""The "pairs" forward kernel of ``max_sim`` (launched by kernels/max_sim.py, which holds the
op's conventions): persistent programs, a query block and its gate held while a program walks
several gallery images, each met whole; max and argmax without 64-bit keys."""

from __future__ import annotations

import triton
import triton.language as tl

from .max_sim_common import (FULL, HAS_ASSUME, MAX_ONLY, MMA_ONLY, _gallery_blocks, _kept,
                             _max_nan, _store_best, _store_kept)


@triton.jit
def _pairs_scores(acc, sig, s_in, t_in, HAS_GATE: tl.constexpr, EVEN_L: tl.constexpr):
    """A score tile in which equal numbers have equal bits, so the argmax can compare bits:
    + 0.0 turns -0.0 into +0.0 (fused into the gate's multiply: one FFMA; a nonzero product
    below 2**-149 in magnitude still rounds to -0.0, which can then lose a tie with +0.0 to a
    higher index: scores of ~1e-45 only), and NVIDIA GPUs
    write every NaN result as the canonical 0x7FFFFFFF, as max.NaN does (the NaN tests of
    tests/test_triton_kernels.py check it on the GPU; in the interpreter the NaNs of one call
    share numpy's payload). Padding is -inf."""
    if HAS_GATE:
        acc = acc * sig + 0.0
    else:
        acc = acc + 0.0
    if not EVEN_L:
        acc = tl.where(s_in[:, None] & t_in[None, :], acc, float("-inf"))
    return acc


@triton.jit
def _pairs_gate(sig_ptr, offs_s, offs_t, s_in, t_in, len_q, EVEN_L: tl.constexpr):
    if EVEN_L:
        return tl.load(sig_ptr + offs_s[:, None] * len_q + offs_t[None, :])
    return tl.load(sig_ptr + offs_s[:, None] * len_q + offs_t[None, :],
                   mask=s_in[:, None] & t_in[None, :], other=0.0)


@triton.jit
def _pairs_gates(sig_ptr, offs_s0, offs_s1, offs_s2, offs_s3, s_in0, s_in1, s_in2, s_in3,
                 offs_t, t_in, len_q, NUM_S: tl.constexpr, EVEN_L: tl.constexpr):
    sig0 = _pairs_gate(sig_ptr, offs_s0, offs_t, s_in0, t_in, len_q, EVEN_L)
    sig1, sig2, sig3 = sig0, sig0, sig0
    if NUM_S > 1:
        sig1 = _pairs_gate(sig_ptr, offs_s1, offs_t, s_in1, t_in, len_q, EVEN_L)
    if NUM_S > 2:
        sig2 = _pairs_gate(sig_ptr, offs_s2, offs_t, s_in2, t_in, len_q, EVEN_L)
    if NUM_S > 3:
        sig3 = _pairs_gate(sig_ptr, offs_s3, offs_t, s_in3, t_in, len_q, EVEN_L)
    return sig0, sig1, sig2, sig3


@triton.jit
def _pairs_dot(g_image, offs_s, s_in, offs_k, k_in, q_t, acc, dim,
               EVEN_L: tl.constexpr, EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    ptrs = g_image + offs_s[:, None] * dim + offs_k[None, :]
    if EVEN_L and EVEN_K:
        g = tl.load(ptrs)
    else:
        g = tl.load(ptrs, mask=s_in[:, None] & k_in[None, :], other=0.0)
    return tl.dot(g, q_t, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _pairs_block(score, q_at, offs_s, s_in, offs_t, first, g_offs, t0, len_q, g_best_ptr,
                 g_index_ptr, ABLATION: tl.constexpr):
    """One accumulator's share of both argmaxes. An argmax is the lowest index whose score has
    the bit pattern of the NaN-propagating max (one integer compare a score: zeros are +0.0 and
    NaNs canonical, _pairs_scores). Query direction: ``first`` takes this block's rows that
    reach the column max ``q_at`` (blocks come highest first, so a lower block's hit
    overrides). Gallery direction: this block's row max and its first column, folded into the
    pair's g_best of the earlier query blocks (written by this program; later blocks have
    higher indices). MAX_ONLY: the row max alone."""
    best = tl.reduce(score, 1, _max_nan)
    if ABLATION == MAX_ONLY:
        if t0 > 0:
            best = _max_nan(best, tl.load(g_best_ptr + g_offs + offs_s, mask=s_in, other=0.0))
        tl.store(g_best_ptr + g_offs + offs_s, best, mask=s_in)
        return first
    bits = score.to(tl.int32, bitcast=True)
    first = tl.where(bits == q_at, offs_s[:, None], first)
    arg = tl.min(tl.where(bits == best.to(tl.int32, bitcast=True)[:, None], offs_t[None, :],
                          0x7FFFFFFF), 1)
    arg = tl.minimum(arg, len_q - 1)  # in range even if a NaN came with another payload
    if t0 > 0:
        # The earlier blocks' maximum stays unless the NaN-propagating max changes its bits
        # (a tie or a second NaN keeps the lower index): 3 instructions a row, not 5.
        old = tl.load(g_best_ptr + g_offs + offs_s, mask=s_in, other=0.0)
        old_arg = tl.load(g_index_ptr + g_offs + offs_s, mask=s_in, other=0)
        best = _max_nan(best, old)
        arg = tl.where(best.to(tl.int32, bitcast=True) == old.to(tl.int32, bitcast=True),
                       old_arg, arg)
    _store_best(g_best_ptr, g_index_ptr, g_offs + offs_s, s_in, best, arg)
    return first


@triton.jit
def _pairs_dots_tma(q_desc, g_desc, q_row, g_row, dim, acc0, acc1, acc2, acc3,
                    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, NUM_S: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr):
    """One pair's dot products with the tiles loaded by TMA (tensor descriptors over the
    [N * L, D] features): no address arithmetic in the loop, out-of-range rows and features
    read as zeros (rows past an image's L read the next image: masked in the epilogue)."""
    for k0 in range(0, dim, BLOCK_K):
        q_t = tl.trans(q_desc.load([q_row, k0]))
        acc0 = tl.dot(g_desc.load([g_row, k0]), q_t, acc0, input_precision=INPUT_PRECISION)
        if NUM_S > 1:
            acc1 = tl.dot(g_desc.load([g_row + BLOCK_S, k0]), q_t, acc1,
                          input_precision=INPUT_PRECISION)
        if NUM_S > 2:
            acc2 = tl.dot(g_desc.load([g_row + 2 * BLOCK_S, k0]), q_t, acc2,
                          input_precision=INPUT_PRECISION)
        if NUM_S > 3:
            acc3 = tl.dot(g_desc.load([g_row + 3 * BLOCK_S, k0]), q_t, acc3,
                          input_precision=INPUT_PRECISION)
    return acc0, acc1, acc2, acc3


@triton.jit
def _max_sim_forward_pairs_kernel(
    q_ptr, g_ptr, sig_ptr,
    q_best_ptr, g_best_ptr, q_index_ptr, g_index_ptr,
    num_query, num_gallery, len_q, len_g, dim, group_g,
    HAS_GATE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, NUM_S: tl.constexpr,
    EVEN_L: tl.constexpr, EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ABLATION: tl.constexpr = FULL, TMA: tl.constexpr = False,
):
    # TMA: q_ptr and g_ptr are tensor descriptors (_pairs_dots_tma), not pointers.
    # Persistent: the grid is about one program per SM, each takes work items (query image i,
    # group_g consecutive gallery images) in turn. Within one, a query block of BLOCK_T
    # locations and its gate columns [Lg, BLOCK_T] stay fixed (the gate in registers) while the
    # program walks the gallery images; the whole gallery image (NUM_S <= 4 accumulators of
    # BLOCK_S rows) meets the query block at once, so q_best is final after one pass. g_best
    # runs across query blocks through the output (owned by this program).
    # Max and argmax without 64-bit keys: a NaN-propagating max (elementwise across the NUM_S
    # accumulators for q_best, then one reduction over rows per pair; one reduction over
    # columns per accumulator for g_best), then the argmax as the lowest index whose score has
    # the max's bits (_pairs_block): ~2 integer instructions a score instead of a key chain.
    pid = tl.program_id(0)
    num_chunks = tl.cdiv(num_gallery, group_g)
    arange_t = tl.arange(0, BLOCK_T)
    arange_k = tl.arange(0, BLOCK_K)
    offs_s0, offs_s1, offs_s2, offs_s3, s_in0, s_in1, s_in2, s_in3 = _gallery_blocks(len_g, BLOCK_S)
    keep = tl.zeros((BLOCK_S, BLOCK_T), tl.float32)  # MMA_ONLY's running tile
    for work in range(pid, num_query * num_chunks, tl.num_programs(0)):
        i = work // num_chunks
        j_first = (work % num_chunks) * group_g
        j_end = tl.minimum(j_first + group_g, num_gallery)
        if not TMA:
            q_image = q_ptr + i.to(tl.int64) * len_q * dim
        for t0 in range(0, len_q, BLOCK_T):
            offs_t = t0 + arange_t
            t_in = offs_t < len_q
            sig0 = tl.zeros((BLOCK_S, BLOCK_T), tl.float32)
            sig1, sig2, sig3 = sig0, sig0, sig0
            if HAS_GATE:  # loaded once per query block, used for group_g pairs
                sig0, sig1, sig2, sig3 = _pairs_gates(sig_ptr, offs_s0, offs_s1, offs_s2, offs_s3,
                                                      s_in0, s_in1, s_in2, s_in3, offs_t, t_in,
                                                      len_q, NUM_S, EVEN_L)
            # Advanced per gallery image (in the interpreter the loop index is a Python int).
            if not TMA:
                g_image = g_ptr + j_first.to(tl.int64) * len_g * dim
            pair = i.to(tl.int64) * num_gallery + j_first
            for j in range(j_first, j_end):
                acc0 = tl.zeros((BLOCK_S, BLOCK_T), tl.float32)
                acc1, acc2, acc3 = acc0, acc0, acc0
                if HAS_ASSUME:  # no zero-trip guard, so no second zeroing of the accumulators
                    tl.assume(dim > 0)
                if TMA:
                    acc0, acc1, acc2, acc3 = _pairs_dots_tma(
                        q_ptr, g_ptr, i * len_q + t0, j * len_g, dim, acc0, acc1, acc2, acc3,
                        BLOCK_S, BLOCK_K, NUM_S, INPUT_PRECISION)
                else:
                    for k0 in range(0, dim, BLOCK_K):
                        offs_k = k0 + arange_k
                        k_in = offs_k < dim
                        q_ptrs = q_image + offs_t[:, None] * dim + offs_k[None, :]
                        if EVEN_L and EVEN_K:
                            q = tl.load(q_ptrs)
                        else:
                            q = tl.load(q_ptrs, mask=t_in[:, None] & k_in[None, :], other=0.0)
                        q_t = tl.trans(q)
                        acc0 = _pairs_dot(g_image, offs_s0, s_in0, offs_k, k_in, q_t, acc0, dim,
                                          EVEN_L, EVEN_K, INPUT_PRECISION)
                        if NUM_S > 1:
                            acc1 = _pairs_dot(g_image, offs_s1, s_in1, offs_k, k_in, q_t, acc1, dim,
                                              EVEN_L, EVEN_K, INPUT_PRECISION)
                        if NUM_S > 2:
                            acc2 = _pairs_dot(g_image, offs_s2, s_in2, offs_k, k_in, q_t, acc2, dim,
                                              EVEN_L, EVEN_K, INPUT_PRECISION)
                        if NUM_S > 3:
                            acc3 = _pairs_dot(g_image, offs_s3, s_in3, offs_k, k_in, q_t, acc3, dim,
                                              EVEN_L, EVEN_K, INPUT_PRECISION)
                if ABLATION == MMA_ONLY:
                    keep = _kept(keep, acc0, acc1, acc2, acc3, NUM_S)
                else:
                    g_offs = pair * len_g
                    # The column maxima (best gallery location per query location): elementwise
                    # over the accumulators, then one reduction over rows.
                    score0 = _pairs_scores(acc0, sig0, s_in0, t_in, HAS_GATE, EVEN_L)
                    col = score0
                    if NUM_S > 1:
                        score1 = _pairs_scores(acc1, sig1, s_in1, t_in, HAS_GATE, EVEN_L)
                        col = _max_nan(col, score1)
                    if NUM_S > 2:
                        score2 = _pairs_scores(acc2, sig2, s_in2, t_in, HAS_GATE, EVEN_L)
                        col = _max_nan(col, score2)
                    if NUM_S > 3:
                        score3 = _pairs_scores(acc3, sig3, s_in3, t_in, HAS_GATE, EVEN_L)
                        col = _max_nan(col, score3)
                    q_max = tl.reduce(col, 0, _max_nan)
                    at = q_max.to(tl.int32, bitcast=True)[None, :]
                    first = tl.full((BLOCK_S, BLOCK_T), 0x7FFFFFFF, tl.int32)
                    if NUM_S > 3:
                        first = _pairs_block(score3, at, offs_s3, s_in3, offs_t, first, g_offs, t0,
                                             len_q, g_best_ptr, g_index_ptr, ABLATION)
                    if NUM_S > 2:
                        first = _pairs_block(score2, at, offs_s2, s_in2, offs_t, first, g_offs, t0,
                                             len_q, g_best_ptr, g_index_ptr, ABLATION)
                    if NUM_S > 1:
                        first = _pairs_block(score1, at, offs_s1, s_in1, offs_t, first, g_offs, t0,
                                             len_q, g_best_ptr, g_index_ptr, ABLATION)
                    first = _pairs_block(score0, at, offs_s0, s_in0, offs_t, first, g_offs, t0,
                                         len_q, g_best_ptr, g_index_ptr, ABLATION)
                    _store_best(q_best_ptr, q_index_ptr, pair * len_q + offs_t, t_in, q_max,
                                tl.minimum(tl.min(first, 0), len_g - 1), ABLATION)
                if not TMA:
                    g_image += len_g * dim
                pair += 1
            # The next query block reads back the g_best just written, maybe by other threads.
            tl.debug_barrier()
    if ABLATION == MMA_ONLY:  # into pair pid's row (pid < work items <= pairs)
        _store_kept(q_best_ptr, pid * len_q + arange_t, arange_t < len_q, keep)
