"""benchmarks/gpu_suite.py and benchmarks/gpu_run.sh without a GPU: the sections that can run on
the Triton interpreter, the deadline and the saving after every section, the summary table, the
launch-table writer, and the build-then-measure path (defect 1: a package installed editable by
a subprocess cannot be imported by the process that ran it)."""

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_suite  # noqa: E402  (benchmarks/ is on sys.path, above)


def _needs_interpreter():
    import torch

    from transmatcher_fast.ops import dispatch

    if "triton" not in dispatch.available_backends("cpu") or torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter on CPU")


def _quiet(text):
    pass


# --------------------------------------------------------------------------------------------
# Correctness sections on the interpreter


def test_gpu_suite_correctness_checks_run_on_the_triton_interpreter():
    """The suite's correctness section, on CPU tensors through the interpreter (bf16 is broken
    there): its checks pass for the Triton kernels and record every error measure."""
    _needs_interpreter()
    report = gpu_suite.correctness(["triton"], _quiet, device="cpu",
                                   shapes=[(2, 3, 9, 7, 20)], labels=["fp32-ieee", "fp16"])
    assert len(report["checks"]) == 2
    for check in report["checks"]:
        assert check["ok"], check
        assert set(check["errors"]) == {"q_best", "g_best", "grad_query", "grad_gallery",
                                        "grad_score_embed"}


def test_ties_give_the_lowest_index_and_backends_agree():
    """Integer inputs: many equal maxima; values exact, argmax the reference's lowest index, and
    the two backends given (here Triton and the C++ CPU kernel) agree."""
    _needs_interpreter()
    from transmatcher_fast.ops import dispatch

    backends = ["triton"] + (["cpu"] if "cpu" in dispatch.available_backends("cpu") else [])
    report = gpu_suite.ties(backends, _quiet, device="cpu", shapes=[(2, 3, 9, 7, 6)],
                            labels=["fp32-ieee", "fp16"])
    assert len(report["checks"]) == 2 * 2 * len(backends)  # 2 gates x 2 precisions x backends
    for check in report["checks"]:
        assert check["ok"], check
        assert check["tied_fraction"] > 0.1  # the inputs really tie
    if len(backends) == 2:
        assert report["triton_vs_cuda"] and all(a["ok"] for a in report["triton_vs_cuda"])


def test_nan_at_length_192_reaches_its_outputs_with_the_references_index():
    _needs_interpreter()
    report = gpu_suite.nan_check(["triton"], _quiet, device="cpu", shape=(2, 2, 192, 192, 16),
                                 labels=["fp32-ieee"])
    (check,) = report["checks"]
    assert check["ok"], check
    assert check["q"]["reached"] > 0 and check["g"]["reached"] > 0


def test_failed_checks_are_collected_for_the_exit_code():
    results = {"correctness": {"checks": [{"ok": True}, {"ok": False, "backend": "cuda"}]},
               "ties": {"error": "Traceback ..."},
               "offset_2_31": {"checks": [], "triton_vs_cuda_same_argmax": False},
               "pytest": {"returncode": 1, "summary": ["1 failed"]}}
    sections = [f["section"] for f in gpu_suite.correctness_failures(results)]
    assert sections == ["correctness", "ties", "offset_2_31", "pytest"]
    assert gpu_suite.correctness_failures({"correctness": {"checks": [{"ok": True}]}}) == []


# --------------------------------------------------------------------------------------------
# The 2**31 case: shape arithmetic and its code path on a tiny shape


def test_offset_plan_passes_2_31_and_needs_about_36_gb():
    plan = gpu_suite.offset_plan(free_bytes=139 << 30)
    assert plan["elements_per_output"] == 3400 * 3400 * 192 > 2 ** 31
    assert plan["passes_2_31"] and plan["checked_rows_past_2_31"]
    assert (3400 - plan["rows"]) * 3400 * 192 >= 2 ** 31  # every checked row lies past it
    assert 35e9 < plan["output_bytes"] < 36e9
    assert plan["fits"]
    assert not gpu_suite.offset_plan(free_bytes=24 << 30)["fits"]  # a 24 GB card skips it
    assert not gpu_suite.offset_plan(nq=100, ng=100)["passes_2_31"]
    assert plan["estimate_s_per_backend"] * 2 < gpu_suite.ESTIMATES["offset_2_31"]


def test_offset_case_code_path_on_a_tiny_shape():
    """The section's code (poisoned outputs, last rows against float64, backend agreement) on a
    shape far below 2**31 with the plan's flags forced (and fp16: bf16 is broken in the
    interpreter): only the arithmetic above is about 2**31."""
    _needs_interpreter()
    from transmatcher_fast.ops import dispatch

    plan = gpu_suite.offset_plan(nq=5, ng=4, length=7, d=16, rows=2, dtype="float16")
    plan.update(passes_2_31=True, checked_rows_past_2_31=True)
    backends = ["triton"] + (["cpu"] if "cpu" in dispatch.available_backends("cpu") else [])
    result = gpu_suite.offset_case(backends, _quiet, device="cpu", plan=plan)
    assert [c["backend"] for c in result["checks"]] == backends
    for check in result["checks"]:
        assert check["ok"], check
    if len(backends) == 2:
        assert result["triton_vs_cuda_same_argmax"]
    with pytest.raises(ValueError):
        gpu_suite.offset_case(backends, _quiet, device="cpu",
                              plan=gpu_suite.offset_plan(nq=5, ng=4, length=7, d=16, rows=2))


# --------------------------------------------------------------------------------------------
# Deadline, saving after every section, the watchdog


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_sections_skip_past_the_deadline_and_save_after_each(tmp_path):
    clock = FakeClock()
    suite = gpu_suite.Suite(tmp_path, "fake", deadline_at=clock.now + 100, clock=clock, echo=False)
    seen = []

    def first():
        clock.now += 30
        return {"value": 1}

    def second():  # the JSON on disk already holds the first section
        seen.append(json.loads(suite.json_path.read_text()))
        clock.now += 50
        raise RuntimeError("boom")

    assert suite.section("first", first, estimate_s=10) == {"value": 1}
    assert "boom" in suite.section("second", second, estimate_s=60)["error"]
    # 20 s left: a section estimated at 25 s is skipped without running, one at 5 s runs.
    assert suite.section("too_long", lambda: pytest.fail("must not run"), estimate_s=25) is None
    suite.section("short", lambda: {"ok": True}, estimate_s=5)
    suite.section("unselected", None, skip_reason="not selected")

    assert seen[0]["sections"]["first"]["status"] == "ok" and seen[0]["first"] == {"value": 1}
    assert seen[0]["sections"]["second"]["status"] == "running"
    saved = json.loads(suite.json_path.read_text())
    sections = saved["sections"]
    assert [sections[n]["status"] for n in ("first", "second", "too_long", "short", "unselected")] \
        == ["ok", "error", "skipped", "ok", "skipped"]
    assert "boom" in saved["second"]["error"]
    assert "deadline" in sections["too_long"]["reason"] and sections["too_long"]["estimate_s"] == 25
    assert sections["first"]["seconds"] == 30.0 and sections["second"]["seconds"] == 50.0
    assert saved["seconds_left_before_deadline"] == 20.0
    assert "[too_long] skipped" in suite.log_path.read_text()


def test_watchdog_saves_the_section_in_flight_and_exits(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO / 'benchmarks')!r})
        import gpu_suite
        from pathlib import Path
        suite = gpu_suite.Suite(Path({str(tmp_path)!r}), "dog", time.time() + 0.3, echo=False)
        suite.start_watchdog(grace_s=0.3)
        suite.current = "hanging"
        time.sleep(30)
    """)
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == 124 and time.time() - start < 20
    saved = json.loads((tmp_path / "gpu_suite_dog.json").read_text())
    assert saved["sections"]["hanging"]["status"] == "killed"


# --------------------------------------------------------------------------------------------
# Summary table, launch table


def _fake_results():
    rows = gpu_suite.report_rows(3e12, {"triton": 10.0, "cuda": 12.0, "reference": 40.0, "gemm": 5.0},
                                 {"triton": 2 << 20, "cuda": 3 << 20, "reference": 400 << 20},
                                 {"compiled_reference": "Traceback: no compiler"})
    return {"device": "Fake GPU", "deadline_s": 480, "seconds_left_before_deadline": 12.5,
            "sections": {"build": {"status": "ok", "seconds": 80.0, "estimate_s": 0},
                         "correctness": {"status": "ok", "seconds": 50.0, "estimate_s": 90},
                         "market_eval": {"status": "skipped", "estimate_s": 150,
                                         "reason": "deadline: 12 s left"}},
            "build": {"ok": True, "with_extension": False, "fallback": True},
            "correctness": {"checks": [{"ok": True}, {"ok": False}], "triton_vs_cuda": []},
            "training": {"methods": rows},
            "evaluation": {"bf16": {"methods": rows}, "fp32-tf32": {"skipped": "deadline"}},
            "variants": {"summary": {"large-bf16": {"best": "cuda-qg8", "best_ms": 1.5,
                                                    "best_tflops": 600.0, "fraction_of_gemm": 0.8,
                                                    "gain_over_default": 1.2, "default": "tiled"},
                                     "small-fp16": {"best": None}}},
            "correctness_failures": [{"section": "correctness"}]}


def test_summary_table_lists_sections_and_every_method():
    table = gpu_suite.summary_table(_fake_results())
    print(table)
    lines = table.splitlines()
    assert "Fake GPU" in lines[0]
    assert any(l.startswith("build") and "NOT built" in l and "fallback" in l for l in lines)
    assert any(l.startswith("correctness") and "1/2 checks ok" in l for l in lines)
    assert any(l.startswith("market_eval") and "skipped" in l for l in lines)
    triton = next(l for l in lines if l.strip().startswith("triton"))
    # 10 ms, 300 TFLOP/s, 50% of the GEMM, 4x the reference, 2 MB
    assert triton.split()[1:6] == ["10.000", "300.0", "50.0%", "4.00", "2"]
    assert any("compiled_reference" in l and "ERROR" in l for l in lines)
    assert any("large-bf16" in l and "cuda-qg8" in l for l in lines)
    assert any("small-fp16" in l and "no correct launch" in l for l in lines)
    assert lines[-1] == "correctness failures: 1"


def test_tuning_table_picks_the_fastest_correct_launch_and_validates(tmp_path):
    from transmatcher_fast.ops import tuning

    tiled = {"block_s": 64, "block_t": 64, "block_k": 64, "group_q": 8, "num_warps": 4,
             "num_stages": 3, "variant": "tiled"}
    strip = dict(tiled, variant="strip", num_stages=2)
    sweep = {"classes": {
        "small-fp16": {"variants": [
            {"backend": "triton", "name": "tiled", "config": tiled, "ok": True, "ms": 1.0},
            {"backend": "triton", "name": "strip", "config": strip, "ok": True, "ms": 0.8},
            {"backend": "cuda", "name": "cuda-qg0", "query_group": 0, "ok": True, "ms": 0.9},
            {"backend": "cuda", "name": "cuda-qg8", "query_group": 8, "ok": False, "ms": 0.1},
            {"backend": "triton", "name": "broken", "config": tiled, "ok": False,
             "error": "OutOfResources"},
            {"backend": "triton", "name": "late", "config": tiled, "skipped": "sweep budget"}]},
        "large-bf16": {"variants": [
            {"backend": "triton", "name": "tiled", "config": tiled, "ok": True, "ms": 5.0},
            {"backend": "cuda", "name": "cuda-qg16", "query_group": 16, "ok": True, "ms": 4.0},
            {"backend": "cuda", "name": "cuda-qg1", "query_group": 1, "ok": True, "ms": 4.5}]},
        "large-fp32-tf32": {"variants": [
            {"backend": "triton", "name": "tiled", "config": tiled, "ok": False, "ms": 1.0}]},
    }}
    table = gpu_suite.propose_tuning_table(sweep, "Fake GPU", "test")
    assert table["format"] == tuning.FORMAT and table["device"] == "Fake GPU"
    assert table["classes"]["small-fp16"] == {"backend": "triton", "triton": strip,
                                              "cuda": {"query_group": 0}}
    assert table["classes"]["large-bf16"] == {"backend": "cuda", "triton": tiled,
                                              "cuda": {"query_group": 16}}
    assert "large-fp32-tf32" not in table["classes"]  # nothing correct was measured
    path = gpu_suite.write_tuning_table(table, tmp_path, "fake-gpu")
    assert path.name == "gpu_tuning_fake-gpu.json"
    assert tuning.load(str(path)) == table  # the file dispatch would read validates
    summary = gpu_suite.sweep_summary(sweep)
    assert summary["small-fp16"]["best"] == "strip" and summary["small-fp16"]["skipped"] == 1
    assert summary["small-fp16"]["gain_over_default"] == pytest.approx(1.25)
    assert summary["small-fp16"]["failed"] == ["cuda-qg8", "broken"]
    assert summary["large-fp32-tf32"] == {"best": None}


# --------------------------------------------------------------------------------------------
# The GPU sections' code on CPU tensors (interpreter; device timing replaced by a fake)


@pytest.fixture
def on_cpu(monkeypatch):
    _needs_interpreter()
    monkeypatch.setattr(gpu_suite, "DEVICE", "cpu")
    times = iter(range(1, 10 ** 6))
    monkeypatch.setattr(gpu_suite, "_time", lambda fn, rotations, **kw: (fn(0), float(next(times)))[1])
    monkeypatch.setattr(gpu_suite, "_peak_bytes", lambda fn: (fn(0), 1 << 20)[1])
    monkeypatch.setattr(gpu_suite, "_copies_beyond_l2", lambda shape, dtype: 2)


def test_variant_sweep_writes_a_valid_table_on_the_interpreter(on_cpu, monkeypatch, tmp_path):
    import torch

    from transmatcher_fast.ops import dispatch, tuning

    monkeypatch.setattr(gpu_suite, "SWEEP_CLASSES", {
        "small-fp16": ((3, 2, 9, 7, 20), "float16", False),
        "large-fp32-tf32": ((5, 2, 9, 7, 20), "float32", True)})
    real = gpu_suite.triton_candidates
    monkeypatch.setattr(gpu_suite, "triton_candidates",
                        lambda *a: (lambda c, s: (c[:2], s))(*real(*a)))
    # "cuda" here is the compiled extension's op on CPU tensors (the same schema).
    has_op = hasattr(getattr(torch.ops, "transmatcher_fast_C", None), "max_sim_forward") \
        and "cpu" in dispatch.available_backends("cpu")
    backends = ["triton"] + (["cuda"] if has_op else [])
    sweep = gpu_suite.sweep_variants(backends, _quiet, budget_s=120)
    for cls in ("small-fp16", "large-fp32-tf32"):
        rows = sweep["classes"][cls]["variants"]
        triton_rows = [r for r in rows if r["backend"] == "triton"]
        assert len(triton_rows) == 2 and triton_rows[0]["ok"], triton_rows
        assert set(triton_rows[0]["config"]) >= {"block_s", "block_t", "block_k", "group_q",
                                                 "num_warps", "num_stages"}
        if has_op:
            assert [r["query_group"] for r in rows if r["backend"] == "cuda"] == \
                gpu_suite.cuda_query_groups()
        assert "gemm_ms" in sweep["classes"][cls]
    if has_op:  # the CPU kernel computes float32
        assert all(r["ok"] for r in sweep["classes"]["large-fp32-tf32"]["variants"])
    table = gpu_suite.propose_tuning_table(sweep, "cpu", "test")
    assert set(table["classes"]) == {"small-fp16", "large-fp32-tf32"}
    tuning.validate(table, "test")
    checks = gpu_suite.verify_table(table, _quiet)
    assert all(c["ok"] for c in checks.values()), checks


def test_timing_sections_run_on_the_interpreter(on_cpu):
    backends = ["triton"]
    table = {"format": 1, "device": None, "source": "test", "classes": {}}
    training = gpu_suite.bench_training(backends, _quiet, table, compile_reference=False,
                                        shape=(2, 2, 9, 7, 20))
    assert set(training["methods"]) == {"triton", "tuned_auto", "reference", "gemm"}
    for row in training["methods"].values():
        assert "error" not in row and row["tflops"] > 0 and "fraction_of_gemm" in row
    evaluation = gpu_suite.bench_evaluation(backends, _quiet, table, compile_reference=False,
                                            shape=(2, 4, 9, 7, 20), chunk=2,
                                            dtypes=(("fp32-tf32", "float32"),))
    methods = evaluation["fp32-tf32"]["methods"]
    assert set(methods) == {"triton", "tuned_auto", "reference", "reference_tf32", "gemm"}
    assert all("error" not in row for row in methods.values()), methods


# --------------------------------------------------------------------------------------------
# Defect 1: build in one process, measure in a fresh one


FAKE_PIP = textwrap.dedent('''
    """A stand-in for `pip install -e .`: what an editable install leaves is a .pth file in
    site-packages that installs an import hook, read by interpreters started after it."""
    import os, sys, sysconfig
    mode = os.environ.get("FAKE_PIP_MODE", "ok")
    if mode == "fail" or (mode == "fail-with-ext" and os.environ.get("TRANSMATCHER_FAST_SKIP_EXT") != "1"):
        print("fake pip: the build failed"); sys.exit(1)
    site = sysconfig.get_paths()["purelib"]
    repo = os.getcwd()
    with open(os.path.join(site, "fake_editable_finder.py"), "w") as f:
        f.write(f"""
    import sys
    from importlib.machinery import PathFinder, ModuleSpec
    from importlib.util import spec_from_file_location
    MAPPING = {{'transmatcher_fast': {os.path.join(repo, 'transmatcher_fast')!r},
               'transmatcher_fast.kernels': {os.path.join(repo, 'kernels')!r}}}
    class Finder:
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name in MAPPING:
                return spec_from_file_location(name, MAPPING[name] + '/__init__.py',
                                               submodule_search_locations=[MAPPING[name]])
            return None
    def install():
        sys.meta_path.append(Finder)
    """)
    with open(os.path.join(site, "__editable__.fake.pth"), "w") as f:
        f.write("import fake_editable_finder; fake_editable_finder.install()\\n")
    print("fake pip: installed into", site)
''')


@pytest.fixture
def bare_env(tmp_path):
    """A virtual environment where torch and triton import (the real site-packages on its path,
    without running that folder's .pth files) but transmatcher_fast does not: a bare GPU box
    before the install."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    Path(site, "host_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    fake_pip = tmp_path / "fake_pip.py"
    fake_pip.write_text(FAKE_PIP)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return python, fake_pip, env, Path(site)


def test_suite_measures_in_a_fresh_interpreter_after_the_build(bare_env, tmp_path):
    """Defect 1: before the fix the suite imported transmatcher_fast in the process that ran
    the install: ModuleNotFoundError, no JSON. The premise is checked first (the same-process
    import fails here); then the suite, whose install fails with the extension and succeeds
    without it, measures in a fresh interpreter (a correctness check on the interpreter)."""
    python, fake_pip, env, site = bare_env
    premise = subprocess.run(
        [str(python), "-c", "import subprocess, sys; "
         f"subprocess.run([sys.executable, {str(fake_pip)!r}], check=True, cwd={str(REPO)!r}); "
         "import transmatcher_fast"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=60)
    assert premise.returncode != 0 and "ModuleNotFoundError" in premise.stderr
    (site / "__editable__.fake.pth").unlink()  # bare again

    out = tmp_path / "out"
    proc = subprocess.run(
        [str(python), str(REPO / "benchmarks" / "gpu_suite.py"), "--out", str(out),
         "--build-cmd", f"{python} {fake_pip}", "--deadline", "120", "--cpu-smoke"],
        cwd=REPO, env={**env, "FAKE_PIP_MODE": "fail-with-ext"}, capture_output=True, text=True,
        timeout=180)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # no CUDA outside --dry-run
    saved = json.loads((out / "gpu_suite_no-cuda.json").read_text())
    build = saved["build"]
    assert build["fallback"] and build["ok"] and not build["with_extension"]
    assert [a["skip_ext"] for a in build["attempts"]] == [False, True]
    assert saved["import"]["mode"] == "installed"
    assert saved["pid"] != saved["build_pid"]  # measured in another process
    assert saved["sections"]["cpu_smoke"]["status"] == "ok"
    assert all(c["ok"] for c in saved["cpu_smoke"]["checks"]) and saved["cpu_smoke"]["checks"]
    assert saved["no_cuda"] and saved["child_returncode"] == 1
    log = (out / "gpu_suite_no-cuda.log").read_text()
    assert "fake pip: the build failed" in log and "fresh interpreter" in log


def test_suite_falls_back_to_the_source_tree_when_no_install_works(bare_env, tmp_path):
    python, fake_pip, env, _ = bare_env
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(python), str(REPO / "benchmarks" / "gpu_suite.py"), "--out", str(out),
         "--build-cmd", f"{python} {fake_pip}", "--deadline", "120", "--dry-run"],
        cwd=REPO, env={**env, "FAKE_PIP_MODE": "fail"}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = json.loads((out / "gpu_suite_no-cuda.json").read_text())
    assert not saved["build"]["ok"] and saved["build"]["fallback"]
    assert saved["import"]["mode"] == "source-tree"
    assert "ModuleNotFoundError" in saved["import"]["installed_import_error"]


# --------------------------------------------------------------------------------------------
# gpu_run.sh


def test_gpu_run_sh_parses_and_its_dry_run_writes_json_saying_no_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the dry run's no-CUDA record is for machines without a GPU")
    script = REPO / "benchmarks" / "gpu_run.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env.update(OUT=str(tmp_path), GPU_RUN_DEADLINE="60", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(script), "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = json.loads((tmp_path / "gpu_suite_no-cuda.json").read_text())
    assert saved["no_cuda"] and saved["device"] == "no-cuda" and saved["dry_run"]
    assert saved["build"]["cmd"] == "true"  # the dry run replaces the install
    assert saved["child_returncode"] == 0
    assert "== gpu_suite: no-cuda" in proc.stdout


def test_every_gpu_section_runs_in_order_on_the_interpreter(on_cpu, monkeypatch, tmp_path):
    """A rehearsal of the device run's section sequence (run_sections, the code that only runs
    on the GPU machine) on CPU tensors with tiny shapes: every section runs, in order, the
    launch table is written and checked, pytest runs beside the correctness sections."""
    import functools

    from transmatcher_fast.ops import tuning

    S = gpu_suite
    monkeypatch.setattr(S, "correctness", functools.partial(
        S.correctness, device="cpu", shapes=[(2, 3, 9, 7, 20)], labels=["fp32-ieee"]))
    monkeypatch.setattr(S, "ties", functools.partial(
        S.ties, device="cpu", shapes=[(2, 3, 9, 7, 6)], labels=["fp32-ieee"]))
    monkeypatch.setattr(S, "nan_check", functools.partial(
        S.nan_check, device="cpu", shape=(2, 2, 70, 40, 16), labels=["fp32-ieee"]))
    plan = S.offset_plan(nq=5, ng=4, length=7, d=16, rows=2, dtype="float16")
    plan.update(passes_2_31=True, checked_rows_past_2_31=True)
    monkeypatch.setattr(S, "offset_case", functools.partial(S.offset_case, device="cpu", plan=plan))
    monkeypatch.setattr(S, "ceilings", lambda log: {"gemm_bf16_8192_tflops": 1.0,
                                                     "copy_tb_per_s": 1.0})
    monkeypatch.setattr(S, "SWEEP_CLASSES", {"small-fp16": ((3, 2, 9, 7, 20), "float16", False)})
    real = S.triton_candidates
    monkeypatch.setattr(S, "triton_candidates", lambda *a: (lambda c, s: (c[:2], s))(*real(*a)))
    monkeypatch.setattr(S, "bench_training", functools.partial(S.bench_training, shape=(2, 2, 9, 7, 20)))
    monkeypatch.setattr(S, "bench_evaluation", functools.partial(
        S.bench_evaluation, shape=(2, 4, 9, 7, 20), chunk=2, dtypes=(("fp32-tf32", "float32"),)))
    monkeypatch.setattr(S, "bench_market_eval", lambda out, log, timeout: {"returncode": 0,
                                                                          "timeout": timeout})
    monkeypatch.setattr(S, "bench_transreid_gpu", lambda out, log, timeout: {"returncode": 0,
                                                                            "timeout": timeout})
    tiny_test = tmp_path / "test_tiny.py"
    tiny_test.write_text("def test_ok():\n    assert True\n")
    monkeypatch.setattr(S, "PYTEST_FILES", [str(tiny_test)])
    out = tmp_path / "out"
    out.mkdir()
    suite = S.Suite(out, "rehearsal", time.time() + 1000, echo=False)
    args = S.parse_args(["--out", str(out)])
    S.run_sections(suite, args, ["triton"], "cpu")
    saved = json.loads(suite.json_path.read_text())
    order = ["correctness", "ties", "nan", "offset_2_31", "pytest", "ceilings", "variants",
             "training", "evaluation", "market_eval", "transreid"]
    assert list(saved["sections"]) == order
    assert {n: saved["sections"][n]["status"] for n in order} == dict.fromkeys(order, "ok")
    assert saved["pytest"]["returncode"] == 0 and "1 passed" in saved["pytest"]["summary"][0]
    assert S.correctness_failures(saved) == []
    table = json.loads((out / "gpu_tuning_rehearsal.json").read_text())
    tuning.validate(table, "rehearsal")
    assert table["classes"]["small-fp16"]["backend"] == "triton"
    assert saved["variants"]["table_check"]["small-fp16"]["ok"]
    assert "tuned_auto" in saved["training"]["methods"]
    assert "tuned_auto" in saved["evaluation"]["fp32-tf32"]["methods"]
    summary = S.summary_table(saved)
    assert "training fwd+bwd" in summary and "variants small-fp16" in summary


def test_plot_is_written_when_matplotlib_is_there(tmp_path):
    pytest.importorskip("matplotlib")
    gpu_suite.plot(_fake_results(), tmp_path / "plot.png", _quiet)
    assert (tmp_path / "plot.png").stat().st_size > 1000
