"""The CPU benchmark script runs end to end on a tiny shape and writes its result file."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_cpu  # noqa: E402

from transmatcher_fast.ops import dispatch  # noqa: E402

pytestmark = pytest.mark.skipif("cpu" not in dispatch.available_backends("cpu"),
                                reason="C++ extension not built")


def test_bench_cpu_writes_results(tmp_path, capsys):
    assert bench_cpu.main(["--shapes", "2,3,8,4", "--repeat", "1", "--out", str(tmp_path),
                           "--no-memory", "--no-plot"]) == 0
    result = json.loads((tmp_path / "bench_cpu.json").read_text())
    assert result["environment"]["torch"] and result["environment"]["threads"] >= 1
    methods = {(r["mode"], r["method"]) for r in result["rows"]}
    assert ("forward", "gemm") in methods and ("training", "ours") in methods
    assert all(r["seconds"] > 0 for r in result["rows"])
    assert result["summary"][0]["shape"] == "2x3x8x4"
    assert "forward+backward" in capsys.readouterr().out


def test_memory_is_measured_in_a_fresh_process():
    shape = (16, 16, 96, 16)
    score_bytes = 16 * 16 * 96 * 96 * 4  # one materialised float32 score tensor
    reference_bytes = bench_cpu.measure_memory_in_child("reference", "forward", shape)
    ours_bytes = bench_cpu.measure_memory_in_child("ours", "forward", shape)
    # The reference holds the einsum result and its gated copy at once; the fused op neither.
    assert reference_bytes >= 0.9 * 2 * score_bytes
    assert ours_bytes <= 0.25 * reference_bytes
