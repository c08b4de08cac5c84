"""GPU suite plumbing: the deadline, the section runner, saving the JSON and log after every
section, subprocesses with timeouts, the watchdog, precision contexts and the one helper that
catches a failing call (``attempt``). No torch at import time: the building process uses this."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Where the timing, sweep, compile and ncu code puts its tensors; tests use "cpu" (the Triton
# interpreter), also in the worker processes (GPU_SUITE_DEVICE).
DEVICE = os.environ.get("GPU_SUITE_DEVICE", "cuda")
DEFAULT_DEADLINE_S = 480.0
WATCHDOG_GRACE_S = 30.0  # after the deadline, the watchdog saves what there is and exits
LIVE: set = set()  # subprocesses this suite started and has not reaped (the watchdog ends them)


class Suite:
    """The results, the log, the deadline and the section runner of one suite process.
    ``estimates``: seconds per section (the plan's); a section is skipped when less is left."""

    def __init__(self, out: Path, tag: str, deadline_at: float, results: dict | None = None,
                 clock=time.time, echo: bool = True, estimates: dict | None = None):
        self.out, self.tag, self.deadline_at, self.clock, self.echo = out, tag, deadline_at, clock, echo
        self.results = results if results is not None else {}
        self.results.setdefault("sections", {})
        self.estimates = dict(estimates or {})
        self.json_path = out / f"gpu_suite_{tag}.json"
        self.log_path = out / f"gpu_suite_{tag}.log"
        self.current = None
        self._lock = threading.RLock()

    def remaining(self) -> float:
        return self.deadline_at - self.clock()

    def log(self, text) -> None:
        text = str(text)
        if self.echo:
            print(text, flush=True)
        with self._lock, open(self.log_path, "a") as f:
            f.write(text.rstrip("\n") + "\n")

    def save(self) -> None:
        with self._lock:
            self.results["saved_at"] = datetime.datetime.now().isoformat(timespec="seconds")
            self.results["seconds_left_before_deadline"] = round(self.remaining(), 1)
            tmp = self.json_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.results, indent=1, default=json_default))
            tmp.replace(self.json_path)

    def partial(self, name: str, value) -> None:
        """A section's results so far, saved (a kill keeps them; the section's end replaces them)."""
        with self._lock:
            self.results[name] = value
            self.save()

    def section(self, name: str, fn, estimate_s: float | None = None, skip_reason: str | None = None):
        """Runs ``fn()`` unless skipped; records status, time and result; saves. A raised
        exception is recorded, never propagated."""
        estimate = self.estimates.get(name, 0) if estimate_s is None else estimate_s
        entry = {"estimate_s": estimate, "started_at_left_s": round(self.remaining(), 1)}
        if skip_reason is None and self.remaining() < estimate:
            skip_reason = (f"deadline: {self.remaining():.0f} s left, section estimated at "
                           f"{estimate:.0f} s")
        if skip_reason is not None:
            entry.update(status="skipped", reason=skip_reason)
            self.results["sections"][name] = entry
            self.log(f"[{name}] skipped: {skip_reason}")
            self.save()
            return None
        self.current = name
        entry["status"] = "running"
        self.results["sections"][name] = entry
        self.save()
        start = self.clock()
        self.log(f"[{name}] start ({self.remaining():.0f} s left, estimated {estimate:.0f} s)")
        try:
            result = fn()
            entry["status"] = "ok"
        except Exception:  # recorded, and the suite goes on
            result = {"error": traceback.format_exc()}
            entry["status"] = "error"
            self.log(result["error"])
        entry["seconds"] = round(self.clock() - start, 1)
        if result is not None:
            self.results[name] = result
        self.current = None
        self.log(f"[{name}] {entry['status']} in {entry['seconds']:.1f} s "
                 f"({self.remaining():.0f} s left)")
        self.save()
        return result

    def start_watchdog(self, grace_s: float = WATCHDOG_GRACE_S, summary=None):
        """After deadline + grace: record the section in flight as killed, save, exit 124."""
        def fire():
            with self._lock:
                name = self.current or "(between sections)"
                self.results.setdefault("sections", {}).setdefault(name, {}).update(
                    status="killed", reason=f"watchdog: deadline + {grace_s:.0f} s passed")
                self.log(f"[watchdog] deadline passed during {name}: saving and exiting")
                try:
                    for proc in list(LIVE):
                        kill_group(proc)
                    self.save()
                    if summary is not None:
                        summary()
                finally:
                    os._exit(124)
        delay = max(1.0, self.remaining() + grace_s)
        timer = threading.Timer(delay, fire)
        timer.daemon = True
        timer.start()
        return timer


def attempt(record: dict, log, label: str, fn):
    """``fn()``'s result; on an exception None, with ``ok=False`` and the traceback in ``record``
    and one log line: the one place where the sections catch a failing call and go on."""
    try:
        return fn()
    except Exception:
        record.update(ok=False, error=traceback.format_exc(limit=4)[-1500:])
        log(f"{label}: ERROR {record['error']}")
        with contextlib.suppress(Exception):
            empty_cache()
        return None


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def json_default(value):
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


def device_tag(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "unknown"


def gpu_name_from_nvidia_smi() -> str:
    """The GPU's name without initialising CUDA in this (the building) process."""
    if shutil.which("nvidia-smi") is None:
        return "no-cuda"
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
        names = result.stdout.strip().splitlines()
        return names[0].strip() if result.returncode == 0 and names else "no-cuda"
    except (OSError, subprocess.TimeoutExpired):
        return "no-cuda"


def nvidia_smi() -> dict:
    if shutil.which("nvidia-smi") is None:
        return {"available": False}
    try:
        query = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu"
        result = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
        return {"available": True, "fields": query, "value": result.stdout.strip()}
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"available": True, "error": str(error)}


def run(cmd, timeout: float, log, env=None, cwd=REPO, tail: int = 4000) -> dict:
    """A subprocess with a timeout; its output's tail goes to the log and the record."""
    start = time.time()
    record = {"cmd": cmd if isinstance(cmd, str) else " ".join(map(str, cmd)),
              "timeout_s": round(timeout, 1)}
    if timeout <= 1:
        record.update(returncode=None, timed_out=True, seconds=0.0, note="no time left")
        return record
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                shell=isinstance(cmd, str))
        LIVE.add(proc)
        try:
            output, _ = proc.communicate(timeout=timeout)
            record.update(returncode=proc.returncode, timed_out=False)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            output, _ = proc.communicate()
            record.update(returncode=None, timed_out=True)
        finally:
            LIVE.discard(proc)
    except OSError as error:
        output = f"could not start: {error}"
        record.update(returncode=None, timed_out=False, error=str(error))
    record["seconds"] = round(time.time() - start, 1)
    record["output_tail"] = (output or "")[-tail:]
    log(f"$ {record['cmd']}  -> rc {record['returncode']}"
        f"{' (timed out)' if record['timed_out'] else ''} in {record['seconds']} s\n"
        + record["output_tail"][-tail:])
    return record


def popen(cmd, log_path: Path, env=None, cwd=REPO):
    """A background subprocess (its output to ``log_path``) that the watchdog can end."""
    with open(log_path, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
    LIVE.add(proc)
    return proc


def wait(proc, timeout: float):
    """Its exit code, or None when it ran past ``timeout`` (then it is ended)."""
    try:
        proc.wait(timeout=max(0.1, timeout))
    except subprocess.TimeoutExpired:
        kill_group(proc)
    LIVE.discard(proc)
    return proc.returncode


def kill_group(proc) -> None:
    """Ends a subprocess this suite started (and what it started), by its process group."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def float32_precision(tf32: bool):
    """TF32 on/off for float32 matmuls through torch's new API where it exists (then the
    legacy flags are never read: mixing them raises), else the legacy flag; restored after."""
    import torch

    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        previous = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = previous
    else:
        previous = matmul.allow_tf32
        matmul.allow_tf32 = tf32
        try:
            yield
        finally:
            matmul.allow_tf32 = previous


PRECISIONS = (("fp32-ieee", "float32", False), ("fp32-tf32", "float32", True),
              ("fp16", "float16", False), ("bf16", "bfloat16", False))


def precisions(labels=None):
    import torch

    return [(label, getattr(torch, dtype), tf32) for label, dtype, tf32 in PRECISIONS
            if labels is None or label in labels]


def rel_err(actual, expected) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def flops(nq, ng, lq, lg, d) -> float:
    """The forward's work: one multiply-add per score element and feature."""
    return 2.0 * nq * ng * lq * lg * d


def backward_flops(nq, ng, lq, lg, d) -> float:
    """The gather backward's work (DESIGN.md, kernel notes): each of the Nq*Ng*(Lq+Lg) outputs
    routes its gradient to one (s, t) pair, a D-long multiply-add into dq and one into dg."""
    return 4.0 * nq * ng * (lq + lg) * d
