"""GPU suite, plan: every section's estimated seconds from counts the CPU can make (translation
units to compile, Triton kernels to compile, checks, launches to time, ncu cases, FLOPs), printed
first as ``plan: T s of D s``. The sections then skip themselves when less than their estimate is
left; the sweep's budget is what the later sections leave.

``COSTS`` are leads for an H100/H200 box with 16 cores, not measurements: each run records every
section's seconds beside its estimate, and the first GPU run recalibrates them.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import math
import sys
import time

from gpu_suite_common import REPO

COSTS = {
    "start_s": 10,            # the measuring interpreter: torch, CUDA context, the package
    "build_fixed_s": 8,       # setup.py, ninja, link
    "nvcc_unit_s": 40,        # one .cu for sm_90a
    "cxx_unit_s": 25,         # one .cpp against torch's headers
    "build_jobs": 16,         # MAX_JOBS on the GPU box (its cores)
    "compile_workers": 12,    # parallel Triton compile processes
    "triton_kernel_s": 2.0,   # one Triton kernel specialisation for sm_90 in one worker
    "backward_kernels": 3,    # Triton kernels a backward launch compiles
    "check_s": 0.8,           # one correctness check (launch, float64 reference on the CPU)
    "quick_check_s": 0.3,     # a tie or NaN check (forward only)
    "variant_s": 0.8,         # one sweep launch: row check + do_bench(25 ms, 150 ms)
    "class_fixed_s": 3.0,     # a sweep class: inputs, float64 rows, the two baselines
    "method_s": 1.5,          # one timed method: peak memory + do_bench(100 ms, 500 ms)
    "reference_eval_s": 6.0,  # one materialised reference at 256 x 4096 (four calls)
    "torch_compile_s": 35,    # torch.compile(reference): the first call compiles
    "ncu_fixed_s": 20,        # ncu start, the profiled interpreter, --query-metrics
    "ncu_case_s": 1.5,        # one profiled launch (a few replay passes)
    "ncu_timed_case_s": 0.3,  # one case timed with events (do_bench 25 ms + 100 ms)
    "ncu_compile_kernels": 4,  # the best others' gate-off/ablation kernels, compiled there
    "assumed_tflops": 250,    # the op's rate for FLOP-counted sections (Market size)
    "market_fixed_s": 10,     # matcher, 3,368 + 15,913 feature maps, upstream on one chunk
    "transreid_s": 60,        # bench_transreid.py, ViT-B/16 batch 64, fp16
    "pytest_min_s": 30,       # pytest runs last, only with at least this much left
}
MARKET = (3368, 15913, 192, 192, 512, 3)  # queries, gallery, Lq, Lg, D, layers
BACKENDS = ("triton", "cuda")  # what the GPU box is planned for (before the build says)
SWEEP_MIN_S = 30  # the sweep's least budget (each backend's defaults always run)


def source_kernels():
    """kernels/max_sim.py from the source tree, without importing transmatcher_fast (the building
    process must not load the extension it is about to rebuild); None without triton."""
    if importlib.util.find_spec("triton") is None:
        return None
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))
    try:
        return importlib.import_module("kernels.max_sim")
    except Exception:
        return None


def counts(backends=BACKENDS, kernels=None, order_variants=False, build_jobs=None) -> dict:
    """What the estimates are made of, counted on the CPU. ``build_jobs``: parallel compiles of
    the build (default: the GPU box's, COSTS)."""
    from gpu_suite_compile import jobs
    from gpu_suite_correctness import CORRECTNESS_CASES, TIES_SHAPES
    from gpu_suite_ncu import ABLATIONS, ablations_in_source, ncu_cases
    from gpu_suite_variants import SWEEP_CLASSES, cuda_candidates, triton_candidates

    cuda_files = glob.glob(str(REPO / "csrc" / "cuda" / "*.cu"))
    cxx_files = (glob.glob(str(REPO / "csrc" / "*.cpp")) + glob.glob(str(REPO / "csrc" / "cpu" / "*.cpp"))
                 + glob.glob(str(REPO / "csrc" / "cuda" / "*.cpp")))
    n_backends = len(backends)
    found = jobs(backends, kernels, order_variants) if kernels is not None else []
    kernels_to_compile = sum(1 + (COSTS["backward_kernels"] if j.get("backward") else 0) for j in found)
    launches = {}
    for cls, ((nq, ng, lq, lg, d), dtype, _) in SWEEP_CLASSES.items():
        triton = 0
        if kernels is not None and "triton" in backends:
            import torch

            triton = len(triton_candidates(kernels, lq, lg, d, getattr(torch, dtype), order_variants)[0])
        launches[cls] = triton + (len(cuda_candidates(order_variants)) if "cuda" in backends else 0)
    # ncu: per backend the default and one best other, every ablation, and two baselines.
    ncu = len(ncu_cases(None, backends)) + n_backends * len(ABLATIONS)
    return {
        "nvcc_units": len(cuda_files), "cxx_units": len(cxx_files),
        "build_jobs": int(build_jobs or COSTS["build_jobs"]),
        "compile_jobs": len(found), "kernels_to_compile": kernels_to_compile,
        "correctness_checks": n_backends * sum(len(labels) for _, labels in CORRECTNESS_CASES),
        "tie_checks": n_backends * len(TIES_SHAPES) * 2 * 4,
        "nan_checks": n_backends * 4,
        "sweep_launches": launches, "table_checks": len(SWEEP_CLASSES),
        "ncu_cases": ncu,
        "ncu_ablations": {b: a for b, a in ablations_in_source(kernels).items() if b in backends},
        "training_methods": n_backends + 5,  # tuned, reference, compiled, gemm, gemm_no_scores
        "evaluation_methods": 2 * (n_backends + 3) + 1,  # + tuned, gemms; fp32: reference_tf32
        "evaluation_references": 3, "torch_compiles": 2,
        "market_backends": n_backends,
        "market_flops": 2.0 * MARKET[0] * MARKET[1] * MARKET[2] * MARKET[3] * MARKET[4] * MARKET[5],
    }


def estimates(c: dict) -> dict:
    """Seconds per section, with the counts each rests on."""
    k = COSTS
    build = k["build_fixed_s"] + max(
        k["nvcc_unit_s"] if c["nvcc_units"] else k["cxx_unit_s"],
        (c["nvcc_units"] * k["nvcc_unit_s"] + c["cxx_units"] * k["cxx_unit_s"]) / c["build_jobs"])
    workers = min(k["compile_workers"], max(1, c["compile_jobs"]))
    compile_s = (k["start_s"] + math.ceil(c["kernels_to_compile"] / workers) * k["triton_kernel_s"]
                 if c["compile_jobs"] else 0)
    sweep = sum(n * k["variant_s"] + k["class_fixed_s"] for n in c["sweep_launches"].values())
    sweep += c["table_checks"] * k["method_s"]
    market_each = c["market_flops"] / (k["assumed_tflops"] * 1e12) + 2
    rows = [
        ("build", build, f"{c['nvcc_units']} .cu + {c['cxx_units']} .cpp units, {c['build_jobs']} jobs"),
        ("start", k["start_s"], "fresh interpreter: torch, CUDA, the package"),
        ("compile", compile_s, f"{c['kernels_to_compile']} Triton kernels ({c['compile_jobs']} launches) "
                               f"in {workers} workers"),
        ("correctness", 2 + c["correctness_checks"] * k["check_s"], f"{c['correctness_checks']} checks"),
        ("ties", 2 + c["tie_checks"] * k["quick_check_s"], f"{c['tie_checks']} checks"),
        ("nan", 1 + c["nan_checks"] * k["quick_check_s"], f"{c['nan_checks']} checks"),
        ("offset_2_31", 4 + 4 * len(BACKENDS), "3400 x 3400 pairs per backend"),
        ("ceilings", 6, "bf16 and TF32 8192^3 GEMMs, a 4 GiB copy"),
        ("variants", sweep, " + ".join(f"{n} {cls}" for cls, n in c["sweep_launches"].items())
                            + f" launches, {c['table_checks']} table checks"),
        ("ncu", k["ncu_fixed_s"] + c["ncu_cases"] * (k["ncu_case_s"] + k["ncu_timed_case_s"])
         + k["ncu_compile_kernels"] * k["triton_kernel_s"],
         f"{c['ncu_cases']} cases, timed and profiled; ablations available: "
         + ", ".join(f"{b} {'/'.join(a) or 'none'}" for b, a in c.get("ncu_ablations", {}).items())),
        ("training", c["training_methods"] * k["method_s"] + k["torch_compile_s"],
         f"{c['training_methods']} methods, 1 torch.compile"),
        ("evaluation", c["evaluation_methods"] * k["method_s"]
         + c["evaluation_references"] * k["reference_eval_s"] + k["torch_compile_s"],
         f"{c['evaluation_methods']} methods, {c['evaluation_references']} references, 1 torch.compile"),
        ("market_eval", k["market_fixed_s"] + c["market_backends"] * market_each,
         f"{c['market_backends']} backends x {c['market_flops'] / 1e15:.1f} PFLOP at "
         f"{k['assumed_tflops']} TFLOP/s"),
        ("transreid", k["transreid_s"], "ViT-B/16, batch 64, fp16"),
    ]
    return {name: {"estimate_s": round(seconds, 1), "basis": basis} for name, seconds, basis in rows}


def make_plan(deadline_s: float, backends=BACKENDS, order_variants=False, kernels=None,
              build_jobs=None, started_at: float | None = None) -> dict:
    """``started_at``: when the run began (its deadline's start); the seconds spent until the
    plan is made are counted as its first row, measured."""
    kernels = kernels if kernels is not None else source_kernels()
    c = counts(backends, kernels, order_variants, build_jobs)
    sections = estimates(c)
    if started_at is not None:
        sections = {"plan": {"estimate_s": round(time.time() - started_at, 1),
                             "basis": "measured: this process so far (imports, counting)"}, **sections}
    _fit_sweep(sections, c, deadline_s)
    total = round(sum(s["estimate_s"] for s in sections.values()), 1)
    return {"deadline_s": deadline_s, "total_s": total, "fits": total <= deadline_s,
            "backends_planned": list(backends), "kernels_counted": kernels is not None,
            "counts": c, "sections": sections, "costs": dict(COSTS),
            "optional": {"pytest": f"last, with the time left (at least {COSTS['pytest_min_s']} s)"}}


def _fit_sweep(sections: dict, c: dict, deadline_s: float) -> None:
    """The sweep is the elastic section (its launches past the budget are skipped, defaults
    first): where the plan is over the deadline it gets what the others leave, at least
    SWEEP_MIN_S."""
    over = sum(s["estimate_s"] for s in sections.values()) - deadline_s
    sweep = sections["variants"]
    if over <= 0 or sweep["estimate_s"] <= SWEEP_MIN_S:
        return
    budget = max(SWEEP_MIN_S, sweep["estimate_s"] - over)
    fixed = len(c["sweep_launches"]) * COSTS["class_fixed_s"] + c["table_checks"] * COSTS["method_s"]
    launches = sum(c["sweep_launches"].values())
    timed = max(0, min(launches, int((budget - fixed) / COSTS["variant_s"])))
    sweep.update(estimate_s=round(budget, 1),
                 basis=sweep["basis"] + f"; budget to the deadline: about {timed} of {launches} timed")


def format_plan(plan: dict) -> str:
    lines = ["plan (estimated seconds; counts from this checkout):"]
    for name, entry in plan["sections"].items():
        lines.append(f"  {name:12} {entry['estimate_s']:6.0f} s  {entry['basis']}")
    for name, note in plan.get("optional", {}).items():
        lines.append(f"  {name:12} {'-':>6}    {note}")
    if not plan["kernels_counted"]:
        lines.append("  (Triton not importable here: its kernels and candidates are not counted)")
    lines.append(f"plan: {plan['total_s']:.0f} s of {plan['deadline_s']:.0f} s"
                 + ("" if plan["fits"] else "  (over: the last sections will be skipped)"))
    return "\n".join(lines)


def later_s(plan: dict | None, after: str) -> float:
    """Seconds the plan gives the sections after ``after`` (what an elastic section leaves)."""
    if not plan:
        return 0.0
    names = list(plan["sections"])
    if after not in names:
        return 0.0
    return sum(plan["sections"][n]["estimate_s"] for n in names[names.index(after) + 1:])
