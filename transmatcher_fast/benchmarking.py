"""Timing and peak-memory helpers shared by the benchmarks and the CLI demo.

Peak memory is the extra memory a call needs above what was in use when it started:
``torch.cuda.max_memory_allocated`` on CUDA, the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) on CPU.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable, Optional

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    fns: dict[str, Callable[[], Any]], *, device: torch.device = torch.device("cpu"),
    warmup: int = 1, repeat: int = 5,
) -> dict[str, float]:
    """Median wall time of each ``fn()``, measured in interleaved rounds (every function once per
    round) so that ratios between them are not skewed by drift in machine speed."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Bytes of memory ``fn()`` needs above the memory in use before the call (None where it
    cannot be measured: CPU peak needs Linux's /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not _reset_cpu_peak():
        return None
    before = _status_kib("VmRSS")
    fn()
    return max(0, _status_kib("VmHWM") - before) * 1024


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """What a result file records about where it was measured."""
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# CPU peak memory is measured in a fresh interpreter: the parent runs a benchmark script's child
# mode with cpu_peak_in_child, the child measures its call with print_cpu_peak.


def cpu_peak_in_child(argv: list, timeout: float) -> int:
    """Run ``python *argv`` and return the extra peak bytes its ``print_cpu_peak`` reported."""
    # Every allocation above 64 KiB gets its own mapping, returned to the system when freed: the
    # warm-up call's memory cannot be silently reused by the measured call.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=True,
                         timeout=timeout, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def print_cpu_peak(fn: Callable[[], Any]) -> None:
    """The child side: measure ``fn`` (already warmed up) and print the result as a JSON line."""
    print(json.dumps({"peak_extra_bytes": peak_extra_bytes(fn, torch.device("cpu"))}))


def write_result(result: dict, out_dir: str, name: str) -> str:
    """Write a benchmark's result as ``out_dir/name.json`` and return the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return path


def pyplot(say: Callable[[str], None] = print):
    """``matplotlib.pyplot`` on the file-only Agg backend, or None (said) when matplotlib is not
    installed: a benchmark writes its JSON either way."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib not installed: no plot")
        return None
    return plt


def save_figure(fig: Any, path: str, dpi: int = 120) -> None:
    """Writes ``fig`` to ``path``, frees it, and says where."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    print(f"wrote {path}")
