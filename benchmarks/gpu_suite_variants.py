"""GPU suite, variants: every forward launch candidate, checked on float64 rows and timed per
shape class, and the launch table (ops/tuning.py's format) the measurements support.

Candidates come from the kernels' own lists, so what their owners add is swept: Triton's
``kernels.max_sim.forward_candidates`` and, for CUDA, ``tuning.CUDA_FORWARD_CANDIDATES`` (launch
table "cuda" entries, default first) where it exists, else ``tuning.CUDA_QUERY_GROUP_CANDIDATES``
(a negative query_group selects another CUDA kernel, e.g. -1 the wgmma one). Order-only variants
(Triton ``group_q``, CUDA ``query_group`` > 0) are dropped by default: they change only DRAM
reuse, 1-25 GB against 0.6-1.4 TB read from L2 (``--order-variants`` keeps them).
"""

from __future__ import annotations

import dataclasses
import time

import gpu_suite_common as common
from gpu_suite_common import float32_precision, flops, sync
import gpu_suite_timing as timing

SWEEP_CLASSES = {
    # class: (shape (nq, ng, lq, lg, d), dtype label, tf32)
    "small-fp16": ((64, 64, 192, 192, 512), "float16", False),
    "large-bf16": ((256, 512, 192, 192, 512), "bfloat16", False),
    "large-fp32-tf32": ((256, 512, 192, 192, 512), "float32", True),
}
ORDER_ONLY_FIELDS = ("group_q",)  # Triton ForwardConfig fields that change the launch order only


def triton_candidates(kernels, lq, lg, d, dtype, order_variants=False) -> tuple[list, str]:
    """The Triton forward launches to measure, default first, and where the list came from."""
    default = _triton_default(kernels, lq, lg, d, dtype)
    candidates = getattr(kernels, "forward_candidates", None)
    if candidates is not None:
        listed, source = list(candidates(lq, lg, d, dtype)), "kernels.forward_candidates"
    else:  # older kernels: a small sweep of today's kernel built here
        base = kernels.ForwardConfig()
        listed = [dataclasses.replace(base, **change) for change in (
            {}, {"group_q": 1}, {"group_q": 16}, {"num_stages": 2}, {"num_stages": 4},
            {"num_warps": 8}, {"block_k": 32})]
        source = "suite fallback (kernels.forward_candidates unavailable)"
    unique = []
    for config in [default] + listed:
        if not order_variants:
            config = _default_order(config, default)
        if config not in unique:
            unique.append(config)
    return unique, source


def _default_order(config, default):
    """``config`` with the default's launch order (its order-only fields)."""
    if not (dataclasses.is_dataclass(config) and dataclasses.is_dataclass(default)):
        return config
    names = {f.name for f in dataclasses.fields(config)} & {f.name for f in dataclasses.fields(default)}
    same = {f: getattr(default, f) for f in ORDER_ONLY_FIELDS if f in names}
    return dataclasses.replace(config, **same)


def _triton_default(kernels, lq, lg, d, dtype):
    try:
        return kernels.forward_config(lq, lg, d, dtype)
    except TypeError:
        return kernels.forward_config(lq, lg, d, dtype, None)


def _tuning():
    """ops/tuning.py: the package's once it is imported (the measuring process), else the file
    alone (the building process plans without importing the package and its extension)."""
    import importlib.util
    import sys

    if "transmatcher_fast" in sys.modules:
        try:
            from transmatcher_fast.ops import tuning
            return tuning
        except ImportError:
            return None
    path = common.REPO / "transmatcher_fast" / "ops" / "tuning.py"
    try:
        spec = importlib.util.spec_from_file_location("gpu_suite_tuning_file", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception:
        return None


def cuda_candidates(order_variants=False) -> list:
    """The CUDA forward launches to measure, as launch-table "cuda" entries, default first."""
    tuning = _tuning()
    listed = getattr(tuning, "CUDA_FORWARD_CANDIDATES", None)
    if listed:
        entries = [dict(entry) for entry in listed]
    else:
        groups = list(getattr(tuning, "CUDA_QUERY_GROUP_CANDIDATES", (1, 4, 8, 16)))
        entries = [{"query_group": 0}] + [{"query_group": g} for g in groups if g != 0]
    unique = []
    for entry in entries:
        # query_group >= 0 is a block order of the mma.sync kernel (0: its default); a negative
        # value selects another kernel (csrc/cuda: -1 the wgmma one), which is always kept.
        if not order_variants and entry.get("query_group", -1) > 0:
            entry = {**entry, "query_group": 0}
        if entry not in unique:
            unique.append(entry)
    return unique


def cuda_query_groups(order_variants=False) -> list:
    """The query_group orders among the CUDA candidates (0 = the kernel's default)."""
    return [e["query_group"] for e in cuda_candidates(order_variants) if set(e) == {"query_group"}]


def cuda_name(entry: dict) -> str:
    if set(entry) == {"query_group"}:
        return f"cuda-qg{entry['query_group']}"
    return "cuda-" + "-".join(f"{k}{v}" for k, v in sorted(entry.items()))


def config_name(config) -> str:
    name = getattr(config, "name", None)
    if isinstance(name, str):
        return name
    return "-".join(f"{k}{v}" for k, v in dataclasses.asdict(config).items())


def row_reference(q, g, e, rows):
    """float64 scores and maxima of the given query rows against every gallery image."""
    import torch

    s = torch.einsum("itd,jsd->ijst", q[rows].double(), g.double())
    if e is not None:
        s = s * torch.sigmoid(e.double())
    return s, s.amax(dim=2), s.amax(dim=3)


def check_rows(outputs, reference_rows, rows, limit) -> dict:
    """Every output written (no poison left), and the checked rows' maxima and argmax right."""
    import torch

    q_best, g_best, q_index, g_index = outputs
    s, q_max, g_max = reference_rows
    written = bool((q_index >= 0).all().item() and (g_index >= 0).all().item()
                   and not torch.isnan(q_best).any().item() and not torch.isnan(g_best).any().item())
    scale = max(q_max.abs().max().item(), 1e-30)
    q_err = ((q_best[rows].double() - q_max).abs().max() / scale).item()
    g_err = ((g_best[rows].double() - g_max).abs().max() / scale).item()
    at_q = s.gather(2, q_index[rows].long().unsqueeze(2)).squeeze(2)
    at_g = s.gather(3, g_index[rows].long().unsqueeze(3)).squeeze(3)
    index_ok = bool((at_q >= q_max - limit * scale).all().item()
                    and (at_g >= g_max - limit * scale).all().item())
    return {"all_written": written, "q_best_rel_err": q_err, "g_best_rel_err": g_err,
            "indices_select_the_max": index_ok,
            "ok": written and index_ok and q_err <= limit and g_err <= limit}


def launchers(backends, shape, dtype, tf32, data, sigs, order_variants=False):
    """(info, run) per candidate; ``run(k, outs)`` fills and returns the outputs for input copy
    k (a CUDA entry that is more than a query_group runs through the op with a one-class launch
    table, and returns the op's outputs). Also returns where the Triton list came from."""
    import torch

    import transmatcher_fast
    from transmatcher_fast.ops import tuning

    nq, ng, lq, lg, d = shape
    found, source = [], "unavailable (no triton backend)"
    if "triton" in backends:
        from transmatcher_fast.kernels import max_sim as kernels

        configs, source = triton_candidates(kernels, lq, lg, d, dtype, order_variants)
        # float32: TF32 or exact; 16-bit dots ignore it ("tf32", as kernels.input_precision).
        precision = "tf32" if tf32 or dtype != torch.float32 else "ieee"
        for config in configs:
            def run(k, outs, config=config):
                q, g, _ = data[k]
                return kernels.forward(q, g, sigs[k], outs, config=config, precision=precision)
            found.append(({"backend": "triton", "name": config_name(config),
                           "config": dataclasses.asdict(config)}, run))
    cuda_op = getattr(getattr(torch.ops, "transmatcher_fast_C", None), "max_sim_forward", None)
    if "cuda" in backends and cuda_op is not None:
        cls = tuning.shape_class(nq * ng, dtype, tf32)
        for entry in cuda_candidates(order_variants):
            if set(entry) == {"query_group"}:
                def run(k, outs, group=entry["query_group"]):
                    q, g, e = data[k]
                    cuda_op(q, g, e, *outs, tf32, group)
                    return outs
            else:
                table = {"format": tuning.FORMAT, "device": None, "source": "gpu_suite sweep",
                         "classes": {cls: {"backend": "cuda", "cuda": entry}}}

                def run(k, outs, table=table):
                    with tuning.use_table(table), transmatcher_fast.use_backend("cuda"), \
                            float32_precision(tf32):
                        return transmatcher_fast.max_sim(*data[k], return_indices=True)
            found.append(({"backend": "cuda", "name": cuda_name(entry), "cuda": entry,
                           **({"query_group": entry["query_group"]} if "query_group" in entry else {})},
                          run))
    return found, source, ("cuda" in backends and cuda_op is None)


def sweep_variants(backends, log, budget_s: float, classes=None, progress=None,
                   order_variants=False) -> dict:
    """Each class: every candidate checked on float64 rows and timed (do_bench median; fresh
    poisoned outputs for the check, reused outputs for timing), with its same-shape baselines.
    The defaults always run; the others while the class's share of ``budget_s`` lasts."""
    import torch

    from transmatcher_fast.ops import dispatch

    classes = classes or list(SWEEP_CLASSES)
    result = {"budget_s": round(budget_s, 1), "order_variants": order_variants, "classes": {}}
    sweep_end = time.time() + budget_s
    for index, cls in enumerate(classes):
        shape, dtype_name, tf32 = SWEEP_CLASSES[cls]
        dtype = getattr(torch, dtype_name)
        nq, ng, lq, lg, d = shape
        work = flops(*shape)
        class_end = time.time() + (sweep_end - time.time()) / (len(classes) - index)
        entry = {"shape": shape, "dtype": dtype_name, "tf32": tf32, "flops": work, "variants": []}
        result["classes"][cls] = entry
        copies = timing.copies_beyond_l2(shape, dtype)
        data = timing.inputs(shape, dtype, copies)
        sigs = [torch.sigmoid(e.float()).contiguous() for _, _, e in data]
        rows = sorted(set(range(min(4, nq))) | set(range(max(0, nq - 4), nq)))
        reference_rows = row_reference(data[0][0], data[0][1], data[0][2], rows)
        limit = 5e-3 if tf32 else 1e-4
        dev = common.DEVICE
        outputs = [torch.empty(nq, ng, lq, device=dev), torch.empty(nq, ng, lg, device=dev),
                   torch.empty(nq, ng, lq, device=dev, dtype=torch.int32),
                   torch.empty(nq, ng, lg, device=dev, dtype=torch.int32)]

        def poisoned():
            return [torch.full_like(outputs[0], float("nan")), torch.full_like(outputs[1], float("nan")),
                    torch.full_like(outputs[2], -1), torch.full_like(outputs[3], -1)]

        launches, source, cuda_missing = launchers(backends, shape, dtype, tf32, data, sigs,
                                                   order_variants)
        entry["triton_candidates_source"] = source
        if cuda_missing:
            entry["cuda"] = "unavailable (torch.ops.transmatcher_fast_C.max_sim_forward missing)"
        elif "cuda" not in backends:
            entry["cuda"] = "unavailable (no cuda backend)"
        # Each backend's default first, then CUDA (no compilation), then the Triton sweep.
        defaults = {next((i["name"] for i, _ in launches if i["backend"] == b), None) for b in backends}
        launches.sort(key=lambda item: (0 if item[0]["name"] in defaults
                                        else 1 if item[0]["backend"] == "cuda" else 2))
        for info, run in launches:
            row = dict(info, default=info["name"] in defaults)
            if not row["default"] and time.time() > class_end:
                row["skipped"] = "sweep budget"
                entry["variants"].append(row)
                continue
            start = time.time()

            def measure_one():
                dispatch.poison_outputs(True)  # for launches through the op
                try:
                    outs = run(0, poisoned())
                    sync()
                finally:
                    dispatch.poison_outputs(False)
                row.update(check_rows(outs, reference_rows, rows, limit))
                del outs
                row["ms"] = timing.time_ms(lambda k: run(k, outputs), copies, warmup=25, rep=150)
                row["tflops"] = work / row["ms"] / 1e9
            common.attempt(row, log, f"variant {cls} {row['name']}", measure_one)
            row["seconds"] = round(time.time() - start, 1)
            entry["variants"].append(row)
            if "ms" in row:
                log(f"variant {cls:16} {row['name']:38} {row['ms']:8.3f} ms "
                    f"{row['tflops']:6.1f} TFLOP/s ok={row['ok']}")
        record = {}
        methods = common.attempt(record, log, f"variant {cls} baselines",
                                 lambda: timing.baseline_methods(shape, dtype))
        for name, fn in (methods or {}).items():
            common.attempt(record, log, f"variant {cls} {name}",
                           lambda fn=fn, name=name: entry.__setitem__(
                               f"{name}_ms", timing.time_ms(fn, 1, warmup=25, rep=150)))
        if "error" in record:
            entry["baseline_error"] = record["error"]
        del data, sigs, outputs, reference_rows, methods
        common.empty_cache()
        if progress is not None:
            progress(result)
    return result


def best_by_backend(entry: dict) -> dict:
    """Per backend, the fastest correct launch of a class's measurements."""
    good = [r for r in entry.get("variants", []) if r.get("ok") and isinstance(r.get("ms"), (int, float))]
    best = {}
    for row in sorted(good, key=lambda r: r["ms"]):
        best.setdefault(row["backend"], row)
    return best


def propose_tuning_table(sweep: dict, device_name: str, source: str) -> dict:
    """The launch table (ops/tuning.py's format) that the sweep's measurements support: per
    class the fastest correct launch's backend, and each backend's fastest correct launch."""
    tuning = _tuning()
    fmt, validate = (tuning.FORMAT, tuning.validate) if tuning else (1, None)
    classes = {}
    for cls, entry in (sweep.get("classes") or {}).items():
        best = best_by_backend(entry)
        if not best:
            continue
        chosen = {"backend": min(best.values(), key=lambda r: r["ms"])["backend"]}
        if "triton" in best:
            chosen["triton"] = dict(best["triton"]["config"])
        if "cuda" in best:
            row = best["cuda"]
            chosen["cuda"] = dict(row.get("cuda") or {"query_group": int(row["query_group"])})
        classes[cls] = chosen
    table = {"format": fmt, "device": device_name, "source": source, "classes": classes}
    if validate is not None:
        validate(table, source)
    return table


def sweep_summary(sweep: dict) -> dict:
    """Per class: the fastest correct launch, the default's time and the gain over it."""
    summary = {}
    for cls, entry in (sweep.get("classes") or {}).items():
        measured = [r for r in entry.get("variants", []) if isinstance(r.get("ms"), (int, float))]
        good = [r for r in measured if r.get("ok")]
        if not good:
            summary[cls] = {"best": None}
            continue
        best = min(good, key=lambda r: r["ms"])
        default = measured[0] if measured else None
        summary[cls] = {"best": best["name"], "best_ms": best["ms"], "best_tflops": best.get("tflops"),
                        "default": default["name"] if default else None,
                        "default_ms": default["ms"] if default else None,
                        "gain_over_default": default["ms"] / best["ms"] if default else None,
                        "fraction_of_gemm": entry["gemm_ms"] / best["ms"] if entry.get("gemm_ms") else None,
                        "fraction_of_gemm_no_scores": (entry["gemm_no_scores_ms"] / best["ms"]
                                                       if entry.get("gemm_no_scores_ms") else None),
                        "failed": [r["name"] for r in entry["variants"] if r.get("ok") is False],
                        "skipped": sum(1 for r in entry["variants"] if "skipped" in r)}
    return summary


def write_tuning_table(table: dict, out, tag: str):
    import json

    path = out / f"gpu_tuning_{tag}.json"
    path.write_text(json.dumps(table, indent=1) + "\n")
    return path


def verify_table(table: dict, log) -> dict:
    """The op through dispatch with the proposed table (tuning.use_table): which backend each
    class gets, and whether its outputs are right."""
    import torch

    import transmatcher_fast
    from transmatcher_fast.ops import dispatch, tuning

    checks = {}
    dispatch.poison_outputs(True)
    try:
        with tuning.use_table(table):
            for cls in table["classes"]:
                if cls not in SWEEP_CLASSES:
                    continue
                shape, dtype_name, tf32 = SWEEP_CLASSES[cls]
                dtype = getattr(torch, dtype_name)
                (q, g, e), = timing.inputs(shape, dtype, 1)
                rows = [0, 1, shape[0] - 1]
                record = checks[cls] = {}

                def run():
                    with float32_precision(tf32):
                        record["backend"] = dispatch.select(q.device, dtype, shape[0] * shape[1]).name
                        out = transmatcher_fast.max_sim(q, g, e, return_indices=True)
                    sync()
                    record.update(check_rows(out, row_reference(q, g, e, rows), rows,
                                             5e-3 if tf32 else 1e-4))
                common.attempt(record, log, f"table check {cls}", run)
                log(f"table check {cls}: {record}")
                del q, g, e
                common.empty_cache()
    finally:
        dispatch.poison_outputs(False)
    return checks
