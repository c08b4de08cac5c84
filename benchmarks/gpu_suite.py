"""Everything that needs a GPU, in one call, inside a deadline: plan, build, correctness, timings.

    bash benchmarks/gpu_run.sh                               # what a GPU machine runs ($OUT)
    bash benchmarks/gpu_run.sh --dry-run                     # the plan and the plumbing, no GPU
    python benchmarks/gpu_suite.py --out DIR --deadline 480  # DIR default: benchmarks/results/

First the plan: every section's estimate from counts made on the CPU (gpu_suite_plan.py) and
``plan: T s of D s``. Then the build, in place (gpu_suite_build.py: ``setup.py build_ext
--inplace``, the source tree on ``PYTHONPATH``; without the extension if it fails), and the
measurements in a fresh interpreter (``--child``), which loads what was just built. Sections, in
order; each is skipped (and recorded as skipped) when less time is left than its estimate, and
the JSON and log are saved after every one (a watchdog saves and exits shortly after the deadline):

 1. compile (gpu_suite_compile.py): every Triton kernel the later sections launch, compiled by
    parallel workers into Triton's cache;
 2. correctness, ties, nan, offset_2_31 (gpu_suite_correctness.py);
 3. ceilings: bf16 and TF32 8192^3 cuBLAS GEMMs, a device copy (gpu_suite_timing.py);
 4. variants: every forward candidate per shape class, checked and timed beside its same-shape
    baselines; the proposed launch table ``gpu_tuning_<device>.json`` (gpu_suite_variants.py);
 5. ncu: hardware counters of the defaults, the best other candidates and their ablations
    (gpu_suite_ncu.py);
 6. training (64 x 64 pairs, fp16 autocast, forward + backward) and evaluation (256 x 4096 pairs,
    bf16 and fp32/TF32) against the reference, torch.compile(reference) and the baselines;
 7. market_eval: Market-1501 size for every backend's best launches; transreid
    (gpu_suite_market.py);
 8. pytest: tests/test_triton_kernels.py on CUDA, last, only with time left.

Writes ``gpu_suite_<device>.json``, ``.log``, ``.png`` (with matplotlib), ``gpu_tuning_<device>.json``
and ncu's files to --out, and prints a summary table last. The exit code is 1 when a correctness
check failed (or no CUDA device was found, outside --dry-run).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the gpu_suite_* modules

import gpu_suite_build as build_mod  # noqa: E402
import gpu_suite_common as common  # noqa: E402
import gpu_suite_plan as plan_mod  # noqa: E402
from gpu_suite_common import REPO, WATCHDOG_GRACE_S, Suite  # noqa: E402
from gpu_suite_report import plot, summary_table  # noqa: E402

PYTEST_FILES = ["tests/test_triton_kernels.py"]
OPTIONAL_MODULES = ("matplotlib", "pytest", "tqdm", "yaml", "PIL", "setuptools", "ninja")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--deadline", type=float, default=common.DEFAULT_DEADLINE_S,
                        help="seconds from start for the whole run (default %(default)s)")
    parser.add_argument("--deadline-at", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--skip-build", action="store_true",
                        help="measure in this process with the package as it imports now")
    parser.add_argument("--build-cmd", default=None,
                        help="the build command (shell words; default: python setup.py build_ext --inplace)")
    parser.add_argument("--build-timeout", type=float, default=240.0,
                        help="seconds for the build with the extension (then one without)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip")
    parser.add_argument("--only", default="", help="comma-separated sections to run (and no other)")
    parser.add_argument("--skip-pytest", action="store_true")
    parser.add_argument("--quick", action="store_true", help="skip evaluation, market_eval, transreid")
    parser.add_argument("--order-variants", action="store_true",
                        help="also sweep the order-only variants (Triton group_q, CUDA query_group)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the plan, no build, no GPU section; exit 0 where there is no CUDA device")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="without CUDA: run a tiny correctness check on the Triton interpreter")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tag", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def environment_lines() -> list:
    """What the machine offers, said once after the plan."""
    have = {name: importlib.util.find_spec(name) is not None for name in OPTIONAL_MODULES}
    lines = [f"python {platform.python_version()} {sys.executable}",
             "modules: " + " ".join(f"{k}={'yes' if v else 'NO'}" for k, v in have.items())]
    for tool in ("nvcc", "ncu", "nvidia-smi"):
        lines.append(f"{tool}: {shutil.which(tool) or 'not found'}")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    deadline_at = args.deadline_at or start + args.deadline
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.child or args.skip_build:
        return measure(args, out, deadline_at)
    # The building process: plans and builds, never imports the package (it would load the
    # extension that the build rewrites).
    tag = args.tag or common.device_tag(common.gpu_name_from_nvidia_smi())
    suite = Suite(out, tag, deadline_at)
    suite.log_path.write_text("")
    # A dry run plans for the GPU box (its cores build); a real run for this machine's MAX_JOBS.
    jobs = None if args.dry_run else os.environ.get("MAX_JOBS") or os.cpu_count()
    plan = plan_mod.make_plan(args.deadline, order_variants=args.order_variants, build_jobs=jobs,
                              started_at=start)
    suite.log(plan_mod.format_plan(plan))
    for line in environment_lines():
        suite.log(line)
    suite.estimates = {name: entry["estimate_s"] for name, entry in plan["sections"].items()}
    suite.results.update(date=datetime.datetime.now().isoformat(timespec="seconds"),
                         deadline_s=args.deadline, argv=sys.argv[1:] if argv is None else argv,
                         python=sys.executable, dry_run=args.dry_run, build_pid=os.getpid(),
                         plan=plan)
    build_cmd = shlex.split(args.build_cmd) if args.build_cmd else None

    def build():
        record = build_mod.build_extension(
            suite.log, cmd=build_cmd,
            timeout=min(args.build_timeout, max(30.0, suite.remaining() - 180)),
            fallback_timeout=60.0)
        if args.build_cmd:
            record["note"] = "build command replaced (--build-cmd)" + (": dry run" if args.dry_run else "")
        return record
    suite.section("build", build, estimate_s=0)  # always runs: everything after needs it
    suite.results["sections"]["build"]["estimate_s"] = suite.estimates["build"]  # for the record
    # The default build's processes import from the source tree (an own build command may install).
    made_link = build_cmd is None and not args.dry_run and build_mod.link_kernels(suite.log)
    child = [sys.executable, str(Path(__file__).resolve()), "--child", "--out", str(out),
             "--deadline-at", repr(deadline_at), "--tag", tag, "--deadline", str(args.deadline)]
    for flag in ("skip_pytest", "quick", "dry_run", "cpu_smoke", "order_variants"):
        if getattr(args, flag):
            child.append("--" + flag.replace("_", "-"))
    for option in ("skip", "only"):
        if getattr(args, option):
            child += ["--" + option, getattr(args, option)]
    suite.log(f"measuring in a fresh interpreter (PYTHONPATH={REPO}): {' '.join(child)}")
    try:
        rc = subprocess.run(child, cwd=REPO, env=build_mod.child_env(),
                            timeout=max(10.0, suite.remaining() + WATCHDOG_GRACE_S + 30)).returncode
    except subprocess.TimeoutExpired:
        rc = 124
    finally:
        build_mod.unlink_kernels(made_link)
    if suite.json_path.exists():
        with contextlib.suppress(ValueError):
            suite.results = json.loads(suite.json_path.read_text())
    suite.results["child_returncode"] = rc
    if rc not in (0, 1):
        suite.log(f"the measuring process ended with rc {rc}")
    suite.save()
    return rc


def measure(args, out: Path, deadline_at: float) -> int:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the package registers backends
    device_name = torch.cuda.get_device_name() if cuda else "no-cuda"
    tag = args.tag or common.device_tag(device_name)
    json_path = out / f"gpu_suite_{tag}.json"
    results = json.loads(json_path.read_text()) if args.child and json_path.exists() else {}
    plan = results.get("plan") or {}
    suite = Suite(out, tag, deadline_at, results,
                  estimates={n: e["estimate_s"] for n, e in (plan.get("sections") or {}).items()})
    if not args.child:
        suite.log_path.write_text("")
        results.update(date=datetime.datetime.now().isoformat(timespec="seconds"),
                       deadline_s=args.deadline, argv=sys.argv[1:])
    results.update(device=device_name, cuda_available=cuda, pid=os.getpid())
    try:
        results["import"] = build_mod.import_package(suite.log)
    except Exception:
        results["import"] = {"error": traceback.format_exc()}
        suite.log(results["import"]["error"])
        suite.save()
        print(summary_table(results), flush=True)
        return 1
    from transmatcher_fast import benchmarking
    from transmatcher_fast.ops import dispatch

    results["environment"] = (benchmarking.environment(torch.device("cuda")) if cuda
                              else {"python": platform.python_version(), "torch": torch.__version__})
    results["optional_packages"] = {name: importlib.util.find_spec(name) is not None
                                    for name in OPTIONAL_MODULES}
    results["nvidia_smi"] = common.nvidia_smi()
    if not cuda:
        suite.log("no CUDA device: no GPU section runs")
        results["no_cuda"] = True
        if args.cpu_smoke:
            from gpu_suite_correctness import correctness

            suite.section("cpu_smoke", lambda: correctness(
                [b for b in ("triton",) if b in dispatch.available_backends("cpu")], suite.log,
                device="cpu", shapes=[(2, 3, 9, 7, 20)], labels=["fp32-ieee"]), estimate_s=0)
        suite.save()
        print(summary_table(results), flush=True)
        return 0 if args.dry_run else 1
    backends = [b for b in ("triton", "cuda") if b in dispatch.available_backends("cuda")]
    results["backends"] = backends
    suite.log(f"device {device_name}; backends {backends}; torch {torch.__version__}; "
              f"import {results['import'].get('mode')}, extension loaded "
              f"{results['import'].get('extension_loaded')}")
    suite.save()
    suite.start_watchdog(summary=lambda: print(summary_table(suite.results), flush=True))
    run_sections(suite, args, backends, device_name)
    from gpu_suite_correctness import correctness_failures

    results["correctness_failures"] = correctness_failures(results)
    with contextlib.suppress(Exception):
        plot(results, out / f"gpu_suite_{tag}.png", suite.log)
    suite.save()
    print(summary_table(results), flush=True)
    return 1 if results["correctness_failures"] else 0


def run_sections(suite: Suite, args, backends, device_name) -> None:
    """The GPU sections in order (each skipped when not selected or out of time)."""
    import gpu_suite_compile as compile_mod
    import gpu_suite_correctness as corr
    import gpu_suite_market as market
    import gpu_suite_ncu as ncu
    import gpu_suite_timing as timing
    import gpu_suite_variants as variants_mod

    only = {s for s in args.only.split(",") if s}
    skip = {s for s in args.skip.split(",") if s}
    if args.skip_pytest:
        skip.add("pytest")
    if args.quick:
        skip |= {"evaluation", "market_eval", "transreid"}
    log, results, plan = suite.log, suite.results, suite.results.get("plan")
    state = {"table": None}

    def run(name, fn):
        why = "dry run" if args.dry_run else ("not selected" if (only and name not in only) or name in skip
                                              else None)
        return suite.section(name, fn, skip_reason=why)

    def variants():
        estimate = suite.estimates.get("variants", 60)
        budget = max(plan_mod.SWEEP_MIN_S,
                     min(2 * estimate, suite.remaining() - plan_mod.later_s(plan, "variants")))
        sweep = variants_mod.sweep_variants(backends, log, budget, order_variants=args.order_variants,
                                            progress=lambda partial: suite.partial("variants", partial))
        sweep["summary"] = variants_mod.sweep_summary(sweep)
        record = {}

        def table():
            state["table"] = variants_mod.propose_tuning_table(
                sweep, device_name, f"benchmarks/gpu_suite.py variants, {datetime.date.today()}")
            sweep["proposed_table"] = state["table"]
            sweep["proposed_table_path"] = str(variants_mod.write_tuning_table(
                state["table"], suite.out, suite.tag))
            suite.save()
            sweep["table_check"] = variants_mod.verify_table(state["table"], log)
        common.attempt(record, log, "launch table", table)
        if "error" in record:
            sweep["table_error"] = record["error"]
        return sweep

    def ncu_section():
        cases = ncu.ncu_cases(results.get("variants"), backends)
        timeout = suite.remaining() - plan_mod.later_s(plan, "ncu")
        return ncu.run_ncu(suite.out, log, cases, max(suite.estimates.get("ncu", 60), timeout),
                           env=build_mod.child_env())

    def market_eval():
        tables = market.backend_tables(state["table"], results.get("variants"), backends)
        classes = (results.get("variants") or {}).get("classes") or {}
        best = variants_mod.best_by_backend(classes.get("large-bf16") or {})
        later = plan_mod.later_s(plan, "market_eval")
        return market.market_eval(backends, tables, log, lambda: suite.remaining() - later,
                                  ceilings=results.get("ceilings"),
                                  rates={b: row.get("tflops") for b, row in best.items()})

    run("compile", lambda: compile_mod.warm_up(
        suite.out, log, backends, max(suite.estimates.get("compile", 30),
                                      suite.remaining() - plan_mod.later_s(plan, "compile")),
        plan_mod.COSTS["compile_workers"], args.order_variants))
    run("correctness", lambda: corr.correctness(backends, log))
    run("ties", lambda: corr.ties(backends, log))
    run("nan", lambda: corr.nan_check(backends, log))
    run("offset_2_31", lambda: corr.offset_case(backends, log, remaining=suite.remaining))
    run("ceilings", lambda: timing.ceilings(log))
    run("variants", variants)
    run("ncu", ncu_section)
    run("training", lambda: timing.bench_training(
        backends, log, state["table"], compile_reference=suite.remaining() > 150,
        remaining=suite.remaining))
    run("evaluation", lambda: timing.bench_evaluation(
        backends, log, state["table"], compile_reference=suite.remaining() > 110,
        remaining=suite.remaining, progress=lambda reports: suite.partial("evaluation", reports)))
    run("market_eval", market_eval)
    run("transreid", lambda: market.bench_transreid_gpu(
        suite.out, log, min(150.0, suite.remaining() - 10), env=build_mod.child_env()))
    run_pytest(suite, log, run)


def run_pytest(suite, log, run) -> None:
    """tests on CUDA, last, with the time left (never before the measurements)."""
    left = suite.remaining() - 5
    if left < plan_mod.COSTS["pytest_min_s"]:
        suite.section("pytest", None, skip_reason=f"{left:.0f} s left: pytest runs only with time left")
        return
    if importlib.util.find_spec("pytest") is None:
        suite.section("pytest", None, skip_reason="pytest is not installed")
        return

    def pytest():
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *PYTEST_FILES]
        record = common.run(cmd, suite.remaining() - 5, log, env=build_mod.child_env(), tail=3000)
        lines = record.get("output_tail", "").strip().splitlines()
        record["summary"] = lines[-1:] if lines else []
        return record
    run("pytest", pytest)


if __name__ == "__main__":
    sys.exit(main())
