"""Ahead-of-time compilation of every Triton kernel for Hopper (sm_90) and Ampere (sm_80), on a
machine without a GPU, with the divisibility specialisation a real launch gets
(benchmarks/triton_resources.py does the compiling and prints the table): the PTX must use the
tensor cores (wgmma / mma.sync), aligned 16-bit loads must go through cp.async, and no kernel
the GPU suite runs (every forward candidate, the backward) may spill on Hopper.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "triton_resources.py"


def _compile(tmp_path_factory, *flags):
    out = tmp_path_factory.mktemp("triton") / "resources.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, str(SCRIPT), *flags, "--json", str(out)],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)  # the resource table (pytest -s)
    return json.loads(out.read_text())["kernels"]


@pytest.fixture(scope="module")
def hopper(tmp_path_factory):
    return _compile(tmp_path_factory, "--target", "sm_90", "--precision", "fp16",
                    "--precision", "fp32-tf32")


@pytest.fixture(scope="module")
def ampere(tmp_path_factory):
    return _compile(tmp_path_factory, "--target", "sm_80", "--precision", "fp16",
                    "--geometry", "aligned")


def test_every_kernel_and_forward_candidate_compiles(hopper, ampere):
    from transmatcher_fast.kernels import max_sim as kernels

    import torch

    names = {"forward", "backward_query", "backward_gallery"}
    for rows, precisions in ((hopper, ("fp16", "fp32-tf32")), (ampere, ("fp16",))):
        for precision in precisions:
            got = [r for r in rows if r["precision"] == precision and r["geometry"] == "aligned"]
            assert names <= {r["kernel"] for r in got}, (precision, got)
    dtype = {"fp16": torch.float16, "fp32-tf32": torch.float32}
    for precision in ("fp16", "fp32-tf32"):
        expected = {c.name for c in kernels.forward_candidates(192, 192, 512, dtype[precision])}
        compiled = {r["config"] for r in hopper if r["kernel"] == "forward"
                    and r["precision"] == precision and r["geometry"] == "aligned"}
        assert compiled == expected and {"tiled", "strip"} == {n.split("-")[0] for n in compiled}


def test_hopper_ptx_uses_wgmma_and_ampere_ptx_mma(hopper, ampere):
    for row in hopper:
        assert row["wgmma"] or not row["has_dot"], row
    for row in ampere:
        assert (row["mma"] and not row["wgmma"]) or not row["has_dot"], row


def test_aligned_16bit_loads_are_asynchronous_copies(hopper):
    """With 16-byte aligned pointers and D = 512 the forward's tiles arrive by cp.async into a
    multi-stage shared-memory ring (48 KB at 3 stages); without the specialisation the compile
    showed neither (16 KB, plain loads), so this also checks that the report is specialised."""
    forward = [r for r in hopper if r["kernel"] == "forward" and r["precision"] == "fp16"]
    for row in forward:
        if row["geometry"] == "aligned":
            assert row["cp_async"] and row["shared_bytes"] >= 32768, row
        else:
            assert not row["cp_async"], row  # D % 16 != 0: rows are not 16-byte aligned


def test_nothing_the_gpu_runs_spills_on_hopper(hopper):
    for row in hopper:
        assert not row["spills"], row
