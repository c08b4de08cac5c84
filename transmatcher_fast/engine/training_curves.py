"""Training curves: loss, accuracy, learning rate (and mAP / rank-k when evaluated) from the
trainer's JSON-lines log, against the global step, titled with the run's name; drawn with
matplotlib's object API and Agg canvas (imported only when needed), so a caller's interactive
backend is never switched. The file: ``training_curve.png`` (``TRAINING_CURVE_NAME``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

TRAINING_CURVE_NAME = "training_curve.png"


def _read_log(log_path: Path) -> list[dict]:
    """The records of a JSON-lines log. A malformed last line is skipped (the trainer may be
    writing it); a malformed line elsewhere is an error."""
    if not log_path.is_file():
        raise ValueError(f"log_path {str(log_path)!r} does not exist or is not a file")
    lines = [(n, line) for n, line in enumerate(log_path.read_text().splitlines(), start=1)
             if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                continue
            raise ValueError(f"log_path {str(log_path)!r} line {n} is not JSON: {e}") from None
        if isinstance(record, dict):
            records.append(record)
    if not records:
        raise ValueError(f"log_path {str(log_path)!r} holds no records")
    return records


def _number(value: Any) -> Optional[float]:
    """A finite float, or None for missing / non-numeric / non-finite values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _series(records: Sequence[dict], x_of, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        x, y = x_of(r), _number(r.get(key))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


CURVE_PANELS = (("loss", "loss"), ("acc", "accuracy"), ("lr", "learning rate"))


def training_curve_series(records: Sequence[dict]) -> dict:
    """What ``plot_training_curves`` draws, from the log's records (dicts), as plain lists:

    ``{"x_label": "step" | "epochs completed",
       "panels": {key: {"step": (xs, ys), "epoch": (xs, ys)} for key in loss, acc, lr},
       "eval": {metric: (xs, ys)} for mAP and rank<k>}``

    x of a ``"step"`` record is its ``"step"``. An ``"epoch"`` or ``"eval"`` record with a
    ``"step"`` of its own (the global step when it was written) is placed there; without one, at
    the last step logged in that epoch (where the epoch ends), else at ``(epoch + 1) *
    steps_per_epoch`` estimated from the records that have both an epoch and a step. Without any
    step the x axis is the number of completed epochs (``epoch + 1``). Missing, non-numeric and
    non-finite values are skipped.
    """
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    evals = [r for r in records if r.get("kind") == "eval"]
    last_step: dict[int, float] = {}
    for r in steps + epochs + evals:
        e, s = _number(r.get("epoch")), _number(r.get("step"))
        if e is not None and s is not None:
            last_step[int(e)] = max(last_step.get(int(e), s), s)
    per_epoch = [s / (e + 1) for e, s in last_step.items()]
    steps_per_epoch = float(np.median(per_epoch)) if per_epoch else None
    by_step = steps_per_epoch is not None or any(_number(r.get("step")) is not None
                                                 for r in steps)

    def epoch_x(r: dict) -> Optional[float]:
        s = _number(r.get("step"))
        if s is not None and by_step:
            return s
        e = _number(r.get("epoch"))
        if e is None:
            return None
        if not by_step:
            return e + 1
        if int(e) in last_step:
            return last_step[int(e)]
        return None if steps_per_epoch is None else (e + 1) * steps_per_epoch

    def step_x(r: dict) -> Optional[float]:
        return _number(r.get("step"))

    eval_keys = sorted({k for r in evals for k in r
                        if (k == "mAP" or (k.startswith("rank") and k[4:].isdigit()))},
                       key=lambda k: (k != "mAP", int(k[4:]) if k != "mAP" else 0))
    return {"x_label": "step" if by_step else "epochs completed",
            "panels": {key: {"step": _series(steps, step_x, key),
                             "epoch": _series(epochs, epoch_x, key)}
                       for key, _ in CURVE_PANELS},
            "eval": {key: _series(evals, epoch_x, key) for key in eval_keys} if evals else {}}


def run_name(log_path: Union[str, Path]) -> str:
    """The run's name: the log's folder name (``runs/market_tm/log.jsonl`` -> ``market_tm``);
    the log's file stem when it has no folder name."""
    log_path = Path(log_path)
    parent = log_path.parent.name or log_path.resolve().parent.name
    return parent or log_path.stem


def plot_training_curves(log_path: Union[str, Path], out_path: Union[str, Path], *,
                         title: Optional[str] = None) -> Path:
    """Loss, accuracy and learning rate per step (thin, light) and per epoch (bold markers),
    against the global step, from the trainer's JSON-lines log; plus mAP / rank-k on the same
    axis when the log has ``"eval"`` records (placement: ``training_curve_series``). Unknown
    kinds and non-finite values are skipped. The figure is titled ``title``, by default the
    run's name (``run_name``: the log's folder). Writes a PNG (callers name it
    ``TRAINING_CURVE_NAME``).
    """
    log_path, out_path = Path(log_path), Path(out_path)
    records = _read_log(log_path)
    if not any(r.get("kind") in ("step", "epoch") for r in records):
        raise ValueError(f"log_path {str(log_path)!r} has no 'step' or 'epoch' records")
    series = training_curve_series(records)

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot_training_curves needs matplotlib: pip install matplotlib") from e

    evals = series["eval"]
    n_rows = len(CURVE_PANELS) + (1 if evals else 0)
    fig = Figure(figsize=(8, 2.6 * n_rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, 1, squeeze=False)[:, 0]
    x_label = series["x_label"]
    for ax, (key, label) in zip(axes, CURVE_PANELS):
        (xs, ys), (xe, ye) = series["panels"][key]["step"], series["panels"][key]["epoch"]
        if xs:
            ax.plot(xs, ys, color="tab:blue", alpha=0.35, linewidth=0.8, label="per step")
        if xe:
            ax.plot(xe, ye, color="tab:blue", linewidth=2.2, marker="o", markersize=4,
                    label="per epoch")
        values = ys + ye
        if key == "lr" and values and min(values) > 0 and max(values) / min(values) > 10:
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_xlabel(x_label)
        ax.grid(True, alpha=0.3)
        if xs or xe:
            ax.legend(loc="best", fontsize=8)
    if evals:
        ax = axes[-1]
        for key, (xs, ys) in evals.items():
            if xs:
                ax.plot(xs, ys, marker="o", linewidth=1.8, label=key)
        ax.set_xlabel(x_label)
        ax.set_ylabel("evaluation")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize=8)
    fig.suptitle(run_name(log_path) if title is None else title)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png")
    return out_path
