"""Pieces every forward kernel of ``max_sim`` shares (kernels/max_sim.py: "tiled" and "strip";
kernels/max_sim_pairs.py: "pairs"): the benchmark ablations and the output stores."""

from __future__ import annotations

import triton
import triton.language as tl

# Benchmark-only ablations inside each forward kernel's own structure (the GPU suite's ncu
# section, benchmarks/gpu_suite_ncu.py; the op never passes one): "gate_off" is the no-gate
# specialisation (HAS_GATE=False), "max_only" keeps both maxima but no argmax (the index
# outputs are left unwritten), "mma_only" keeps the loads and MMAs and reduces every score tile
# to one add a score into a running tile (written once per program into q_best), so the MMAs
# stay live but no epilogue runs.
ABLATIONS = ("gate_off", "max_only", "mma_only")
FULL: tl.constexpr = tl.constexpr(0)
MAX_ONLY: tl.constexpr = tl.constexpr(1)
MMA_ONLY: tl.constexpr = tl.constexpr(2)
_ABLATION_CODES = {"gate_off": 0, "max_only": 1, "mma_only": 2}
# tl.assume (triton >= 3.3 has it here; older ones compile without the hint).
HAS_ASSUME: tl.constexpr = tl.constexpr(hasattr(tl, "assume"))


@triton.jit
def _store_best(best_ptr, index_ptr, offs, mask, best, arg, ABLATION: tl.constexpr = FULL):
    tl.store(best_ptr + offs, best, mask=mask)
    if ABLATION != MAX_ONLY:
        tl.store(index_ptr + offs, arg, mask=mask)


@triton.jit
def _kept(keep, acc0, acc1, acc2, acc3, NUM_S: tl.constexpr):
    """MMA_ONLY: the accumulators added into the running tile, one add a score."""
    keep += acc0
    if NUM_S > 1:
        keep += acc1
    if NUM_S > 2:
        keep += acc2
    if NUM_S > 3:
        keep += acc3
    return keep


@triton.jit
def _store_kept(q_best_ptr, offs, mask, keep):
    """MMA_ONLY: the program's running tile, summed over rows, into q_best (keeps the MMAs)."""
    tl.store(q_best_ptr + offs, tl.sum(keep, 0), mask=mask)


@triton.jit
def _max_nan(a, b):
    """max that propagates NaN (max.NaN on the GPU, numpy's maximum in the interpreter)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _gallery_blocks(len_g, BLOCK_S: tl.constexpr):
    """The row offsets of the (up to 4) gallery blocks a strip or pairs program holds, and
    which of their rows are real locations."""
    offs_s0 = tl.arange(0, BLOCK_S)
    offs_s1 = offs_s0 + BLOCK_S
    offs_s2 = offs_s1 + BLOCK_S
    offs_s3 = offs_s2 + BLOCK_S
    return (offs_s0, offs_s1, offs_s2, offs_s3,
            offs_s0 < len_g, offs_s1 < len_g, offs_s2 < len_g, offs_s3 < len_g)
