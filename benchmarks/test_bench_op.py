"""Speed of max_sim from commit to commit, with pytest-benchmark (``make bench-pytest``).

Forward, and forward + backward, of every available backend and of upstream's materialised
reference (``reference.max_sim``), on a few shapes, in float32 and bfloat16: on CPU always, on
CUDA too when a GPU is present. ``make bench-pytest`` saves every run under ``.benchmarks/``
(``--benchmark-autosave``); compare a run with the previous one (and fail on a regression) with

    make bench-pytest BENCH_ARGS="--benchmark-compare --benchmark-compare-fail=median:15%"

or compare saved runs with ``pytest-benchmark compare``. This file is not collected by
``make test`` (pytest's testpaths is ``tests/``); ``tests/test_benchmarks.py`` runs it once on a
tiny shape with ``--benchmark-disable`` so that it keeps working.

The Triton backend on CPU only runs in the Triton interpreter, which is far too slow to time:
it is left out on CPU. TRANSMATCHER_FAST_BENCH_SHAPES="Nq,Ng,L,D;..." replaces the shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

import transmatcher_fast
from transmatcher_fast import max_sim, reference

DEFAULT_SHAPES = "8,8,96,128;16,16,192,512"  # well under 2 minutes on 2 CPU cores
DTYPES = ("float32", "bfloat16")
MODES = ("forward", "training")
UPSTREAM = "upstream"  # reference.max_sim: the materialised computation, called directly


def _shapes():
    text = os.environ.get("TRANSMATCHER_FAST_BENCH_SHAPES", DEFAULT_SHAPES)
    return [tuple(int(v) for v in item.split(",")) for item in text.split(";") if item.strip()]


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _implementations(device):
    names = transmatcher_fast.available_backends(device)
    if device == "cpu":  # the Triton interpreter (TRITON_INTERPRET=1) is not a speed to track
        names = [n for n in names if n != "triton"]
    return names + [UPSTREAM]


CASES = [
    pytest.param(device, impl, dtype, mode, shape,
                 id=f"{device}-{impl}-{dtype}-{mode}-{'x'.join(map(str, shape))}")
    for device in _devices()
    for shape in _shapes()
    for dtype in DTYPES
    for mode in MODES
    for impl in _implementations(device)
]


def _inputs(device, dtype, shape, requires_grad):
    nq, ng, length, dim = shape
    generator = torch.Generator().manual_seed(0)
    features = getattr(torch, dtype)
    query = torch.randn(nq, length, dim, generator=generator).to(device, features)
    gallery = torch.randn(ng, length, dim, generator=generator).to(device, features)
    embed = (0.01 * torch.randn(length, length, generator=generator)).to(device)  # float32 gate
    return [t.requires_grad_(requires_grad) for t in (query, gallery, embed)]


def _call(device, impl, mode, inputs):
    op = reference.max_sim if impl == UPSTREAM else max_sim
    backend = None if impl == UPSTREAM else impl
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward():
        with transmatcher_fast.use_backend(backend), torch.no_grad():
            out = op(*inputs)
        sync()
        return out

    def training():
        with transmatcher_fast.use_backend(backend):
            q_best, g_best = op(*inputs)
            (q_best.sum() + g_best.sum()).backward()
        for t in inputs:
            t.grad = None
        sync()

    return forward if mode == "forward" else training


@pytest.mark.parametrize("device,impl,dtype,mode,shape", CASES)
def test_max_sim_speed(benchmark, device, impl, dtype, mode, shape):
    nq, ng, length, dim = shape
    call = _call(device, impl, mode, _inputs(device, dtype, shape, mode == "training"))
    call()  # warm-up: lazy initialisation is not the op's speed
    # One group per (device, shape, dtype, mode): the table compares implementations side by side.
    benchmark.group = f"{device} {'x'.join(map(str, shape))} {dtype} {mode}"
    benchmark.extra_info.update(
        {"device": device, "implementation": impl, "dtype": dtype, "mode": mode,
         "nq": nq, "ng": ng, "l": length, "d": dim,
         "flops": 2 * nq * ng * length * length * dim, "threads": torch.get_num_threads()})
    benchmark(call)
