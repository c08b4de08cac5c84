"""GPU suite, ncu: where the forward's time goes, from hardware counters.

One ``ncu --clock-control none`` run (the card's clocks are left as they are) profiles one launch
of each case with a few metrics (those this ncu knows for the GPU, ``--query-metrics``):
tensor-pipe utilisation (all MMAs, and the mma.sync and wgmma parts), bytes from L2 to the SMs
(and all L2 bytes), DRAM bytes, issue-slot utilisation, achieved occupancy and the duration. Cases, on
``NCU_SHAPE`` in bf16: each backend's default forward and its best other candidate from the
sweep, each also with ablations inside the same kernel structure, and the two same-shape GEMM
baselines (cuBLAS, which writes the scores, and the tile-sum GEMM that does not):

- ``gate_off``: no score_embed (the kernels' no-gate specialisation): always available;
- ``max_only`` (max without argmax) and ``mma_only`` (the MMA main loop, each score tile
  reduced to one add a score, no epilogue): switches inside each kernel (Triton constexpr,
  CUDA template), reached through these hooks (an ablation whose hook is missing, as in an
  older checkout or build, is recorded as "not available" with the hook it needs):
    Triton: ``kernels.max_sim.ABLATIONS`` (names it supports) and
            ``kernels.max_sim.forward(..., ablation=name)`` (outputs may be left unwritten);
    CUDA:   ``torch.ops.transmatcher_fast_C.max_sim_forward_ablation(query, gallery,
            score_embed, q_best, g_best, q_index, g_index, allow_tf32, query_group, ablation)``
            for query_group launches (mma.sync and wgmma; bf16 with a gate, the case here).
  ``ablations_in_source`` says, before the build, which of them this checkout provides (the
  plan prints it).

Every case is also timed with events in the suite's process first: where ncu cannot read the
counters (seen on gVisor machines), the ablations' times alone say where the time goes.

The target process (this file with ``--target``) warms every case up (compilation), then, between
cudaProfilerStart/Stop (``--profile-from-start off``), launches a marker kernel
(``torch.cuda._sleep``) before each case: the kernels between two markers are that case's, and its
longest one is its forward.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import shutil
import sys
import time
from pathlib import Path

import gpu_suite_common as common

NCU_SHAPE = (128, 256, 192, 192, 512)  # 2.5 TFLOP: milliseconds per launch, fills the chip
ABLATIONS = ("full", "gate_off", "max_only", "mma_only")
METRICS = {
    "duration_ns": "gpu__time_duration.sum",
    # The tensor pipe (every MMA: mma.sync, and wgmma on GH100), then its mma.sync / wgmma parts.
    "tensor_pipe_pct": "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
    "tensor_pipe_mma_pct": "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
    "tensor_pipe_wgmma_pct": "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
    "l2_to_sm_bytes": "l1tex__m_xbar2l1tex_read_bytes.sum",
    "l2_read_sectors_from_sm": "lts__t_sectors_srcunit_tex_op_read.sum",
    "l2_bytes": "lts__t_bytes.sum",  # all L2 traffic (TMA loads included)
    "dram_read_bytes": "dram__bytes_read.sum",
    "dram_write_bytes": "dram__bytes_write.sum",
    "issue_slot_pct": "sm__inst_issued.avg.pct_of_peak_sustained_active",
    "achieved_occupancy_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
}
MARKER = "spin"  # torch.cuda._sleep's kernel is spin_kernel


def ncu_cases(sweep: dict | None, backends, cls="large-bf16") -> list:
    """The cases: per backend the default and the fastest other correct candidate of ``cls``
    in the sweep (the default alone without a sweep), each with every ablation; the baselines."""
    rows = ((sweep or {}).get("classes") or {}).get(cls, {}).get("variants", [])
    cases = []
    for backend in backends:
        mine = [r for r in rows if r.get("backend") == backend]
        default = next((r for r in mine if r.get("default")), None)
        others = sorted((r for r in mine if not r.get("default") and r.get("ok")
                         and isinstance(r.get("ms"), (int, float))), key=lambda r: r["ms"])
        picked = [("default", default)] + ([("best_other", others[0])] if others else [])
        for role, row in picked:
            launch = _launch_of(backend, row)
            for ablation in ABLATIONS:
                cases.append({"name": f"{backend}-{role}-{ablation}", "backend": backend,
                              "role": role, "candidate": row["name"] if row else "default",
                              "launch": launch, "ablation": ablation})
    cases += [{"name": "gemm-cublas", "backend": "gemm", "ablation": "full"},
              {"name": "gemm-no-scores", "backend": "gemm_no_scores", "ablation": "full"}]
    return cases


def ablations_in_source(kernels=None) -> dict:
    """Per backend, the ablations of ABLATIONS this checkout's sources provide (read without
    building or importing the package): Triton from ``kernels`` (kernels/max_sim.py, loaded
    from the source tree; None: not counted), CUDA from the op's schema and its registration."""
    found = {"triton": []}
    if kernels is not None:
        found["triton"] = [a for a in ABLATIONS[1:] if a in getattr(kernels, "ABLATIONS", ())]
    csrc = common.REPO / "csrc"
    sources = [csrc / "max_sim.cpp", csrc / "cuda" / "max_sim_cuda.cpp"]
    hooked = all(p.exists() and "max_sim_forward_ablation" in p.read_text() for p in sources)
    found["cuda"] = list(ABLATIONS[1:]) if hooked else ["gate_off"]
    return found


def _launch_of(backend, row):
    if row is None:
        return None  # the backend's default launch
    return row.get("config") if backend == "triton" else (row.get("cuda") or {"query_group": row.get("query_group", 0)})


def available_metrics(log, ncu="ncu", timeout=60) -> tuple[list, dict]:
    """METRICS whose base name this ncu knows for the GPU (``--query-metrics``)."""
    record = common.run([ncu, "--query-metrics"], timeout, lambda text: None, tail=200000)
    text = record.get("output_tail", "")
    known = {parts[0] for parts in map(str.split, text.splitlines()) if parts and "__" in parts[0]}
    if record.get("returncode") != 0 or not known:
        log("ncu --query-metrics gave no list: asking for every metric")
        return list(METRICS.values()), {"query": {k: v for k, v in record.items() if k != "output_tail"}}
    chosen = [m for m in METRICS.values() if m.split(".")[0] in known]
    missing = [m for m in METRICS.values() if m not in chosen]
    return chosen, {"missing_metrics": missing}


def find_ncu():
    """ncu on PATH, else where CUDA or Nsight Compute installs it."""
    found = shutil.which("ncu")
    if found:
        return found
    for pattern in ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu",
                    "/usr/local/cuda/nsight-compute*/ncu"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    return None


def run_ncu(out: Path, log, cases: list, timeout: float, env=None, shape=None, timed=True) -> dict:
    """The ncu section: every case timed here (events), then one profiled process over every
    case; per case its time and its forward kernel's metrics."""
    if not cases:
        return {"skipped": "no cases"}
    start = time.time()
    shape = list(shape or NCU_SHAPE)
    timings = {}
    if timed:
        record = {}
        timings = common.attempt(record, log, "ncu timings", lambda: time_cases(cases, shape, log)) or {}
    ncu = find_ncu()
    if ncu is None:
        return {"shape": shape, "cases": timings, "profile": "skipped: ncu not found"}
    metrics, info = available_metrics(log, ncu)
    cases_path = out / "ncu_cases.json"
    cases_path.write_text(json.dumps({"shape": shape, "cases": cases}, indent=1))
    raw_path = out / "ncu_raw.csv"
    manifest_path = out / "ncu_manifest.json"
    cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--metrics",
           ",".join(metrics), "--csv", "--page", "raw", "--log-file", str(raw_path),
           sys.executable, str(Path(__file__).resolve()), "--target", str(cases_path),
           "--manifest", str(manifest_path)]
    record = common.run(cmd, max(1.0, timeout - (time.time() - start)), log, env=env, tail=3000)
    result = {"cmd": record["cmd"], "returncode": record["returncode"], "shape": shape,
              "timed_out": record["timed_out"], "metrics": metrics, **info,
              "target_output_tail": record.get("output_tail", "")[-1500:]}
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    raw = raw_path.read_text(errors="replace") if raw_path.exists() else ""
    result["raw_csv_head"] = raw[:4000]
    result["cases"] = assign(parse_csv(raw), manifest.get("order", []), manifest.get("cases", {}))
    for name, timing in timings.items():  # the times beside the counters
        case = result["cases"].setdefault(name, dict(timing))
        case.update({k: timing[k] for k in ("ms", "tflops") if k in timing})
    result["seconds"] = round(time.time() - start, 1)
    for name, case in result["cases"].items():
        log(f"ncu {name:34} " + (case.get("status", "") if "metrics" not in case else " ".join(
            f"{k}={v:.3g}" for k, v in case["metrics"].items() if isinstance(v, float))))
    return result


def parse_csv(text: str) -> list:
    """ncu's ``--csv --page raw`` rows as dicts (one per kernel, metric columns; the units row
    dropped); a long format (one row per metric) is pivoted to the same shape."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if first is None:
        return []
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[first:]))))
    if rows and "Metric Name" in rows[0]:
        kernels = {}
        for row in rows:
            kernel = kernels.setdefault(row["ID"], {"ID": row["ID"], "Kernel Name": kernel_name(row)})
            kernel[row["Metric Name"]] = row.get("Metric Value", "")
        return list(kernels.values())
    return [r for r in rows if r.get("ID", "").strip().isdigit()]


def _number(value):
    try:
        return float(str(value).replace(",", ""))
    except (TypeError, ValueError):
        return None


def kernel_name(kernel: dict) -> str:
    for key in ("Kernel Name", "Function Name", "Demangled Name", "Name"):
        if kernel.get(key):
            return kernel[key]
    return ""


def assign(kernels: list, order: list, statuses: dict) -> dict:
    """Per case (``order``: the profiled cases, in launch order) its kernels between markers and
    the metrics of its longest kernel under METRICS' short names."""
    groups, current = [], None
    for kernel in kernels:
        if MARKER in kernel_name(kernel):
            current = []
            groups.append(current)
        elif current is not None:
            current.append(kernel)
    cases = {name: dict(statuses.get(name, {})) for name in statuses}
    for name, group in zip(order, groups):
        case = cases.setdefault(name, {})
        case["kernels"] = [kernel_name(k)[:120] for k in group]
        if not group:
            case["status"] = "no kernel profiled"
            continue
        main = max(group, key=lambda k: _number(k.get(METRICS["duration_ns"])) or 0.0)
        case["kernel"] = kernel_name(main)[:120]
        case["metrics"] = {short: _number(main.get(full)) for short, full in METRICS.items()
                           if full in main}
    return cases


# --------------------------------------------------------------------------------------------
# The profiled process


def _case_launch(case, data, kernels, cuda_ops):
    """A no-argument function launching the case once, or a string saying why it cannot."""
    import torch

    import transmatcher_fast
    from transmatcher_fast.ops import tuning
    from gpu_suite_timing import gemm_tile_sums

    q, g, e, sig, outs, a, b, sums, scores = data
    ablation = case["ablation"]
    gate = None if ablation == "gate_off" else e
    if case["backend"] == "gemm":
        return lambda: torch.mm(a, b.T, out=scores)
    if case["backend"] == "gemm_no_scores":
        return lambda: gemm_tile_sums(a, b, sums)
    extra = {}
    if ablation in ("max_only", "mma_only"):
        supported = getattr(kernels, "ABLATIONS", ()) if case["backend"] == "triton" else ()
        if case["backend"] == "triton" and ablation not in supported:
            return ("not available: needs kernels.max_sim.ABLATIONS and "
                    "kernels.max_sim.forward(..., ablation=name)")
        extra = {"ablation": ablation}
    if case["backend"] == "triton":
        config = kernels.ForwardConfig(**case["launch"]) if case["launch"] else None
        sig_gate = None if gate is None else sig
        return lambda: kernels.forward(q, g, sig_gate, outs, config=config, precision="tf32", **extra)
    launch = case["launch"] or {"query_group": 0}
    if set(launch) == {"query_group"}:
        if extra:
            op = getattr(cuda_ops, "max_sim_forward_ablation", None)
            if op is None:
                return "not available: needs torch.ops.transmatcher_fast_C.max_sim_forward_ablation"
            return lambda: op(q, g, gate, *outs, False, launch["query_group"], ablation)
        return lambda: cuda_ops.max_sim_forward(q, g, gate, *outs, False, launch["query_group"])
    if extra:
        return "not available: the CUDA ablation hook takes query_group launches only"
    table = {"format": tuning.FORMAT, "device": None, "source": "ncu",
             "classes": {tuning.shape_class(q.shape[0] * g.shape[0], q.dtype, False):
                         {"backend": "cuda", "cuda": launch}}}

    def through_op():
        with tuning.use_table(table), transmatcher_fast.use_backend("cuda"):
            transmatcher_fast.max_sim(q, g, gate)
    return through_op


def prepare(cases: list, shape) -> tuple[list, dict]:
    """The inputs of ``shape`` (bf16; float32 on the interpreter) and each case's launch, warmed
    up (compilation stays out of what is measured): [(name, launch)] and per case its status."""
    import torch

    from transmatcher_fast.kernels import max_sim as kernels
    from gpu_suite_timing import gemm_tile_sums

    nq, ng, lq, lg, d = shape
    dev = common.DEVICE
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32  # the interpreter has no bf16
    q = torch.randn(nq, lq, d, device=dev, dtype=dtype)
    g = torch.randn(ng, lg, d, device=dev, dtype=dtype)
    e = torch.randn(lg, lq, device=dev)
    sig = torch.sigmoid(e).contiguous()
    outs = [torch.empty(nq, ng, lq, device=dev), torch.empty(nq, ng, lg, device=dev),
            torch.empty(nq, ng, lq, device=dev, dtype=torch.int32),
            torch.empty(nq, ng, lg, device=dev, dtype=torch.int32)]
    a, b = q.reshape(nq * lq, d), g.reshape(ng * lg, d)
    data = (q, g, e, sig, outs, a, b, gemm_tile_sums(a, b),
            torch.empty(nq * lq, ng * lg, device=dev, dtype=dtype))
    cuda_ops = getattr(torch.ops, "transmatcher_fast_C", None)
    statuses, ready = {}, []
    for case in cases:
        status = statuses[case["name"]] = {k: case[k] for k in ("backend", "ablation", "role", "candidate")
                                           if k in case}
        try:
            launch = _case_launch(case, data, kernels, cuda_ops)
            if isinstance(launch, str):
                status["status"] = launch
                continue
            launch()
            common.sync()
            ready.append((case["name"], launch))
        except Exception as error:  # recorded per case
            status["status"] = f"error: {error!r}"[:500]
    return ready, statuses


def time_cases(cases: list, shape, log) -> dict:
    """Every case timed with events (do_bench median), in this process: where ncu cannot read
    the counters, the ablations' times still say where the time goes (the difference of two
    cases is the stage one leaves out)."""
    import gpu_suite_timing as timing

    ready, statuses = prepare(cases, shape)
    work = common.flops(*shape)
    for name, launch in ready:
        record = statuses[name]
        common.attempt(record, log, f"ncu timing {name}", lambda: record.update(
            ms=timing.time_ms(lambda _k: launch(), 1, warmup=25, rep=100)))
        if "ms" in record:
            record["tflops"] = work / record["ms"] / 1e9
            log(f"ncu timing {name:34} {record['ms']:8.3f} ms {record['tflops']:6.1f} TFLOP/s")
    common.empty_cache()
    return statuses


def target(cases_path: Path, manifest_path: Path) -> int:
    """The process ncu profiles: every case once between cudaProfilerStart/Stop, a marker
    kernel before each."""
    from gpu_suite_build import import_package

    import_package(print)
    import torch

    plan = json.loads(cases_path.read_text())
    ready, statuses = prepare(plan["cases"], plan["shape"])
    cuda = common.DEVICE == "cuda"
    if cuda:
        torch.cuda.profiler.start()
    for name, launch in ready:
        if cuda:
            torch.cuda._sleep(1000)  # the marker before each case's kernels
        launch()
        common.sync()
    if cuda:
        torch.cuda.profiler.stop()
    manifest_path.write_text(json.dumps({"order": [n for n, _ in ready], "cases": statuses}, indent=1))
    print(f"ncu target: {len(ready)} of {len(plan['cases'])} cases launched")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the process ncu profiles (gpu_suite's ncu section)")
    parser.add_argument("--target", required=True)
    parser.add_argument("--manifest", required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(target(Path(args.target), Path(args.manifest)))
