"""The matcher memory benchmark runs end to end on tiny sizes and writes its result file.
Timings are recorded, never asserted."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_matcher  # noqa: E402

from transmatcher_fast.ops import dispatch  # noqa: E402

pytestmark = pytest.mark.skipif("cpu" not in dispatch.available_backends("cpu"),
                                reason="C++ extension not built")

TINY = ["--batch", "8", "--height", "6", "--width", "4", "--d-model", "8", "--layers", "2",
        "--dim-feedforward", "16"]


def test_bench_matcher_writes_results(tmp_path, capsys):
    assert bench_matcher.main([*TINY, "--repeat", "1", "--out", str(tmp_path), "--no-plot"]) == 0
    result = json.loads((tmp_path / "bench_matcher.json").read_text())
    assert result["environment"]["torch"] and result["args"]["batch"] == 8
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"ours", "reference"}
    assert all(r["seconds"] > 0 and r["peak_extra_bytes"] >= 0 for r in rows.values())
    # Both methods run the same module on the same batch: the losses agree.
    assert result["summary"]["loss_relative_difference"] < 1e-5
    assert "less extra peak memory" in capsys.readouterr().out
