"""The benchmark scripts run end to end on tiny shapes (the GPU suite: its correctness section,
on the Triton interpreter)."""

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
    methods = {(r["dtype"], r["mode"], r["method"]) for r in result["rows"]}
    for dtype in ("float32", "bfloat16"):  # both dtypes by default, in one interleaved run
        assert (dtype, "forward", "gemm") in methods and (dtype, "training", "ours") in methods
    assert all(r["seconds"] > 0 for r in result["rows"])
    assert result["summary"][0]["shape"] == "2x3x8x4"
    assert result["dtypes"] == ["float32", "bfloat16"] and isinstance(result["cpu_bf16_gemm"], bool)
    ratio = next(s for s in result["summary"] if "forward_bfloat16_speedup" in s)
    assert ratio["forward_bfloat16_speedup"] > 0 and ratio["gemm_bfloat16_speedup"] > 0
    out = capsys.readouterr().out
    assert "forward+backward" in out and "bfloat16 forward" in out


def test_bench_cpu_one_dtype_and_its_memory_child(tmp_path):
    assert bench_cpu.main(["--shapes", "2,2,4,6", "--repeat", "1", "--out", str(tmp_path),
                           "--no-memory", "--no-plot", "--dtypes", "bfloat16"]) == 0
    result = json.loads((tmp_path / "bench_cpu.json").read_text())
    assert {r["dtype"] for r in result["rows"]} == {"bfloat16"}
    assert not any("forward_bfloat16_speedup" in s for s in result["summary"])
    assert bench_cpu.measure_memory_in_child("ours", "training", (2, 2, 4, 6), "bfloat16") >= 0


def test_memory_is_measured_in_a_fresh_process():
    shape = (16, 16, 96, 16)
    score_bytes = 16 * 16 * 96 * 96 * 4  # one materialised float32 score tensor
    reference_bytes = bench_cpu.measure_memory_in_child("reference", "forward", shape)
    ours_bytes = bench_cpu.measure_memory_in_child("ours", "forward", shape)
    # The reference holds the einsum result and its gated copy at once; the fused op neither.
    assert reference_bytes >= 0.9 * 2 * score_bytes
    assert ours_bytes <= 0.25 * reference_bytes


def test_pytest_benchmark_suite_runs_on_a_tiny_shape(tmp_path):
    """benchmarks/test_bench_op.py (make bench-pytest) runs, untimed, on a tiny shape: every CPU
    case passes, and the Triton interpreter is left out of it."""
    import subprocess

    pytest.importorskip("pytest_benchmark")
    root = os.path.join(os.path.dirname(__file__), "..")
    env = dict(os.environ, TRANSMATCHER_FAST_BENCH_SHAPES="2,3,5,6")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.join("benchmarks", "test_bench_op.py"),
         "--benchmark-disable", "-p", "no:cacheprovider", "-q", "-rA", "-k", "cpu",
         f"--basetemp={tmp_path}"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    passed = [line for line in proc.stdout.splitlines() if line.startswith("PASSED")]
    # (cpu, reference, upstream) x (float32, bfloat16) x (forward, training)
    assert len(passed) == 12, proc.stdout[-3000:]
    for impl in ("[cpu-cpu-", "[cpu-reference-", "[cpu-upstream-"):
        assert sum(impl in line for line in passed) == 4
    assert not any("triton" in line for line in passed)


def test_bench_train_reports_throughput(tmp_path):
    import bench_train
    from transmatcher_fast.data import generate_synthetic

    data = tmp_path / "synthetic"
    generate_synthetic(data, ids=8, cams=2, images_per_cam=4, height=128, width=64)
    assert bench_train.main(["--steps", "2", "--batch", "16", "--workers", "0", "--data-dir", str(data),
                             "--skip-memory", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_train.json").read_text())
    assert result["throughput"]["steps"] == 2 and result["throughput"]["images_per_s_epoch"] > 0
    assert result["config"]["arch"] == "resnet18"


def test_bench_eval_compares_with_upstreams_chunked_evaluation(tmp_path):
    import bench_eval

    assert bench_eval.main(["--queries", "3", "--gallery", "5", "--layers", "2", "--height", "4", "--width", "2",
                            "--d-model", "16", "--dim-feedforward", "32", "--topk", "2", "--device", "cpu",
                            "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_eval.json").read_text())
    assert result["max_abs_distance_difference"] < 1e-5  # both evaluations give the same distances
    assert result["ours"]["seconds"] > 0 and result["upstream"]["peak_bytes"] is not None
    assert result["flops"] == 2 * 3 * 5 * 8 * 8 * 16 * 2


def test_bench_transreid_quick_writes_results(tmp_path):
    """The TransReID benchmark end to end (tiny ViT, one round): both computations, the same
    outputs, ratios and the JSON the GPU suite's 'transreid' section collects."""
    import subprocess

    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_transreid.py")
    result = subprocess.run([sys.executable, script, "--quick", "--device", "cpu", "--threads", "1",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(next(tmp_path.glob("bench_transreid_*.json")).read_text())
    for row in report["rows"]:
        assert row["train_speedup"] > 0 and row["train_memory_ratio"] > 0
        assert row["outputs"]["eval_feature_rel_error"]["ours_vs_reference"] < 1e-4
