"""Ahead-of-time compilation of every Triton kernel for Hopper (sm_90) and Ampere (sm_80), on a
machine without a GPU: the PTX must use the tensor cores (wgmma / mma.sync), and the forward
kernel must not spill. benchmarks/triton_resources.py does the compiling and prints the table.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "triton_resources.py"


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "resources.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--precision", "fp16", "--precision", "fp32-tf32",
         "--json", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)  # the resource table (pytest -s)
    return json.loads(out.read_text())["kernels"]


def test_every_kernel_compiles_for_both_targets(rows):
    names = {"forward", "backward_query", "backward_gallery"}
    for target in ("sm_90", "sm_80"):
        for precision in ("fp16", "fp32-tf32"):
            got = {r["kernel"] for r in rows if r["target"] == target and r["precision"] == precision}
            assert names <= got, (target, precision, got)


def test_hopper_ptx_uses_wgmma_and_ampere_ptx_mma(rows):
    for row in rows:
        if not row["has_dot"]:
            continue
        if row["target"] == "sm_90":
            assert row["wgmma"], row
        else:
            assert row["mma"] and not row["wgmma"], row


def test_forward_and_backward_kernels_do_not_spill_on_hopper(rows):
    for row in rows:
        if row["target"] == "sm_90" and row["precision"] == "fp16":
            assert not row["spills"], row
