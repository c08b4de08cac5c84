"""benchmarks/gpu_suite.py (and its gpu_suite_* modules) and benchmarks/gpu_run.sh without a GPU:
the plan, the sections that can run on the Triton interpreter, the deadline and the saving after
every section, the summary table, the launch-table writer, the candidate lists (order-only
variants dropped), ncu's parsing and ablation hooks, and the build-then-measure path (the
extension built in place, the measurements in a fresh interpreter from the source tree)."""

import functools
import json
import os
import re
import subprocess
import sys
import sysconfig
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_suite  # noqa: E402  (benchmarks/ is on sys.path, above)
import gpu_suite_build as build  # noqa: E402
import gpu_suite_common as common  # noqa: E402
import gpu_suite_compile as compile_mod  # noqa: E402
import gpu_suite_correctness as corr  # noqa: E402
import gpu_suite_market as market  # noqa: E402
import gpu_suite_ncu as ncu  # noqa: E402
import gpu_suite_plan as plan_mod  # noqa: E402
import gpu_suite_report as report  # noqa: E402
import gpu_suite_timing as timing  # noqa: E402
import gpu_suite_variants as variants  # noqa: E402


def _needs_interpreter():
    import torch

    from transmatcher_fast.ops import dispatch

    if "triton" not in dispatch.available_backends("cpu") or torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter on CPU")


def _quiet(text):
    pass


def test_modules_stay_small():
    for path in (REPO / "benchmarks").glob("gpu_suite*.py"):
        assert len(path.read_text().splitlines()) <= 620, path.name


# --------------------------------------------------------------------------------------------
# The plan


def test_plan_fits_the_default_deadline_with_every_section():
    plan = plan_mod.make_plan(common.DEFAULT_DEADLINE_S)
    expected = ["build", "start", "compile", "correctness", "ties", "nan", "offset_2_31",
                "ceilings", "variants", "ncu", "training", "evaluation", "market_eval", "transreid"]
    assert list(plan["sections"]) == expected
    assert all(s["estimate_s"] > 0 for n, s in plan["sections"].items() if n != "compile"
               or plan["kernels_counted"])
    assert plan["total_s"] == pytest.approx(sum(s["estimate_s"] for s in plan["sections"].values()),
                                            abs=0.5)
    assert plan["fits"] and plan["total_s"] <= plan["deadline_s"] == 480
    text = plan_mod.format_plan(plan)
    assert re.search(r"^plan: \d+ s of 480 s$", text.splitlines()[-1])
    assert plan_mod.later_s(plan, "transreid") == 0
    assert plan_mod.later_s(plan, "market_eval") == plan["sections"]["transreid"]["estimate_s"]


def test_plan_counts_what_the_sections_will_run():
    import torch

    kernels = plan_mod.source_kernels()
    if kernels is None:
        pytest.skip("needs triton")
    c = plan_mod.counts(kernels=kernels)
    shape, dtype, _ = variants.SWEEP_CLASSES["large-bf16"]
    triton = variants.triton_candidates(kernels, *shape[2:], getattr(torch, dtype))[0]
    assert c["sweep_launches"]["large-bf16"] == len(triton) + len(variants.cuda_candidates())
    assert c["compile_jobs"] == len(compile_mod.jobs(("triton", "cuda"), kernels))
    assert c["kernels_to_compile"] >= c["compile_jobs"]
    assert c["correctness_checks"] == 2 * sum(len(l) for _, l in corr.CORRECTNESS_CASES)
    assert c["nvcc_units"] == len(list((REPO / "csrc" / "cuda").glob("*.cu")))
    # More builders, a shorter build; more candidates, a longer sweep.
    fewer = plan_mod.estimates(dict(c, build_jobs=2))
    assert fewer["build"]["estimate_s"] > plan_mod.estimates(c)["build"]["estimate_s"]
    more = dict(c, sweep_launches={k: v + 10 for k, v in c["sweep_launches"].items()})
    assert plan_mod.estimates(more)["variants"]["estimate_s"] > plan_mod.estimates(c)["variants"]["estimate_s"]


def test_many_candidates_shrink_the_sweeps_budget_not_the_plans_fit(monkeypatch):
    """Candidates the kernels' owners add make the sweep longer; past the deadline the plan gives
    it what the other sections leave (its launches beyond are skipped at run time)."""
    real = plan_mod.counts
    monkeypatch.setattr(plan_mod, "counts", lambda *a, **k: dict(
        real(*a, **k), sweep_launches={"small-fp16": 60, "large-bf16": 60, "large-fp32-tf32": 60}))
    plan = plan_mod.make_plan(480)
    assert plan["fits"] and plan["total_s"] <= 480
    assert "budget to the deadline" in plan["sections"]["variants"]["basis"]
    tight = plan_mod.make_plan(100)  # the fixed sections alone are over: the sweep keeps its floor
    assert not tight["fits"] and tight["sections"]["variants"]["estimate_s"] == plan_mod.SWEEP_MIN_S
    assert "(over:" in plan_mod.format_plan(tight)


def test_offset_plan_passes_2_31_and_needs_about_36_gb():
    plan = corr.offset_plan(free_bytes=139 << 30)
    assert plan["elements_per_output"] == 3400 * 3400 * 192 > 2 ** 31
    assert plan["passes_2_31"] and plan["checked_rows_past_2_31"]
    assert (3400 - plan["rows"]) * 3400 * 192 >= 2 ** 31  # every checked row lies past it
    assert 35e9 < plan["output_bytes"] < 36e9
    assert plan["fits"]
    assert not corr.offset_plan(free_bytes=24 << 30)["fits"]  # a 24 GB card skips it
    assert not corr.offset_plan(nq=100, ng=100)["passes_2_31"]
    estimate = plan_mod.estimates(plan_mod.counts())["offset_2_31"]["estimate_s"]
    assert plan["estimate_s_per_backend"] * 2 < estimate


# --------------------------------------------------------------------------------------------
# Candidates: the kernels' lists, order-only variants dropped


@dataclass(frozen=True)
class FakeConfig:
    block_s: int = 64
    group_q: int = 8
    num_warps: int = 4
    variant: str = "tiled"

    @property
    def name(self):
        return f"{self.variant}-{self.block_s}-g{self.group_q}-w{self.num_warps}"


class FakeKernels:
    ForwardConfig = FakeConfig

    @staticmethod
    def forward_config(lq, lg, d, dtype):
        return FakeConfig()

    @staticmethod
    def forward_candidates(lq, lg, d, dtype):
        base = FakeConfig()
        return [base, replace(base, group_q=1), replace(base, group_q=16),
                replace(base, num_warps=8), replace(base, variant="strip", group_q=16)]


def test_order_only_variants_are_dropped_unless_asked_for():
    configs, source = variants.triton_candidates(FakeKernels, 192, 192, 512, None)
    assert source == "kernels.forward_candidates"
    assert [c.name for c in configs] == ["tiled-64-g8-w4", "tiled-64-g8-w8", "strip-64-g8-w4"]
    every, _ = variants.triton_candidates(FakeKernels, 192, 192, 512, None, order_variants=True)
    assert len(every) == 5
    # The mma.sync kernel in its default order and the wgmma kernel (query_group -1).
    assert variants.cuda_candidates() == [{"query_group": 0}, {"query_group": -1}]
    assert variants.cuda_query_groups(order_variants=True)[0] == 0
    assert len(variants.cuda_query_groups(order_variants=True)) > 1


def test_cuda_candidates_come_from_the_tuning_module_when_it_lists_them(monkeypatch):
    from transmatcher_fast.ops import tuning

    # A negative query_group selects another kernel (-1: wgmma): kept; orders > 0 dropped.
    monkeypatch.setattr(tuning, "CUDA_QUERY_GROUP_CANDIDATES", (1, 4, -1, 16))
    assert variants.cuda_candidates() == [{"query_group": 0}, {"query_group": -1}]
    assert variants.cuda_query_groups() == [0, -1]
    assert [variants.cuda_name(e) for e in variants.cuda_candidates()] == ["cuda-qg0", "cuda-qg-1"]
    assert len(variants.cuda_candidates(order_variants=True)) == 5

    monkeypatch.setattr(tuning, "CUDA_FORWARD_CANDIDATES", (
        {"query_group": 0}, {"query_group": 4}, {"query_group": 0, "variant": "wgmma"}), raising=False)
    assert variants.cuda_candidates() == [{"query_group": 0}, {"query_group": 0, "variant": "wgmma"}]
    assert [variants.cuda_name(e) for e in variants.cuda_candidates()] == [
        "cuda-qg0", "cuda-query_group0-variantwgmma"]


# --------------------------------------------------------------------------------------------
# Correctness sections on the interpreter


def test_gpu_suite_correctness_checks_run_on_the_triton_interpreter():
    """The suite's correctness section, on CPU tensors through the interpreter (bf16 is broken
    there): its checks pass for the Triton kernels and record every error measure."""
    _needs_interpreter()
    result = corr.correctness(["triton"], _quiet, device="cpu", shapes=[(2, 3, 9, 7, 20)],
                              labels=["fp32-ieee", "fp16"])
    assert len(result["checks"]) == 2
    for check in result["checks"]:
        assert check["ok"], check
        assert set(check["errors"]) == {"q_best", "g_best", "grad_query", "grad_gallery",
                                        "grad_score_embed"}


def test_a_failing_call_is_recorded_and_the_section_goes_on():
    record, lines = {}, []
    assert common.attempt(record, lines.append, "x", lambda: 1 / 0) is None
    assert record["ok"] is False and "ZeroDivisionError" in record["error"]
    assert lines and lines[0].startswith("x: ERROR")
    assert common.attempt({}, lines.append, "y", lambda: 7) == 7


def test_ties_give_the_lowest_index_and_backends_agree():
    """Integer inputs: many equal maxima; values exact, argmax the reference's lowest index, and
    the two backends given (here Triton and the C++ CPU kernel) agree."""
    _needs_interpreter()
    from transmatcher_fast.ops import dispatch

    backends = ["triton"] + (["cpu"] if "cpu" in dispatch.available_backends("cpu") else [])
    result = corr.ties(backends, _quiet, device="cpu", shapes=[(2, 3, 9, 7, 6)],
                       labels=["fp32-ieee", "fp16"])
    assert len(result["checks"]) == 2 * 2 * len(backends)  # 2 gates x 2 precisions x backends
    for check in result["checks"]:
        assert check["ok"], check
        assert check["tied_fraction"] > 0.1  # the inputs really tie
    if len(backends) == 2:
        assert result["triton_vs_cuda"] and all(a["ok"] for a in result["triton_vs_cuda"])


def test_nan_at_length_192_reaches_its_outputs_with_the_references_index():
    _needs_interpreter()
    result = corr.nan_check(["triton"], _quiet, device="cpu", shape=(2, 2, 192, 192, 16),
                            labels=["fp32-ieee"])
    (check,) = result["checks"]
    assert check["ok"], check
    assert check["q"]["reached"] > 0 and check["g"]["reached"] > 0


def test_failed_checks_are_collected_for_the_exit_code():
    results = {"correctness": {"checks": [{"ok": True}, {"ok": False, "backend": "cuda"}]},
               "ties": {"error": "Traceback ..."},
               "offset_2_31": {"checks": [], "triton_vs_cuda_same_argmax": False},
               "pytest": {"returncode": 1, "summary": ["1 failed"]}}
    sections = [f["section"] for f in corr.correctness_failures(results)]
    assert sections == ["correctness", "ties", "offset_2_31", "pytest"]
    assert corr.correctness_failures({"correctness": {"checks": [{"ok": True}]}}) == []


def test_offset_case_code_path_on_a_tiny_shape():
    """The section's code (poisoned outputs, last rows against float64, backend agreement) on a
    shape far below 2**31 with the plan's flags forced (and fp16: bf16 is broken in the
    interpreter): only the arithmetic above is about 2**31."""
    _needs_interpreter()
    from transmatcher_fast.ops import dispatch

    plan = corr.offset_plan(nq=5, ng=4, length=7, d=16, rows=2, dtype="float16")
    plan.update(passes_2_31=True, checked_rows_past_2_31=True)
    backends = ["triton"] + (["cpu"] if "cpu" in dispatch.available_backends("cpu") else [])
    result = corr.offset_case(backends, _quiet, device="cpu", plan=plan)
    assert [c["backend"] for c in result["checks"]] == backends
    for check in result["checks"]:
        assert check["ok"], check
    if len(backends) == 2:
        assert result["triton_vs_cuda_same_argmax"]
    with pytest.raises(ValueError):
        corr.offset_case(backends, _quiet, device="cpu",
                         plan=corr.offset_plan(nq=5, ng=4, length=7, d=16, rows=2))


# --------------------------------------------------------------------------------------------
# Deadline, saving after every section, the watchdog


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_sections_skip_past_the_deadline_and_save_after_each(tmp_path):
    clock = FakeClock()
    suite = common.Suite(tmp_path, "fake", deadline_at=clock.now + 100, clock=clock, echo=False,
                         estimates={"planned": 30})
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
    assert suite.section("planned", lambda: pytest.fail("must not run")) is None  # the plan's 30 s
    suite.section("short", lambda: {"ok": True}, estimate_s=5)
    suite.section("unselected", None, skip_reason="not selected")

    assert seen[0]["sections"]["first"]["status"] == "ok" and seen[0]["first"] == {"value": 1}
    assert seen[0]["sections"]["second"]["status"] == "running"
    saved = json.loads(suite.json_path.read_text())
    sections = saved["sections"]
    assert [sections[n]["status"] for n in ("first", "second", "too_long", "planned", "short",
                                            "unselected")] \
        == ["ok", "error", "skipped", "skipped", "ok", "skipped"]
    assert "boom" in saved["second"]["error"]
    assert "deadline" in sections["too_long"]["reason"] and sections["too_long"]["estimate_s"] == 25
    assert sections["planned"]["estimate_s"] == 30
    assert sections["first"]["seconds"] == 30.0 and sections["second"]["seconds"] == 50.0
    assert saved["seconds_left_before_deadline"] == 20.0
    assert "[too_long] skipped" in suite.log_path.read_text()


def test_watchdog_saves_the_section_in_flight_and_exits(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO / 'benchmarks')!r})
        import gpu_suite_common
        from pathlib import Path
        suite = gpu_suite_common.Suite(Path({str(tmp_path)!r}), "dog", time.time() + 0.3, echo=False)
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
# Baselines, summary table, launch table


def test_rates_are_compared_with_the_baselines_and_training_counts_the_gather_backward():
    rows = timing.report_rows(3e12, {"triton": 10.0, "reference": 40.0, "gemm": 5.0,
                                     "gemm_no_scores": 4.0}, {"triton": 2, "reference": 8},
                              baselines={"gemm": 2e12, "gemm_no_scores": 2e12})
    assert rows["triton"]["tflops"] == pytest.approx(300.0)
    assert rows["gemm"]["tflops"] == pytest.approx(400.0)  # its own FLOPs
    assert rows["triton"]["fraction_of_gemm"] == pytest.approx(0.75)
    assert rows["triton"]["fraction_of_gemm_no_scores"] == pytest.approx(0.6)
    assert rows["triton"]["speedup_vs_reference"] == pytest.approx(4.0)
    assert "fraction_of_gemm" not in rows["gemm"]
    shape = (64, 64, 192, 192, 512)
    assert common.backward_flops(*shape) == 4 * 64 * 64 * (192 + 192) * 512
    assert common.backward_flops(*shape) < 0.03 * common.flops(*shape)  # not 2x the forward


def _fake_results():
    rows = timing.report_rows(3e12, {"triton": 10.0, "cuda": 12.0, "reference": 40.0, "gemm": 5.0},
                              {"triton": 2 << 20, "cuda": 3 << 20, "reference": 400 << 20},
                              {"compiled_reference": "Traceback: no compiler"})
    return {"device": "Fake GPU", "deadline_s": 480, "seconds_left_before_deadline": 12.5,
            "plan": {"total_s": 470.0, "deadline_s": 480},
            "sections": {"build": {"status": "ok", "seconds": 80.0, "estimate_s": 48},
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
            "ncu": {"cases": {"triton-default-full": {"metrics": {"tensor_pipe_wgmma_pct": 41.5},
                                                      "ms": 2.5},
                              "triton-default-max_only": {"status": "not available: needs x"}}},
            "market_eval": {"backends": {"triton": {"seconds": 30.0, "tflops": 200.0,
                                                    "speedup_vs_upstream": 90.0},
                                         "cuda": {"skipped": "deadline"}}},
            "correctness_failures": [{"section": "correctness"}]}


def test_summary_table_lists_sections_and_every_method():
    table = report.summary_table(_fake_results())
    print(table)
    lines = table.splitlines()
    assert "Fake GPU" in lines[0] and lines[1] == "plan: 470 s of 480 s"
    assert any(l.startswith("build") and "NOT built" in l and "fallback" in l for l in lines)
    assert any(l.startswith("correctness") and "1/2 checks ok" in l for l in lines)
    assert any(l.startswith("market_eval") and "skipped" in l for l in lines)
    triton = next(l for l in lines if l.strip().startswith("triton "))
    # 10 ms, 300 TFLOP/s, 50% of the GEMM, no no-scores baseline, 4x the reference, 2 MB
    assert triton.split()[1:7] == ["10.000", "300.0", "50.0%", "-", "4.00", "2"]
    assert any("compiled_reference" in l and "ERROR" in l for l in lines)
    assert any("large-bf16" in l and "cuda-qg8" in l for l in lines)
    assert any("small-fp16" in l and "no correct launch" in l for l in lines)
    assert any("triton-default-full" in l and "2.500 ms" in l and "41.5" in l for l in lines)
    assert any("max_only" in l and "not available" in l for l in lines)
    assert any(l.startswith("market triton") and "200 TFLOP/s" in l for l in lines)
    assert lines[-1] == "correctness failures: 1"


TILED = {"block_s": 64, "block_t": 64, "block_k": 64, "group_q": 8, "num_warps": 4,
         "num_stages": 3, "variant": "tiled"}
STRIP = dict(TILED, variant="strip", num_stages=2)
SWEEP = {"classes": {
    "small-fp16": {"variants": [
        {"backend": "triton", "name": "tiled", "config": TILED, "ok": True, "ms": 1.0, "default": True},
        {"backend": "triton", "name": "strip", "config": STRIP, "ok": True, "ms": 0.8},
        {"backend": "cuda", "name": "cuda-qg0", "query_group": 0, "cuda": {"query_group": 0},
         "ok": True, "ms": 0.9, "default": True},
        {"backend": "cuda", "name": "cuda-wgmma", "cuda": {"query_group": 0, "variant": "wgmma"},
         "ok": False, "ms": 0.1},
        {"backend": "triton", "name": "broken", "config": TILED, "ok": False,
         "error": "OutOfResources"},
        {"backend": "triton", "name": "late", "config": TILED, "skipped": "sweep budget"}]},
    "large-bf16": {"variants": [
        {"backend": "triton", "name": "tiled", "config": TILED, "ok": True, "ms": 5.0, "default": True},
        {"backend": "cuda", "name": "cuda-qg0", "query_group": 0, "ok": True, "ms": 4.5, "default": True},
        {"backend": "cuda", "name": "cuda-wgmma", "cuda": {"query_group": 0, "variant": "wgmma"},
         "ok": True, "ms": 4.0}]},
    "large-fp32-tf32": {"variants": [
        {"backend": "triton", "name": "tiled", "config": TILED, "ok": False, "ms": 1.0}]},
}}


def test_tuning_table_picks_the_fastest_correct_launch_and_validates(tmp_path):
    from transmatcher_fast.ops import tuning

    table = variants.propose_tuning_table(SWEEP, "Fake GPU", "test")
    assert table["format"] == tuning.FORMAT and table["device"] == "Fake GPU"
    assert table["classes"]["small-fp16"] == {"backend": "triton", "triton": STRIP,
                                              "cuda": {"query_group": 0}}
    assert table["classes"]["large-bf16"] == {"backend": "cuda", "triton": TILED,
                                              "cuda": {"query_group": 0, "variant": "wgmma"}}
    assert "large-fp32-tf32" not in table["classes"]  # nothing correct was measured
    path = variants.write_tuning_table(table, tmp_path, "fake-gpu")
    assert path.name == "gpu_tuning_fake-gpu.json"
    assert tuning.load(str(path)) == table  # the file dispatch would read validates
    summary = variants.sweep_summary(SWEEP)
    assert summary["small-fp16"]["best"] == "strip" and summary["small-fp16"]["skipped"] == 1
    assert summary["small-fp16"]["gain_over_default"] == pytest.approx(1.25)
    assert summary["small-fp16"]["failed"] == ["cuda-wgmma", "broken"]
    assert summary["large-fp32-tf32"] == {"best": None}
    # Market size: one table per backend, naming it with its own best launches.
    tables = market.backend_tables(table, SWEEP, ["triton", "cuda"])
    assert tables["cuda"]["classes"]["large-bf16"] == {
        "backend": "cuda", "cuda": {"query_group": 0, "variant": "wgmma"}}
    assert tables["triton"]["classes"]["small-fp16"] == {"backend": "triton", "triton": STRIP}
    assert tables["triton"]["classes"]["large-fp32-tf32"] == {"backend": "triton"}
    for t in tables.values():
        tuning.validate(t, "test")


# --------------------------------------------------------------------------------------------
# ncu: cases, output parsing, ablation hooks


def test_ncu_cases_are_the_defaults_and_best_others_with_every_ablation():
    cases = ncu.ncu_cases(SWEEP, ["triton", "cuda"])
    names = [c["name"] for c in cases]
    assert names[:4] == [f"triton-default-{a}" for a in ncu.ABLATIONS]
    assert "triton-best_other-full" not in names  # no correct other Triton launch in large-bf16
    wgmma = [c for c in cases if c["name"] == "cuda-best_other-mma_only"]
    assert wgmma and wgmma[0]["launch"] == {"query_group": 0, "variant": "wgmma"}
    assert names[-2:] == ["gemm-cublas", "gemm-no-scores"]
    assert len(ncu.ncu_cases(None, ["triton"])) == len(ncu.ABLATIONS) + 2


RAW_CSV = '''==PROF== Connected to process 1
"ID","Process ID","Process Name","Host Name","Kernel Name","gpu__time_duration.sum","sm__warps_active.avg.pct_of_peak_sustained_active"
"","","","","","nsecond","%"
"0","1","python","h","void at::native::spin_kernel(long)","1,000","1.0"
"1","1","python","h","_max_sim_forward_kernel","2,500,000","45.5"
"2","1","python","h","void spin_kernel(long)","900","1.0"
"3","1","python","h","sigmoid_kernel","5,000","60.0"
"4","1","python","h","max_sim_forward_cuda","3,000,000","30.25"
"5","1","python","h","spin_kernel","900","1.0"
'''


def test_ncu_csv_is_split_at_the_markers_and_the_longest_kernel_is_the_forward():
    kernels = ncu.parse_csv(RAW_CSV)
    assert [k["ID"] for k in kernels] == ["0", "1", "2", "3", "4", "5"]
    cases = ncu.assign(kernels, ["a", "b", "c"], {"a": {"backend": "triton"}, "d": {"status": "x"}})
    assert cases["a"]["kernel"] == "_max_sim_forward_kernel" and cases["a"]["backend"] == "triton"
    assert cases["a"]["metrics"] == {"duration_ns": 2.5e6, "achieved_occupancy_pct": 45.5}
    assert cases["b"]["kernel"] == "max_sim_forward_cuda" and len(cases["b"]["kernels"]) == 2
    assert cases["c"]["status"] == "no kernel profiled" and cases["d"] == {"status": "x"}
    long_format = ('"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"\n'
                   '"0","k","gpu__time_duration.sum","ns","7"\n"0","k","dram__bytes_read.sum","byte","9"\n')
    assert ncu.parse_csv(long_format) == [{"ID": "0", "Kernel Name": "k",
                                           "gpu__time_duration.sum": "7", "dram__bytes_read.sum": "9"}]


def test_missing_ablation_hooks_are_reported_as_not_available():
    import torch

    class NoHooks:
        ForwardConfig = FakeConfig

        @staticmethod
        def forward(*args, **kwargs):
            return kwargs

    t = torch.zeros(1)
    data = (t, t, t, t, [t] * 4, t, t, t, t)
    full = ncu._case_launch({"backend": "triton", "launch": None, "ablation": "full"}, data, NoHooks, None)
    assert callable(full) and full() == {"config": None, "precision": "tf32"}
    gate_off = ncu._case_launch({"backend": "triton", "launch": None, "ablation": "gate_off"},
                                data, NoHooks, None)
    assert callable(gate_off)
    missing = ncu._case_launch({"backend": "triton", "launch": None, "ablation": "max_only"},
                               data, NoHooks, None)
    assert missing.startswith("not available") and "ABLATIONS" in missing
    NoHooks.ABLATIONS = ("max_only",)
    assert ncu._case_launch({"backend": "triton", "launch": None, "ablation": "max_only"},
                            data, NoHooks, None)() == {"config": None, "precision": "tf32",
                                                       "ablation": "max_only"}
    cuda = ncu._case_launch({"backend": "cuda", "launch": {"query_group": 0}, "ablation": "mma_only"},
                            data, NoHooks, object())
    assert cuda.startswith("not available") and "max_sim_forward_ablation" in cuda


def test_the_plan_lists_the_ncu_ablations_this_checkout_provides():
    """Both backends' kernels carry the gate-off / max-only / MMA-only switches (issue 24): the
    plan, made before the build, says so in the ncu row."""
    kernels = plan_mod.source_kernels()
    if kernels is None:
        pytest.skip("needs triton")
    found = ncu.ablations_in_source(kernels)
    assert found == {"triton": list(ncu.ABLATIONS[1:]), "cuda": list(ncu.ABLATIONS[1:])}
    basis = plan_mod.make_plan(common.DEFAULT_DEADLINE_S, kernels=kernels)["sections"]["ncu"]["basis"]
    assert "triton gate_off/max_only/mma_only" in basis and "cuda gate_off/max_only/mma_only" in basis
    assert ncu.ablations_in_source(None)["triton"] == []


def test_without_ncu_the_cases_are_still_timed(on_cpu, tmp_path, monkeypatch):
    monkeypatch.setattr(ncu, "find_ncu", lambda: None)
    cases = ncu.ncu_cases(None, ["triton"])
    result = ncu.run_ncu(tmp_path, _quiet, cases, 60, shape=(2, 3, 9, 7, 32))
    assert result["profile"] == "skipped: ncu not found"
    assert result["cases"]["triton-default-full"]["ms"] > 0
    assert result["cases"]["triton-default-gate_off"]["tflops"] > 0
    assert result["cases"]["triton-default-mma_only"]["ms"] > 0  # the kernels' switch (issue 24)
    assert result["cases"]["triton-default-max_only"]["ms"] > 0
    assert ncu.run_ncu(tmp_path, _quiet, [], 10) == {"skipped": "no cases"}


def test_compile_jobs_share_the_sections_specialisations():
    assert [compile_mod.same_kind(n) for n in (1, 3, 15, 16, 64, 3400, 4096)] == [1, 3, 15, 16, 16, 17, 16]
    kernels = plan_mod.source_kernels()
    if kernels is None:
        pytest.skip("needs triton")
    found = compile_mod.jobs(("triton",), kernels)
    assert len(found) == len({json.dumps(j, sort_keys=True) for j in found})  # distinct
    assert {j["kind"] for j in found} == {"op", "config", "tile_sums"}
    assert all(max(j["shape"][:2]) <= 17 for j in found if "shape" in j)
    assert compile_mod.jobs(("cuda",), kernels) == []


# --------------------------------------------------------------------------------------------
# The GPU sections' code on CPU tensors (interpreter; device timing replaced by a fake)


@pytest.fixture
def on_cpu(monkeypatch):
    _needs_interpreter()
    monkeypatch.setattr(common, "DEVICE", "cpu")
    times = iter(range(1, 10 ** 6))
    monkeypatch.setattr(timing, "time_ms", lambda fn, rotations, **kw: (fn(0), float(next(times)))[1])
    monkeypatch.setattr(timing, "peak_bytes", lambda fn: (fn(0), 1 << 20)[1])
    monkeypatch.setattr(timing, "copies_beyond_l2", lambda shape, dtype: 2)


def _two_candidates(monkeypatch):
    real = variants.triton_candidates
    monkeypatch.setattr(variants, "triton_candidates",
                        lambda *a, **k: (lambda c, s: (c[:2], s))(*real(*a, **k)))


def test_variant_sweep_writes_a_valid_table_on_the_interpreter(on_cpu, monkeypatch):
    import torch

    from transmatcher_fast.ops import dispatch, tuning

    monkeypatch.setattr(variants, "SWEEP_CLASSES", {
        "small-fp16": ((3, 2, 9, 7, 20), "float16", False),
        "large-fp32-tf32": ((5, 2, 9, 7, 20), "float32", True)})
    _two_candidates(monkeypatch)
    # "cuda" here is the compiled extension's op on CPU tensors (the same schema).
    has_op = hasattr(getattr(torch.ops, "transmatcher_fast_C", None), "max_sim_forward") \
        and "cpu" in dispatch.available_backends("cpu")
    backends = ["triton"] + (["cuda"] if has_op else [])
    sweep = variants.sweep_variants(backends, _quiet, budget_s=120)
    for cls in ("small-fp16", "large-fp32-tf32"):
        entry = sweep["classes"][cls]
        rows = entry["variants"]
        triton_rows = [r for r in rows if r["backend"] == "triton"]
        assert len(triton_rows) == 2 and triton_rows[0]["ok"] and triton_rows[0]["default"], triton_rows
        assert set(triton_rows[0]["config"]) >= {"block_s", "block_t", "block_k", "group_q",
                                                 "num_warps", "num_stages"}
        if has_op:
            assert [r["query_group"] for r in rows if r["backend"] == "cuda"] == [0, -1]  # mma.sync default order, wgmma
        assert "gemm_ms" in entry and "gemm_no_scores_ms" in entry, entry
    if has_op:  # the CPU kernel computes float32
        assert all(r["ok"] for r in sweep["classes"]["large-fp32-tf32"]["variants"])
    table = variants.propose_tuning_table(sweep, "cpu", "test")
    assert set(table["classes"]) == {"small-fp16", "large-fp32-tf32"}
    tuning.validate(table, "test")
    checks = variants.verify_table(table, _quiet)
    assert all(c["ok"] for c in checks.values()), checks


def test_timing_sections_run_on_the_interpreter(on_cpu):
    backends = ["triton"]
    table = {"format": 1, "device": None, "source": "test", "classes": {}}
    training = timing.bench_training(backends, _quiet, table, compile_reference=False,
                                     shape=(2, 2, 9, 7, 20))
    assert set(training["methods"]) == {"triton", "tuned_auto", "reference", "gemm", "gemm_no_scores"}
    assert training["flops"] == common.flops(2, 2, 9, 7, 20) + common.backward_flops(2, 2, 9, 7, 20)
    for name, row in training["methods"].items():
        assert "error" not in row and row["tflops"] > 0
        assert name.startswith("gemm") or "fraction_of_gemm_no_scores" in row
    evaluation = timing.bench_evaluation(backends, _quiet, table, compile_reference=False,
                                         shape=(2, 4, 9, 7, 20), chunk=2,
                                         dtypes=(("fp32-tf32", "float32"),))
    report_ = evaluation["fp32-tf32"]
    assert set(report_["methods"]) == {"triton", "tuned_auto", "reference", "reference_tf32", "gemm",
                                       "gemm_no_scores"}
    assert all("error" not in row for row in report_["methods"].values()), report_["methods"]
    assert report_["baseline_dtype"] == "float32 (TF32)"


def test_the_tile_sum_gemm_sums_each_tile_of_the_product():
    _needs_interpreter()
    import torch

    a, b = torch.randn(150, 40, dtype=torch.float64), torch.randn(70, 40, dtype=torch.float64)
    sums = timing.gemm_tile_sums(a.float(), b.float(), block=(64, 64, 32), num_warps=4, tf32=False)
    full = a @ b.T
    # One band of row blocks (3 <= GROUP_M) sweeps the columns: column-major program order.
    expected = torch.stack([full[i:i + 64, j:j + 64].sum() for j in range(0, 70, 64)
                            for i in range(0, 150, 64)])
    scale = (a.abs() @ b.abs().T).sum() / len(expected)  # the size of a tile's terms
    assert ((sums.double() - expected).abs().max() / scale).item() < 1e-5


# --------------------------------------------------------------------------------------------
# Build in place, measure in a fresh interpreter from the source tree


FAKE_BUILD = textwrap.dedent('''
    """A stand-in for `python setup.py build_ext --inplace` that fails while the extension is
    asked for (the CUDA compile broke) and succeeds without it."""
    import os, sys
    if os.environ.get("FAKE_BUILD_MODE") == "fail" or os.environ.get("TRANSMATCHER_FAST_SKIP_EXT") != "1":
        print("fake build: the build failed"); sys.exit(1)
    print("fake build: nothing to build")
''')


@pytest.fixture
def bare_env(tmp_path):
    """A virtual environment where torch and triton import (the real site-packages on its path,
    without running that folder's .pth files: no editable install) but transmatcher_fast does
    not, except from the source tree: a bare GPU box."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    # Every site-packages folder this interpreter sees (a venv's and, where it includes them, the
    # system's): torch and triton import there too.
    folders = [p for p in sys.path if p.endswith("site-packages")] or [sysconfig.get_paths()["purelib"]]
    Path(site, "host_packages.pth").write_text("\n".join(folders) + "\n")
    fake_build = tmp_path / "fake_build.py"
    fake_build.write_text(FAKE_BUILD)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return python, fake_build, env


def test_suite_measures_from_the_source_tree_in_a_fresh_interpreter(bare_env, tmp_path):
    """The build fails with the extension and goes on without it; the measuring process (another
    one) imports the package from the source tree through PYTHONPATH (nothing was installed)
    and runs a correctness check on the interpreter; the plan came first."""
    python, fake_build, env = bare_env
    premise = subprocess.run([str(python), "-c", "import transmatcher_fast"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
    assert premise.returncode != 0 and "ModuleNotFoundError" in premise.stderr
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(python), str(REPO / "benchmarks" / "gpu_suite.py"), "--out", str(out),
         "--build-cmd", f"{python} {fake_build}", "--deadline", "120", "--cpu-smoke"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # no CUDA outside --dry-run
    assert proc.stdout.startswith("plan (estimated seconds")
    saved = json.loads((out / "gpu_suite_no-cuda.json").read_text())
    b = saved["build"]
    assert b["fallback"] and b["ok"] and not b["with_extension"] and not b["in_place"]
    assert [a["skip_ext"] for a in b["attempts"]] == [False, True]
    assert saved["import"]["mode"] == "in-place"
    assert saved["pid"] != saved["build_pid"]  # measured in another process
    assert saved["sections"]["cpu_smoke"]["status"] == "ok"
    assert all(c["ok"] for c in saved["cpu_smoke"]["checks"]) and saved["cpu_smoke"]["checks"]
    assert saved["no_cuda"] and saved["child_returncode"] == 1
    log = (out / "gpu_suite_no-cuda.log").read_text()
    assert "fake build: the build failed" in log and "fresh interpreter" in log
    assert not (REPO / "transmatcher_fast" / "kernels").is_symlink()  # an own build: no link


def test_the_default_build_is_in_place_and_links_the_kernels(tmp_path, monkeypatch):
    assert build.default_build_cmd()[1:] == ["setup.py", "build_ext", "--inplace"]
    assert build.extension_path().name.startswith("_C") and build.extension_path().parent.name == \
        "transmatcher_fast"
    env = build.child_env({"PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/elsewhere"]
    link = tmp_path / "transmatcher_fast" / "kernels"
    link.parent.mkdir()
    (tmp_path / "kernels").mkdir()
    monkeypatch.setattr(build, "KERNELS_LINK", link)
    assert build.link_kernels(_quiet) and link.is_symlink() and link.resolve() == (tmp_path / "kernels")
    assert not build.link_kernels(_quiet)  # there already
    build.unlink_kernels(True)
    assert not link.exists()


def test_gpu_run_sh_dry_run_prints_the_plan_first_within_the_deadline(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the dry run's no-CUDA record is for machines without a GPU")
    script = REPO / "benchmarks" / "gpu_run.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GPU_RUN_DEADLINE")}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(script), "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("plan (estimated seconds")
    plan_line = next(l for l in lines if l.startswith("plan: "))
    total, deadline = map(int, re.fullmatch(r"plan: (\d+) s of (\d+) s", plan_line).groups())
    assert deadline == 480 and total <= deadline
    for name in ("build", "compile", "correctness", "variants", "ncu", "training", "evaluation",
                 "market_eval", "transreid", "pytest"):
        assert any(l.split()[:1] == [name] for l in lines[:lines.index(plan_line)]), name
    saved = json.loads((tmp_path / "gpu_suite_no-cuda.json").read_text())
    assert saved["no_cuda"] and saved["device"] == "no-cuda" and saved["dry_run"]
    assert saved["build"]["cmd"] == "true"  # the dry run replaces the build
    assert abs(saved["plan"]["total_s"] - total) <= 0.5 and saved["plan"]["fits"]
    assert saved["child_returncode"] == 0
    assert "== gpu_suite: no-cuda" in proc.stdout


def test_every_gpu_section_runs_in_order_on_the_interpreter(on_cpu, monkeypatch, tmp_path):
    """A rehearsal of the device run's section sequence (run_sections, the code that only runs
    on the GPU machine) on CPU tensors with tiny shapes: every section runs, in order, the
    launch table is written and checked, pytest runs last."""
    from transmatcher_fast.ops import tuning

    monkeypatch.setattr(corr, "correctness", functools.partial(
        corr.correctness, device="cpu", shapes=[(2, 3, 9, 7, 20)], labels=["fp32-ieee"]))
    monkeypatch.setattr(corr, "ties", functools.partial(
        corr.ties, device="cpu", shapes=[(2, 3, 9, 7, 6)], labels=["fp32-ieee"]))
    monkeypatch.setattr(corr, "nan_check", functools.partial(
        corr.nan_check, device="cpu", shape=(2, 2, 70, 40, 16), labels=["fp32-ieee"]))
    plan = corr.offset_plan(nq=5, ng=4, length=7, d=16, rows=2, dtype="float16")
    plan.update(passes_2_31=True, checked_rows_past_2_31=True)
    monkeypatch.setattr(corr, "offset_case", functools.partial(corr.offset_case, device="cpu", plan=plan))
    monkeypatch.setattr(compile_mod, "warm_up", lambda *a, **k: {"jobs": 0})
    monkeypatch.setattr(timing, "ceilings", lambda log: {"gemm_bf16_8192_tflops": 1.0,
                                                         "copy_tb_per_s": 1.0})
    monkeypatch.setattr(variants, "SWEEP_CLASSES", {"small-fp16": ((3, 2, 9, 7, 20), "float16", False)})
    _two_candidates(monkeypatch)
    seen = {}
    monkeypatch.setattr(ncu, "run_ncu", lambda out, log, cases, timeout, env=None:
                        seen.setdefault("ncu", {"cases": {c["name"]: {} for c in cases}}))
    monkeypatch.setattr(timing, "bench_training", functools.partial(timing.bench_training,
                                                                    shape=(2, 2, 9, 7, 20)))
    monkeypatch.setattr(timing, "bench_evaluation", functools.partial(
        timing.bench_evaluation, shape=(2, 4, 9, 7, 20), chunk=2, dtypes=(("fp32-tf32", "float32"),)))
    monkeypatch.setattr(market, "market_eval", lambda backends, tables, log, remaining, ceilings,
                        rates: seen.setdefault("market", {"tables": tables, "rates": rates}))
    monkeypatch.setattr(market, "bench_transreid_gpu", lambda out, log, timeout, env=None:
                        {"returncode": 0, "timeout": timeout})
    tiny_test = tmp_path / "test_tiny.py"
    tiny_test.write_text("def test_ok():\n    assert True\n")
    monkeypatch.setattr(gpu_suite, "PYTEST_FILES", [str(tiny_test)])
    out = tmp_path / "out"
    out.mkdir()
    suite = common.Suite(out, "rehearsal", time.time() + 1000, echo=False)
    suite.results["plan"] = plan_mod.make_plan(1000)
    args = gpu_suite.parse_args(["--out", str(out)])
    gpu_suite.run_sections(suite, args, ["triton"], "cpu")
    saved = json.loads(suite.json_path.read_text())
    order = ["compile", "correctness", "ties", "nan", "offset_2_31", "ceilings", "variants", "ncu",
             "training", "evaluation", "market_eval", "transreid", "pytest"]
    assert list(saved["sections"]) == order
    assert {n: saved["sections"][n]["status"] for n in order} == dict.fromkeys(order, "ok")
    assert saved["pytest"]["returncode"] == 0 and "1 passed" in saved["pytest"]["summary"][0]
    assert corr.correctness_failures(saved) == []
    table = json.loads((out / "gpu_tuning_rehearsal.json").read_text())
    tuning.validate(table, "rehearsal")
    assert table["classes"]["small-fp16"]["backend"] == "triton"
    assert saved["variants"]["table_check"]["small-fp16"]["ok"]
    assert "triton-default-full" in seen["ncu"]["cases"]
    assert seen["market"]["tables"]["triton"]["classes"]["small-fp16"]["backend"] == "triton"
    assert seen["market"]["rates"] == {}  # no large-bf16 class in this sweep: the plan's rate
    assert "tuned_auto" in saved["training"]["methods"]
    assert "tuned_auto" in saved["evaluation"]["fp32-tf32"]["methods"]
    summary = report.summary_table(saved)
    assert "training fwd+bwd" in summary and "variants small-fp16" in summary


def test_plot_is_written_when_matplotlib_is_there(tmp_path):
    pytest.importorskip("matplotlib")
    report.plot(_fake_results(), tmp_path / "plot.png", _quiet)
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_market_section_times_each_backend_and_compares_their_distances(on_cpu, monkeypatch):
    """The Market-size section's code on a tiny matcher (interpreter; 'cpu' stands in for the
    second backend through the same launch tables): each backend timed, distances compared
    with each other and with upstream's materialised computation on one chunk."""
    from transmatcher_fast.ops import dispatch

    for name, value in (("HEIGHT", 3), ("WIDTH", 3), ("D_MODEL", 16), ("FEEDFORWARD", 32), ("LAYERS", 2)):
        monkeypatch.setattr(market, name, value)
    backends = ["triton"] + (["cpu"] if "cpu" in dispatch.available_backends("cpu") else [])
    tables = {b: {"format": 1, "device": None, "source": "test", "classes": {}} for b in backends}
    result = market.market_eval(backends, tables, _quiet, lambda: 1e6, sizes=(3, 5),
                                reference_chunk=(2, 3), amp=None, warm_counts=(1, 2),
                                ceilings={"gemm_bf16_8192_tflops": 1.0})
    for backend in backends:
        entry = result["backends"][backend]
        assert entry.get("ok"), entry
        assert entry["seconds"] > 0 and "fraction_of_gemm_8192" in entry and "speedup_vs_upstream" in entry
    if len(backends) == 2:
        assert result["max_abs_distance_difference_between_backends"] < 1e-4
    assert result["upstream_chunk"]["max_abs_distance_difference_vs_ours"] < 1e-4
    skipped = market.market_eval(["triton"], tables, _quiet, lambda: 0.0, sizes=(3, 5),
                                 reference_chunk=(2, 3), amp=None, warm_counts=(1,))
    assert "deadline" in skipped["backends"]["triton"]["skipped"]


def test_ncu_target_launches_every_available_case(on_cpu, monkeypatch, tmp_path):
    """The profiled process's code on CPU tensors (interpreter, float32 for bf16): every case
    with a hook is warmed up and launched (since issue 24 every Triton ablation has one)."""
    sweep = {"classes": {"large-bf16": {"variants": [dict(v, config=TILED) for v in
                                                     SWEEP["classes"]["large-bf16"]["variants"]
                                                     if v["backend"] == "triton"]}}}
    cases = ncu.ncu_cases(sweep, ["triton"])
    (tmp_path / "cases.json").write_text(json.dumps({"shape": [2, 3, 9, 7, 32], "cases": cases}))
    assert ncu.target(tmp_path / "cases.json", tmp_path / "manifest.json") == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["order"] == ["triton-default-full", "triton-default-gate_off",
                                 "triton-default-max_only", "triton-default-mma_only",
                                 "gemm-cublas", "gemm-no-scores"]
    assert not any("status" in case for case in manifest["cases"].values())


AOT_TILE_SUMS = textwrap.dedent("""
    import json, re, subprocess, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import gpu_suite_timing
    kernel = gpu_suite_timing._tile_sums_kernel()
    constexprs = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 64,
                  "INPUT_PRECISION": "tf32"}
    signature = {n: "constexpr" if n in constexprs else "*bf16" if n in ("a_ptr", "b_ptr")
                 else "*fp32" if n == "out_ptr" else "i32" for n in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if n not in constexprs}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                        attrs=attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 8, "num_stages": 3})
    cubin = Path(sys.argv[2])
    cubin.write_bytes(compiled.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    usage = subprocess.run([str(tool), "--dump-resource-usage", str(cubin)],
                           capture_output=True, text=True).stdout
    print(json.dumps({"wgmma": "wgmma.mma_async" in compiled.asm["ptx"], "usage": usage}))
""")


def test_the_no_scores_baseline_compiles_to_wgmma_on_hopper_without_spills(tmp_path):
    """The same-shape baseline is a fair one on the GPU: Hopper tensor cores (wgmma), no local
    memory; compiled ahead of time for sm_90 (no GPU needed; not in the interpreter)."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("no cuobjdump in the triton wheel")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", AOT_TILE_SUMS, str(REPO / "benchmarks"),
                           str(tmp_path / "k.cubin")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["wgmma"]
    found = re.search(r"STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)", result["usage"])
    assert found and found.groups() == ("0", "0"), result["usage"]


def test_compile_workers_run_their_share_of_the_jobs(on_cpu, tmp_path):
    """The compile section's processes on the interpreter: every job runs in one of the workers
    (each in a fresh process), a failing one is reported, the section goes on."""
    from dataclasses import asdict

    from transmatcher_fast.kernels import max_sim as kernels

    found = [{"kind": "op", "shape": [2, 3, 9, 7, 16], "label": "fp32-ieee", "gate": True,
              "backward": True},
             {"kind": "config", "shape": [2, 3, 9, 7, 16], "label": "fp16", "gate": False,
              "config": asdict(kernels.ForwardConfig())},
             {"kind": "tile_sums", "label": "fp32-tf32", "d": 16},
             {"kind": "op", "shape": [2, 2, 9, 7, 16], "label": "fp64", "gate": True, "backward": False}]
    result = compile_mod.warm_up(tmp_path, _quiet, ["triton"], 240, 2, found=found)
    assert result["workers"] == 2 and result["done"] == 4, result
    assert [f["job"]["label"] for f in result["failed"]] == ["fp64"]
    assert compile_mod.warm_up(tmp_path, _quiet, ["cuda"], 10, 2) == {"jobs": 0, "note": "no Triton backend"}


FAKE_NCU = textwrap.dedent('''
    """A stand-in for Nsight Compute: --query-metrics lists base names (not the wgmma pipe); a
    profile runs the target and writes a raw CSV with a marker before each launched case."""
    import json, subprocess, sys
    args = sys.argv[1:]
    if "--query-metrics" in args:
        print("Device GH100")
        for name in ("gpu__time_duration", "sm__pipe_tensor_op_hmma_cycles_active", "dram__bytes_read",
                     "sm__warps_active", "sm__inst_issued"):
            print(f"{name}    a description")
        sys.exit(0)
    log = args[args.index("--log-file") + 1]
    metrics = args[args.index("--metrics") + 1].split(",")
    target = next(i for i, a in enumerate(args) if a.endswith("gpu_suite_ncu.py")) - 1
    rc = subprocess.run(args[target:]).returncode
    manifest = json.loads(open(args[args.index("--manifest") + 1]).read())
    lines = ['"ID","Kernel Name",' + ",".join(f'"{m}"' for m in metrics), '"","",' + ",".join('""' for m in metrics)]
    row = 0
    for case in manifest["order"]:
        for name in ("spin_kernel", "kernel_of_" + case):
            lines.append(f'"{row}","{name}",' + ",".join(f'"{row + 1}"' for m in metrics))
            row += 1
    open(log, "w").write("==PROF== Disconnected\\n" + "\\n".join(lines) + "\\n")
    sys.exit(rc)
''')


def test_ncu_section_end_to_end_with_a_stand_in_ncu(on_cpu, monkeypatch, tmp_path):
    """run_ncu's whole path (metric query, the profiled target process, the CSV split into cases)
    with a fake ncu on PATH and the target on CPU tensors."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "ncu"
    fake.write_text(f"#!{sys.executable}\n" + FAKE_NCU)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("GPU_SUITE_DEVICE", "cpu")
    cases = ncu.ncu_cases(None, ["triton"])
    result = ncu.run_ncu(tmp_path, _quiet, cases, 240, shape=(2, 3, 9, 7, 32))
    assert result["returncode"] == 0, result
    assert "--clock-control none" in result["cmd"]
    assert ncu.METRICS["tensor_pipe_wgmma_pct"] in result["missing_metrics"]
    assert ncu.METRICS["tensor_pipe_wgmma_pct"] not in result["metrics"]
    full = result["cases"]["triton-default-full"]
    assert full["kernel"] == "kernel_of_triton-default-full" and full["metrics"]["duration_ns"] > 0
    assert full["ms"] > 0  # timed with events beside the counters
    assert "tensor_pipe_wgmma_pct" not in full["metrics"]
    max_only = result["cases"]["triton-default-max_only"]  # the kernels' switch (issue 24)
    assert max_only["kernel"] == "kernel_of_triton-default-max_only" and max_only["ms"] > 0
    assert result["cases"]["gemm-no-scores"]["kernel"] == "kernel_of_gemm-no-scores"
