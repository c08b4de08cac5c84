"""GPU suite, report: the compact table printed last (sections against their estimates, every
timing's methods, the sweep, ncu, Market size) and the plot."""

from __future__ import annotations


def _fmt(value, spec, default="-"):
    return default if value is None else format(value, spec)


def _section_note(name, entry, results) -> str:
    note = entry.get("reason", "")
    section = results.get(name)
    if isinstance(section, dict) and name != "build":
        checks = [c for key in ("checks", "triton_vs_cuda") for c in section.get(key, [])
                  if isinstance(c, dict)]
        if checks:
            bad = sum(1 for c in checks if c.get("ok") is False)
            note = f"{len(checks) - bad}/{len(checks)} checks ok" + (f", {note}" if note else "")
    if name == "build" and isinstance(results.get("build"), dict):
        b = results["build"]
        loaded = (results.get("import") or {}).get("extension_loaded")
        note = (f"extension {'built' if b.get('with_extension') else 'NOT built'}"
                f"{' (fallback SKIP_EXT=1)' if b.get('fallback') else ''}, ok={b.get('ok')}"
                f"{', loaded' if loaded else ''}{'; ' + b['note'] if b.get('note') else ''}")
    if name == "pytest" and isinstance(section, dict):
        note = f"rc={section.get('returncode')} {' '.join(section.get('summary') or [])}"
    if name == "compile" and isinstance(section, dict) and "jobs" in section:
        note = f"{section.get('done', 0)}/{section['jobs']} launches, {len(section.get('failed', []))} failed"
    return note


def summary_table(results: dict) -> str:
    """The compact table printed last: sections, then every timing's methods."""
    lines = [f"== gpu_suite: {results.get('device', '?')} "
             f"(deadline {results.get('deadline_s', '?')} s, "
             f"{results.get('seconds_left_before_deadline', '?')} s left) =="]
    plan = results.get("plan")
    if isinstance(plan, dict) and "total_s" in plan:
        lines.append(f"plan: {plan['total_s']:.0f} s of {plan['deadline_s']:.0f} s")
    if "backends" in results or "import" in results:
        lines.append(f"backends: {', '.join(results.get('backends') or []) or '-'}; package "
                     f"import: {(results.get('import') or {}).get('mode', '?')}")
    lines.append(f"{'section':14} {'status':8} {'s':>7} {'est':>5}  note")
    for name, entry in results.get("sections", {}).items():
        lines.append(f"{name:14} {entry.get('status', '?'):8} {_fmt(entry.get('seconds'), '7.1f'):>7} "
                     f"{_fmt(entry.get('estimate_s'), '5.0f'):>5}  {_section_note(name, entry, results)}"[:160])
    reports, skipped = [], []
    if isinstance(results.get("training"), dict) and "methods" in results["training"]:
        reports.append(("training fwd+bwd fp16 (64x64, L192, D512)", results["training"]))
    for label, report in (results.get("evaluation") or {}).items():
        if isinstance(report, dict) and "methods" in report:
            reports.append((f"evaluation fwd {label} (256x4096)", report))
        elif isinstance(report, dict) and "skipped" in report:
            skipped.append(f"evaluation fwd {label}: skipped ({report['skipped']})")
    if reports:
        lines.append(f"{'method':22} {'ms':>10} {'TFLOP/s':>8} {'of gemm':>8} {'no-scr':>7} "
                     f"{'x ref':>7} {'peak MB':>9}")
    for title, report in reports:
        lines.append(title)
        for method, row in report["methods"].items():
            if "error" in row:
                lines.append(f"  {method:20} " + ("skipped (deadline)" if row["error"].startswith("skipped")
                                                   else "ERROR"))
                continue
            peak = row.get("peak_extra_bytes")
            lines.append(f"  {method:20} {row['ms']:10.3f} {row['tflops']:8.1f} "
                         f"{_fmt(row.get('fraction_of_gemm'), '8.1%'):>8} "
                         f"{_fmt(row.get('fraction_of_gemm_no_scores'), '7.1%'):>7} "
                         f"{_fmt(row.get('speedup_vs_reference'), '7.2f'):>7} "
                         f"{_fmt(None if peak is None else peak / 2**20, '9.0f'):>9}")
    lines += skipped
    variants = results.get("variants") or {}
    for cls, entry in (variants.get("summary") or {}).items():
        if entry.get("best"):
            lines.append(f"variants {cls:16} best {entry['best']} {entry['best_ms']:.3f} ms "
                         f"({_fmt(entry.get('best_tflops'), '.0f')} TFLOP/s, "
                         f"{_fmt(entry.get('fraction_of_gemm'), '.0%')} of gemm, "
                         f"x{_fmt(entry.get('gain_over_default'), '.2f')} over {entry.get('default')})")
        else:
            lines.append(f"variants {cls:16} no correct launch measured")
    if variants.get("proposed_table_path"):
        lines.append(f"launch table: {variants['proposed_table_path']} "
                     + " ".join(f"{c}={e.get('backend')}" for c, e in
                                variants.get("proposed_table", {}).get("classes", {}).items()))
    for name, case in ((results.get("ncu") or {}).get("cases") or {}).items():
        metrics = case.get("metrics") or {}
        ms = f"{case['ms']:.3f} ms " if isinstance(case.get("ms"), float) else ""
        if metrics:
            lines.append(f"ncu {name:30} {ms}" + " ".join(
                f"{k.replace('_pct', '%')}={v:.3g}" for k, v in metrics.items() if v is not None)[:130])
        else:
            lines.append(f"ncu {name:30} {ms}{case.get('status', '')}"[:160])
    for backend, entry in ((results.get("market_eval") or {}).get("backends") or {}).items():
        lines.append(f"market {backend:8} " + (
            f"{entry['seconds']:.1f} s, {entry['tflops']:.0f} TFLOP/s, "
            f"x{_fmt(entry.get('speedup_vs_upstream'), '.0f')} upstream" if "seconds" in entry
            else entry.get("skipped") or "ERROR"))
    ceil = results.get("ceilings")
    if isinstance(ceil, dict) and "gemm_bf16_8192_tflops" in ceil:
        lines.append(f"ceilings: bf16 GEMM {ceil['gemm_bf16_8192_tflops']:.0f} TFLOP/s, TF32 GEMM "
                     f"{_fmt(ceil.get('gemm_tf32_8192_tflops'), '.0f')} TFLOP/s, "
                     f"copy {ceil['copy_tb_per_s']:.2f} TB/s")
    failures = results.get("correctness_failures")
    if failures is not None:
        lines.append(f"correctness failures: {len(failures)}")
    return "\n".join(lines)


def plot(results, path, log) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("plot: matplotlib is not installed")
        return
    panels = [("training fwd+bwd fp16", results.get("training"))]
    for label, report in (results.get("evaluation") or {}).items():
        panels.append((f"evaluation fwd {label}", report))
    panels = [(t, r) for t, r in panels if isinstance(r, dict) and "methods" in r]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, report) in zip(axes[0], panels):
        names = [n for n in report["methods"] if "tflops" in report["methods"][n]]
        ax.bar(names, [report["methods"][n]["tflops"] for n in names])
        ax.set_title(title)
        ax.set_ylabel("TFLOP/s")
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(results.get("device", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"plot: {path}")
