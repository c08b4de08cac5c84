"""Everything that needs a GPU, in one call, inside a deadline: build, correctness, timings.

    bash benchmarks/gpu_run.sh                               # what a GPU machine runs ($OUT)
    python benchmarks/gpu_suite.py --out DIR --deadline 480  # DIR default: benchmarks/results/

The process that builds is not the one that measures. ``pip install -e .`` works through a
``.pth`` file, which Python reads only at start-up, so the build runs first (``--build-cmd``,
default ``pip install --no-index --no-build-isolation --no-deps -e .``; on failure again with
``TRANSMATCHER_FAST_SKIP_EXT=1``, so the Triton measurements still run), and the measurements run
in a fresh interpreter (``--child``). If even that install fails, the child imports the package
from the source tree. The JSON says which of these happened.

Sections, in order; each is skipped (and recorded as skipped) when the time left before the
deadline is below its estimate, and the JSON and log are saved after every one (a kill keeps what
finished; a watchdog saves and exits shortly after the deadline):

1. build (above);
2. correctness: every backend x fp32-ieee / fp32-tf32 / fp16 / bf16 against the float64
   reference with poisoned outputs (forward, argmax, the three gradients); ties (integer-valued
   inputs: the argmax is the lowest index, equal to the reference's); NaN at L = 192; Triton and
   CUDA argmax agreement; one case whose ``pair * L`` offset passes 2**31 (its last query rows
   against the reference); tests/test_triton_kernels.py on CUDA (run beside these, in a
   subprocess);
3. ceilings: a bf16 8192^3 cuBLAS GEMM and a device-to-device copy;
4. variants: every forward launch candidate (Triton's ``forward_candidates``: tile shapes,
   GROUP_Q, warps, stages, the "tiled" and "strip" variants; the CUDA forward's ``query_group``
   orders) on the training shape (small-fp16) and an evaluation-class shape (large-bf16,
   large-fp32-tf32), each checked against float64 rows and timed; the fastest correct one per
   class goes into a proposed launch table ``gpu_tuning_<device>.json`` (ops/tuning.py's format,
   checked with ``tuning.validate``), which is then run through the op once (``tuning.use_table``);
5. training: 64 x 64 pairs, L 192, D 512, forward + backward under fp16 autocast;
6. evaluation: 256 x 4096 pairs, forward, bf16 and fp32 (TF32);
7. market_eval: benchmarks/bench_eval.py at Market-1501 size (3,368 x 15,913, 3 layers).

Every timing has, measured in the same run, a cuBLAS bf16 GEMM of the same FLOPs (the limit every
ratio is taken against: ``fraction_of_gemm`` = GEMM time / this time), the reference in the same
dtype and ``torch.compile`` of it (``speedup_vs_reference``), and peak memory above the inputs.
Timings are medians of ``triton.testing.do_bench`` over inputs rotating through copies larger
than L2. Writes ``gpu_suite_<device>.json``, ``.log``, ``.png`` (if matplotlib is there) and
``gpu_tuning_<device>.json`` to --out, and prints a summary table last. The exit code is 1 when
a correctness check failed (or no CUDA device was found, outside --dry-run); every section runs
either way.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda"  # where the timing and sweep sections put their tensors (tests use "cpu")
DEFAULT_DEADLINE_S = 480.0
WATCHDOG_GRACE_S = 30.0  # after the deadline, the watchdog saves what there is and exits
TWO_31 = 2 ** 31

# Estimated seconds of each section on an H200 (cold Triton cache, 16 CPU cores): a section is
# skipped when less time than this is left.
ESTIMATES = {
    "correctness": 90, "ties": 15, "nan": 10, "offset_2_31": 30, "pytest": 5, "ceilings": 10,
    "variants": 60, "training": 60, "evaluation": 70, "market_eval": 150, "transreid": 90,
}
# Seconds the variant sweep leaves for the timings after it (training + evaluation).
SWEEP_RESERVE_S = 100
SWEEP_BUDGET_S = 150
SWEEP_MIN_S = 30
_LIVE: set = set()  # subprocesses this suite started and has not reaped (the watchdog ends them)
PYTEST_FILES = ["tests/test_triton_kernels.py"]


# --------------------------------------------------------------------------------------------
# Saving, the deadline and the sections


class Suite:
    """The results, the log, the deadline and the section runner of one suite process."""

    def __init__(self, out: Path, tag: str, deadline_at: float, results: dict | None = None,
                 clock=time.time, echo: bool = True):
        self.out, self.tag, self.deadline_at, self.clock, self.echo = out, tag, deadline_at, clock, echo
        self.results = results if results is not None else {}
        self.results.setdefault("sections", {})
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
            tmp.write_text(json.dumps(self.results, indent=1, default=_json_default))
            tmp.replace(self.json_path)

    def partial(self, name: str, value) -> None:
        """A section's results so far, saved (a kill keeps them; the section's end replaces them)."""
        with self._lock:
            self.results[name] = value
            self.save()

    def section(self, name: str, fn, estimate_s: float | None = None, skip_reason: str | None = None):
        """Runs ``fn()`` unless skipped; records status, time and result; saves. A raised
        exception is recorded, never propagated."""
        estimate = ESTIMATES.get(name, 0) if estimate_s is None else estimate_s
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
        self.log(f"[{name}] start ({self.remaining():.0f} s left)")
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
                    for proc in list(_LIVE):
                        _kill_group(proc)
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


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


def _device_tag(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "unknown"


def _gpu_name_from_nvidia_smi() -> str:
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


def _run(cmd, timeout: float, log, env=None, cwd=REPO, tail: int = 4000) -> dict:
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
        _LIVE.add(proc)
        try:
            output, _ = proc.communicate(timeout=timeout)
            record.update(returncode=proc.returncode, timed_out=False)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            output, _ = proc.communicate()
            record.update(returncode=None, timed_out=True)
        finally:
            _LIVE.discard(proc)
    except OSError as error:
        output = f"could not start: {error}"
        record.update(returncode=None, timed_out=False, error=str(error))
    record["seconds"] = round(time.time() - start, 1)
    record["output_tail"] = (output or "")[-tail:]
    log(f"$ {record['cmd']}  -> rc {record['returncode']}"
        f"{' (timed out)' if record['timed_out'] else ''} in {record['seconds']} s\n"
        + record["output_tail"][-tail:])
    return record


def _kill_group(proc) -> None:
    """Ends a subprocess this suite started (and what it started), by its process group."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# 1. Build (in the parent process, which never imports the package)


def default_build_cmd() -> list:
    return [sys.executable, "-m", "pip", "install", "--no-index", "--no-build-isolation",
            "--no-deps", "-e", "."]


def build_extension(log, cmd=None, timeout: float = 300.0, fallback_timeout: float = 120.0,
                    env=None) -> dict:
    """Installs the package (editable) with its extension; if that fails or times out, again
    without the extension (TRANSMATCHER_FAST_SKIP_EXT=1). Nothing is imported here: the editable
    install's .pth file is read only by an interpreter started after it."""
    env = {**os.environ, **(env or {})}
    env.setdefault("TRANSMATCHER_FAST_CUDA_ARCH", "90a")  # H100/H200 only: half the compile time
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    # The interpreter's own bin first: torch's BuildExtension runs `ninja` from PATH (else a slow
    # sequential build), and the ninja package installs it beside python.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    cmd = cmd or default_build_cmd()
    record = {"cmd": cmd if isinstance(cmd, str) else " ".join(map(str, cmd)),
              "arch": env["TRANSMATCHER_FAST_CUDA_ARCH"], "max_jobs": env["MAX_JOBS"],
              "ninja": shutil.which("ninja", path=env["PATH"]),
              "nvcc": shutil.which("nvcc", path=env["PATH"]), "attempts": []}
    if cmd == default_build_cmd():
        probe = _run([sys.executable, "-m", "pip", "--version"], 60, log, env=env)
        if probe["returncode"] != 0:
            record.update(ok=False, with_extension=False, fallback=False,
                          reason="pip is not available to this python")
            return record
    start = time.time()
    first = _run(cmd, timeout, log, env={**env, "TRANSMATCHER_FAST_SKIP_EXT": "0"})
    record["attempts"].append({"skip_ext": False, **first})
    if first["returncode"] == 0:
        record.update(ok=True, with_extension=True, fallback=False)
    else:
        log("build with the extension failed: installing without it (TRANSMATCHER_FAST_SKIP_EXT=1)"
            " so that the Triton measurements still run")
        second = _run(cmd, fallback_timeout, log, env={**env, "TRANSMATCHER_FAST_SKIP_EXT": "1"})
        record["attempts"].append({"skip_ext": True, **second})
        record.update(ok=second["returncode"] == 0, with_extension=False, fallback=True)
    record["seconds"] = round(time.time() - start, 1)
    return record


def import_package(log=print) -> dict:
    """Imports transmatcher_fast: installed, else from the source tree (``kernels/`` becomes
    ``transmatcher_fast.kernels`` there, as setup.py maps it)."""
    info = {}
    try:
        import transmatcher_fast  # noqa: F401
        info["mode"] = "installed"
    except ImportError as error:
        info["installed_import_error"] = repr(error)
        for name in [m for m in sys.modules if m == "transmatcher_fast" or m.startswith("transmatcher_fast.")]:
            del sys.modules[name]
        sys.path.insert(0, str(REPO))
        import transmatcher_fast  # noqa: F401
        info["mode"] = "source-tree"
        log(f"transmatcher_fast imported from the source tree ({error})")
    try:
        importlib.import_module("transmatcher_fast.kernels")
    except ImportError:
        kernels = importlib.import_module("kernels")
        sys.modules["transmatcher_fast.kernels"] = kernels
        import transmatcher_fast as package
        package.kernels = kernels
        info["kernels"] = "aliased from the source tree's kernels/"
    import transmatcher_fast

    info["file"] = transmatcher_fast.__file__
    info["extension_error"] = getattr(transmatcher_fast._extension, "load_error", "") or None
    return info


# --------------------------------------------------------------------------------------------
# Precision


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


def _precisions(labels=None):
    import torch

    return [(label, getattr(torch, dtype), tf32) for label, dtype, tf32 in PRECISIONS
            if labels is None or label in labels]


# --------------------------------------------------------------------------------------------
# 2. Correctness


def correctness(backends, log, device="cuda", shapes=None, labels=None) -> dict:
    import torch

    import transmatcher_fast
    from transmatcher_fast import reference
    from transmatcher_fast.ops import dispatch

    dispatch.poison_outputs(True)
    shapes = shapes or [(3, 4, 37, 21, 40), (8, 8, 192, 192, 512), (5, 3, 128, 96, 129)]
    checks, indices = [], {}
    seed = int.from_bytes(os.urandom(4), "little")  # fresh inputs every run; the JSON keeps it
    gen = torch.Generator().manual_seed(seed)
    try:
        for shape in shapes:
            nq, ng, lq, lg, d = shape
            base = [torch.randn(s, generator=gen, dtype=torch.float64)
                    for s in ((nq, lq, d), (ng, lg, d), (lg, lq))]
            grad_q = torch.randn((nq, ng, lq), generator=gen)
            grad_g = torch.randn((nq, ng, lg), generator=gen)
            for label, dtype, tf32 in _precisions(labels):
                q16, g16 = base[0].to(dtype), base[1].to(dtype)
                # The reference on the rounded inputs: what the tolerance is measured against.
                same_dtype = reference.max_sim(q16.double(), g16.double(), base[2])
                for backend in backends:
                    try:
                        with transmatcher_fast.use_backend(backend), float32_precision(tf32):
                            leaves = [q16.to(device).requires_grad_(),
                                      g16.to(device).requires_grad_(),
                                      base[2].float().to(device).requires_grad_()]
                            q_best, g_best, q_index, g_index = transmatcher_fast.max_sim(
                                *leaves, return_indices=True)
                            ((q_best * grad_q.to(device)).sum()
                             + (g_best * grad_g.to(device)).sum()).backward()
                    except Exception:
                        checks.append({"backend": backend, "precision": label, "shape": shape,
                                       "ok": False, "error": traceback.format_exc(limit=4)})
                        log(f"{backend:7} {label:9} {shape}: ERROR {checks[-1]['error']}")
                        continue
                    routed = reference.max_sim_grads(
                        grad_q.double(), grad_g.double(), q16.double(), g16.double(), base[2],
                        q_index.cpu(), g_index.cpu())
                    # Forward against the exact scores of the rounded inputs; gradients against
                    # the float64 formula routed through the backend's own argmax. 16-bit
                    # inputs are exact in float64 and accumulate in fp32: the forward is as
                    # tight as fp32; their gradients round the routed weights to 16 bits.
                    fwd_limit = {"fp32-tf32": 5e-3}.get(label, 1e-5 if label == "fp32-ieee" else 1e-4)
                    grad_limit = {"fp32-ieee": 1e-5, "fp32-tf32": 5e-3, "fp16": 5e-3}.get(label, 2e-2)
                    errors = {
                        "q_best": _rel_err(q_best, same_dtype[0]),
                        "g_best": _rel_err(g_best, same_dtype[1]),
                        "grad_query": _rel_err(leaves[0].grad, routed[0]),
                        "grad_gallery": _rel_err(leaves[1].grad, routed[1]),
                        "grad_score_embed": _rel_err(leaves[2].grad, routed[2]),
                    }
                    index_ok = _indices_select_the_max(q16, g16, base[2], q_index.cpu(),
                                                       g_index.cpu(), fwd_limit)
                    ok = (index_ok and all(errors[k] <= fwd_limit for k in ("q_best", "g_best"))
                          and all(errors[k] <= grad_limit for k in errors if k.startswith("grad")))
                    checks.append({"backend": backend, "precision": label, "shape": shape,
                                   "errors": errors, "indices_select_the_max": index_ok, "ok": ok})
                    log(f"{backend:7} {label:9} {shape}: {'ok' if ok else 'FAIL'} "
                        + " ".join(f"{k}={v:.1e}" for k, v in errors.items()))
                    if label == "fp32-ieee":
                        indices[(backend, shape)] = (q_index.cpu(), g_index.cpu(),
                                                     [leaf.grad.cpu() for leaf in leaves])
    finally:
        dispatch.poison_outputs(False)
    agreement = []
    if len(backends) == 2:
        for shape in shapes:
            if (backends[0], shape) not in indices or (backends[1], shape) not in indices:
                continue
            a, b = indices[(backends[0], shape)], indices[(backends[1], shape)]
            same = torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            grads = max(_rel_err(x, y) for x, y in zip(a[2], b[2]))
            agreement.append({"shape": shape, "same_argmax": same, "grad_rel_diff": grads,
                              "ok": same and grads <= 1e-5})
            log(f"triton vs cuda {shape}: same argmax {same}, gradients {grads:.1e}")
    return {"checks": checks, "triton_vs_cuda": agreement, "seed": seed}


def ties(backends, log, device="cuda", shapes=None, labels=None) -> dict:
    """Integer-valued inputs in {-1, 0, 1}: many equal maxima, every score exact in every
    precision. The values must equal the float64 reference's exactly, the argmax must be the
    lowest index among the equal maxima (the reference's, torch.max on the CPU), and the
    backends must agree with each other."""
    import torch

    import transmatcher_fast
    from transmatcher_fast import reference
    from transmatcher_fast.ops import dispatch

    shapes = shapes or [(3, 4, 37, 21, 40), (4, 4, 192, 192, 64)]
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    checks, seen = [], {}
    dispatch.poison_outputs(True)
    try:
        for shape in shapes:
            nq, ng, lq, lg, d = shape
            q = torch.randint(-1, 2, (nq, lq, d), generator=gen).double()
            g = torch.randint(-1, 2, (ng, lg, d), generator=gen).double()
            # No gate, and a constant gate (sigmoid(0) = 0.5: still exact).
            for gate_name, embed in (("none", None), ("half", torch.zeros(lg, lq, dtype=torch.float64))):
                expected = reference.max_sim(q, g, embed, return_indices=True)
                tied = _tie_fraction(q, g, embed)
                for label, dtype, tf32 in _precisions(labels):
                    for backend in backends:
                        record = {"backend": backend, "precision": label, "shape": shape,
                                  "gate": gate_name, "tied_fraction": tied}
                        try:
                            with transmatcher_fast.use_backend(backend), float32_precision(tf32):
                                out = transmatcher_fast.max_sim(
                                    q.to(dtype).to(device), g.to(dtype).to(device),
                                    None if embed is None else embed.float().to(device),
                                    return_indices=True)
                            out = [t.cpu() for t in out]
                        except Exception:
                            record.update(ok=False, error=traceback.format_exc(limit=4))
                            checks.append(record)
                            log(f"ties {backend} {label} {shape} gate={gate_name}: ERROR")
                            continue
                        values_exact = bool(torch.equal(out[0].double(), expected[0])
                                            and torch.equal(out[1].double(), expected[1]))
                        lowest_index = bool(torch.equal(out[2], expected[2])
                                            and torch.equal(out[3], expected[3]))
                        record.update(values_exact=values_exact, lowest_index=lowest_index,
                                      ok=values_exact and lowest_index)
                        checks.append(record)
                        seen[(backend, label, shape, gate_name)] = out
                        log(f"ties {backend:7} {label:9} {shape} gate={gate_name} "
                            f"(tied {tied:.0%}): {'ok' if record['ok'] else 'FAIL'}")
    finally:
        dispatch.poison_outputs(False)
    agreement = []
    if len(backends) == 2:
        for (backend, label, shape, gate_name), a in seen.items():
            if backend != backends[0] or (backends[1], label, shape, gate_name) not in seen:
                continue
            b = seen[(backends[1], label, shape, gate_name)]
            same = bool(torch.equal(a[2], b[2]) and torch.equal(a[3], b[3]))
            agreement.append({"precision": label, "shape": shape, "gate": gate_name,
                              "same_argmax": same, "ok": same})
    return {"checks": checks, "triton_vs_cuda": agreement, "seed": seed}


def _tie_fraction(q, g, embed) -> float:
    import torch

    scores = torch.einsum("itd,jsd->ijst", q, g)
    if embed is not None:
        scores = scores * torch.sigmoid(embed)
    best = scores.amax(dim=2, keepdim=True)
    return ((scores == best).sum(dim=2) > 1).double().mean().item()


def nan_check(backends, log, device="cuda", shape=(2, 3, 192, 192, 48), labels=None) -> dict:
    """One NaN query location and one NaN gallery location at L = 192 (past the first tiles):
    the outputs they reach are NaN, with the index the reference (torch.max on the CPU) gives,
    and every other output matches the reference."""
    import torch

    import transmatcher_fast
    from transmatcher_fast import reference
    from transmatcher_fast.ops import dispatch

    nq, ng, lq, lg, d = shape
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(nq, lq, d, generator=gen, dtype=torch.float64)
    g = torch.randn(ng, lg, d, generator=gen, dtype=torch.float64)
    e = torch.randn(lg, lq, generator=gen, dtype=torch.float64)
    t0, s0 = min(150, lq - 1), min(100, lg - 1)
    q[0, t0, d // 2] = float("nan")
    g[ng - 1, s0, 1] = float("nan")
    checks = []
    dispatch.poison_outputs(True)
    try:
        for label, dtype, tf32 in _precisions(labels):
            qd, gd = q.to(dtype), g.to(dtype)
            expected = reference.max_sim(qd.double(), gd.double(), e, return_indices=True)
            for backend in backends:
                record = {"backend": backend, "precision": label, "shape": shape,
                          "nan_query_location": [0, t0], "nan_gallery_location": [ng - 1, s0]}
                try:
                    with transmatcher_fast.use_backend(backend), float32_precision(tf32):
                        out = transmatcher_fast.max_sim(qd.to(device), gd.to(device),
                                                        e.float().to(device), return_indices=True)
                    out = [t.cpu() for t in out]
                except Exception:
                    record.update(ok=False, error=traceback.format_exc(limit=4))
                    checks.append(record)
                    log(f"nan {backend} {label}: ERROR")
                    continue
                limit = {"fp32-ieee": 1e-5, "fp32-tf32": 5e-3}.get(label, 1e-4)
                parts = {}
                for k, name in ((0, "q"), (1, "g")):
                    want_nan = torch.isnan(expected[k])
                    got_nan = torch.isnan(out[k])
                    finite = ~want_nan
                    err = _rel_err(out[k][finite], expected[k][finite]) if finite.any() else 0.0
                    parts[name] = {
                        "nan_where_reference_nan": bool(torch.equal(got_nan, want_nan)),
                        "index_at_nan_equal": bool(torch.equal(out[k + 2][want_nan],
                                                               expected[k + 2][want_nan])),
                        "reached": int(want_nan.sum()),
                        "finite_rel_err": err,
                    }
                ok = all(p["nan_where_reference_nan"] and p["index_at_nan_equal"]
                         and p["finite_rel_err"] <= limit and p["reached"] > 0
                         for p in parts.values())
                record.update(parts, ok=ok)
                checks.append(record)
                log(f"nan {backend:7} {label:9} {shape}: {'ok' if ok else 'FAIL'} "
                    + " ".join(f"{n}:nan={p['nan_where_reference_nan']},idx={p['index_at_nan_equal']},"
                               f"err={p['finite_rel_err']:.1e}" for n, p in parts.items()))
    finally:
        dispatch.poison_outputs(False)
    return {"checks": checks, "seed": seed}


def offset_plan(nq=3400, ng=3400, length=192, d=16, rows=4, free_bytes=None,
                output_rate=2e11, dtype="bfloat16") -> dict:
    """The shape arithmetic of the 2**31 case: output elements, the largest flat offset, the
    bytes the outputs take (q_best, g_best fp32 and their int32 indices), whether the checked
    rows all lie past 2**31, whether it fits in ``free_bytes``, and a time estimate per backend
    (``output_rate``: output bytes written and poisoned per second, a conservative lead)."""
    elements = nq * ng * length
    output_bytes = 2 * elements * (4 + 4)
    reference_bytes = rows * ng * length * length * 8
    first_checked_offset = (nq - rows) * ng * length
    plan = {"nq": nq, "ng": ng, "l": length, "d": d, "rows": rows, "dtype": dtype,
            "elements_per_output": elements, "largest_offset": elements - 1,
            "passes_2_31": elements - 1 >= TWO_31,
            "checked_rows_past_2_31": first_checked_offset >= TWO_31,
            "output_bytes": output_bytes, "reference_bytes": reference_bytes,
            "estimate_s_per_backend": round(3 + 3 * output_bytes / output_rate, 1)}
    if free_bytes is not None:
        plan["free_bytes"] = free_bytes
        plan["fits"] = output_bytes * 1.15 + reference_bytes * 2 < free_bytes
    return plan


def offset_case(backends, log, device="cuda", plan=None, remaining=None) -> dict:
    """Nq = Ng = 3400, L = 192, D = 16, bf16, no gate: Nq*Ng*L passes 2**31, so a kernel that
    computes the flat output offset in 32 bits writes the last rows wrongly (or out of bounds).
    The last query images' rows are compared with the float64 reference on the GPU."""
    import torch

    import transmatcher_fast
    from transmatcher_fast import reference
    from transmatcher_fast.ops import dispatch

    free, _ = torch.cuda.mem_get_info() if device == "cuda" else (None, None)
    plan = plan or offset_plan(free_bytes=free)
    result = {"plan": plan, "checks": []}
    if not plan["passes_2_31"] or not plan["checked_rows_past_2_31"]:
        raise ValueError(f"offset case does not pass 2**31: {plan}")
    if plan.get("fits") is False:
        result["skipped"] = "not enough free device memory"
        return result
    nq, ng, length, d, rows = plan["nq"], plan["ng"], plan["l"], plan["d"], plan["rows"]
    dtype = getattr(torch, plan.get("dtype", "bfloat16"))
    q = torch.randn(nq, length, d, device=device, dtype=dtype)
    g = torch.randn(ng, length, d, device=device, dtype=dtype)
    expected = reference.max_sim(q[-rows:].double(), g.double(), None, return_indices=True)
    scores = torch.einsum("itd,jsd->ijst", q[-rows:].double(), g.double())
    argmaxes = {}
    dispatch.poison_outputs(True)
    try:
        for backend in backends:
            if remaining is not None and remaining() < plan["estimate_s_per_backend"] + 5:
                result["checks"].append({"backend": backend, "ok": None,
                                         "skipped": "deadline"})
                continue
            record = {"backend": backend}
            start = time.time()
            try:
                with transmatcher_fast.use_backend(backend):
                    out = transmatcher_fast.max_sim(q, g, None, return_indices=True)
                _sync()
                tail = [t[-rows:].clone() for t in out]
                written = bool((out[2] >= 0).all().item() and (out[3] >= 0).all().item()
                               and not torch.isnan(out[0]).any().item()
                               and not torch.isnan(out[1]).any().item())
                del out
                _empty_cache()
            except Exception:
                record.update(ok=False, error=traceback.format_exc(limit=4))
                result["checks"].append(record)
                log(f"offset 2**31 {backend}: ERROR {record['error']}")
                _empty_cache()
                continue
            tol = 1e-4 * scores.abs().max().item()
            at_q = scores.gather(2, tail[2].long().unsqueeze(2)).squeeze(2)
            at_g = scores.gather(3, tail[3].long().unsqueeze(3)).squeeze(3)
            record.update(
                all_written=written,
                q_best_rel_err=_rel_err(tail[0], expected[0]),
                g_best_rel_err=_rel_err(tail[1], expected[1]),
                indices_select_the_max=bool((at_q >= expected[0] - tol).all().item()
                                            and (at_g >= expected[1] - tol).all().item()),
                seconds=round(time.time() - start, 1))
            record["ok"] = (written and record["indices_select_the_max"]
                            and record["q_best_rel_err"] <= 1e-4 and record["g_best_rel_err"] <= 1e-4)
            argmaxes[backend] = (tail[2], tail[3])
            result["checks"].append(record)
            log(f"offset 2**31 {backend}: {'ok' if record['ok'] else 'FAIL'} {record}")
    finally:
        dispatch.poison_outputs(False)
    if len(argmaxes) == 2:
        a, b = argmaxes.values()
        result["triton_vs_cuda_same_argmax"] = bool(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))
    return result


def _rel_err(actual, expected) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _indices_select_the_max(query, gallery, embed, q_index, g_index, rtol) -> bool:
    import torch

    scores = torch.einsum("itd,jsd->ijst", query.double(), gallery.double()) * torch.sigmoid(embed)
    tol = rtol * scores.abs().max().item()
    at_q = scores.gather(2, q_index.long().unsqueeze(2)).squeeze(2)
    at_g = scores.gather(3, g_index.long().unsqueeze(3)).squeeze(3)
    return bool((at_q >= scores.amax(2) - tol).all() and (at_g >= scores.amax(3) - tol).all())


def correctness_failures(results: dict) -> list:
    """Every failed correctness check in the results (the exit code's reason)."""
    failures = []
    for name in ("correctness", "ties", "nan", "offset_2_31"):
        section = results.get(name)
        if not isinstance(section, dict):
            continue
        if "error" in section:
            failures.append({"section": name, "error": section["error"][-500:]})
        for key in ("checks", "triton_vs_cuda"):
            for check in section.get(key, []):
                if check.get("ok") is False:
                    failures.append({"section": name, **{k: v for k, v in check.items()
                                                         if k != "errors"}})
        if section.get("triton_vs_cuda_same_argmax") is False:
            failures.append({"section": name, "triton_vs_cuda_same_argmax": False})
    pytest_result = results.get("pytest")
    if isinstance(pytest_result, dict) and pytest_result.get("returncode") == 1:
        failures.append({"section": "pytest", "summary": pytest_result.get("summary")})
    return failures


def start_pytest(log):
    """tests/test_triton_kernels.py on CUDA, in the background (it overlaps the correctness
    sections; both only check)."""
    if importlib.util.find_spec("pytest") is None:
        return None, "pytest is not installed"
    handle = tempfile.NamedTemporaryFile("w+", prefix="gpu_suite_pytest_", suffix=".txt", delete=False)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PYTEST_FILES]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    _LIVE.add(proc)
    log(f"pytest started in the background: {' '.join(cmd)}")
    return {"proc": proc, "file": handle.name, "cmd": " ".join(cmd), "start": time.time()}, None


def finish_pytest(job, log, timeout: float) -> dict:
    proc = job["proc"]
    try:
        proc.wait(timeout=max(1.0, timeout))
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        timed_out = True
    _LIVE.discard(proc)
    output = Path(job["file"]).read_text(errors="replace")
    with contextlib.suppress(OSError):
        os.unlink(job["file"])
    log(output[-3000:])
    lines = output.strip().splitlines()
    return {"cmd": job["cmd"], "returncode": None if timed_out else proc.returncode,
            "timed_out": timed_out, "seconds": round(time.time() - job["start"], 1),
            "summary": lines[-1:] if lines else []}


# --------------------------------------------------------------------------------------------
# Timing helpers


def _flops(nq, ng, lq, lg, d) -> float:
    return 2.0 * nq * ng * lq * lg * d


def _time(fn, rotations: int, warmup: int = 100, rep: int = 500) -> float:
    """Median milliseconds of fn(k) for k cycling through the rotating input copies. A call of
    over 100 ms is timed three times with events instead of do_bench's many runs."""
    import torch
    from triton.testing import do_bench

    state = {"k": 0}

    def call():
        state["k"] = (state["k"] + 1) % rotations
        fn(state["k"])

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    call()  # warm-up (compilation, handles)
    start.record()
    call()
    end.record()
    _sync()
    first = start.elapsed_time(end)
    if first > 100:
        times = [first]
        for _ in range(2):
            start.record()
            call()
            end.record()
            _sync()
            times.append(start.elapsed_time(end))
        return sorted(times)[1]
    return do_bench(call, warmup=warmup, rep=rep, return_mode="median")


def _peak_bytes(fn) -> int:
    import torch

    _sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(0)
    _sync()
    return torch.cuda.max_memory_allocated() - base


def _inputs(shape, dtype, copies, requires_grad=False):
    import torch

    nq, ng, lq, lg, d = shape
    out = []
    for _ in range(copies):
        q = torch.randn(nq, lq, d, device=DEVICE, dtype=dtype)
        g = torch.randn(ng, lg, d, device=DEVICE, dtype=dtype)
        e = torch.randn(lg, lq, device=DEVICE)
        out.append([t.requires_grad_(requires_grad) for t in (q, g, e)])
    return out


def _copies_beyond_l2(shape, dtype) -> int:
    import torch

    nq, ng, lq, lg, d = shape
    size = (nq * lq + ng * lg) * d * torch.tensor([], dtype=dtype).element_size()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(2, min(16, -(-3 * l2 // size)))


def report_rows(flops: float, times: dict, peaks: dict, errors: dict | None = None) -> dict:
    """Per method: ms, TFLOP/s, fraction_of_gemm (GEMM time / this), speedup_vs_reference,
    peak memory and its reduction against the reference."""
    rows = {}
    for method, ms in times.items():
        rows[method] = {"ms": ms, "tflops": flops / ms / 1e9, "peak_extra_bytes": peaks.get(method)}
    for method, row in rows.items():
        if "gemm" in rows:
            row["fraction_of_gemm"] = rows["gemm"]["ms"] / row["ms"]
        if "reference" in rows:
            row["speedup_vs_reference"] = rows["reference"]["ms"] / row["ms"]
            if peaks.get("reference") and peaks.get(method):
                row["memory_reduction_vs_reference"] = peaks["reference"] / peaks[method]
    for method, error in (errors or {}).items():
        rows[method] = {"error": error}
    return rows


def _measure(methods: dict, copies: int, log, name: str, flops: float, remaining=None) -> dict:
    """Peak memory and time of each method; near the deadline the rest are skipped (a
    torch.compile method, whose first call compiles, needs a minute)."""
    times, peaks, errors = {}, {}, {}
    for method, fn in methods.items():
        left = remaining() if remaining is not None else float("inf")
        if left < (60 if method.startswith("compiled") else 10):
            errors[method] = f"skipped: {left:.0f} s left before the deadline"
            log(f"{name} {method}: {errors[method]}")
            continue
        try:
            peaks[method] = None if method.startswith("gemm") else _peak_bytes(fn)
            times[method] = _time(fn, copies)
        except Exception:
            errors[method] = traceback.format_exc(limit=3)
            log(f"{name} {method}: ERROR {errors[method]}")
            _empty_cache()
    rows = report_rows(flops, times, peaks, errors)
    for method, row in rows.items():
        if "ms" in row:
            log(f"{name} {method:20} {row['ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s "
                + " ".join(f"{k}={v:.2f}" for k, v in row.items()
                           if isinstance(v, float) and k not in ("ms", "tflops")))
    return rows


# --------------------------------------------------------------------------------------------
# 3. Ceilings


def ceilings(log) -> dict:
    """The two numbers METHOD.md asks for, measured here: bf16 GEMM rate on random data and
    device-to-device copy bandwidth (bytes read + written)."""
    import torch
    from triton.testing import do_bench

    n = 8192
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    src = torch.randn(1 << 30, device=DEVICE, dtype=torch.float32)  # 4 GiB
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    result = {"gemm_bf16_8192_tflops": 2 * n ** 3 / ms / 1e9, "gemm_bf16_8192_ms": ms,
              "copy_tb_per_s": 2 * src.numel() * 4 / copy_ms / 1e9, "copy_bytes": 2 * src.numel() * 4}
    log(f"ceilings: bf16 GEMM {result['gemm_bf16_8192_tflops']:.0f} TFLOP/s, "
        f"copy {result['copy_tb_per_s']:.2f} TB/s")
    return result


# --------------------------------------------------------------------------------------------
# 4. Kernel variants and the proposed launch table


SWEEP_CLASSES = {
    # class: (shape (nq, ng, lq, lg, d), dtype label, tf32)
    "small-fp16": ((64, 64, 192, 192, 512), "float16", False),
    "large-bf16": ((256, 512, 192, 192, 512), "bfloat16", False),
    "large-fp32-tf32": ((256, 512, 192, 192, 512), "float32", True),
}


def triton_candidates(kernels, lq, lg, d, dtype) -> tuple[list, str]:
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
        if config not in unique:
            unique.append(config)
    return unique, source


def _triton_default(kernels, lq, lg, d, dtype):
    try:
        return kernels.forward_config(lq, lg, d, dtype)
    except TypeError:
        return kernels.forward_config(lq, lg, d, dtype, None)


def cuda_query_groups() -> list:
    try:
        from transmatcher_fast.ops import tuning

        groups = list(getattr(tuning, "CUDA_QUERY_GROUP_CANDIDATES", (1, 4, 8, 16)))
    except ImportError:
        groups = [1, 4, 8, 16]
    return [0] + [g for g in groups if g != 0]


def config_name(config) -> str:
    name = getattr(config, "name", None)
    if isinstance(name, str):
        return name
    fields = dataclasses.asdict(config)
    return "-".join(f"{k}{v}" for k, v in fields.items())


def _row_reference(q, g, e, rows):
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


def sweep_variants(backends, log, budget_s: float, classes=None, progress=None) -> dict:
    """Each class: every Triton candidate and CUDA query_group, checked on float64 rows and
    timed (do_bench median; fresh poisoned outputs for the check, reused outputs for timing)."""
    import torch

    from transmatcher_fast.ops import dispatch

    kernels = None
    if "triton" in backends:
        from transmatcher_fast.kernels import max_sim as kernels
    cuda_op = None
    if "cuda" in backends:
        cuda_op = getattr(getattr(torch.ops, "transmatcher_fast_C", None), "max_sim_forward", None)
    classes = classes or list(SWEEP_CLASSES)
    result = {"budget_s": round(budget_s, 1), "classes": {}}
    sweep_end = time.time() + budget_s
    for index, cls in enumerate(classes):
        shape, dtype_name, tf32 = SWEEP_CLASSES[cls]
        dtype = getattr(torch, dtype_name)
        nq, ng, lq, lg, d = shape
        flops = _flops(*shape)
        class_end = time.time() + (sweep_end - time.time()) / (len(classes) - index)
        entry = {"shape": shape, "dtype": dtype_name, "tf32": tf32, "flops": flops, "variants": []}
        result["classes"][cls] = entry
        copies = _copies_beyond_l2(shape, dtype)
        data = _inputs(shape, dtype, copies)
        sigs = [torch.sigmoid(e.float()).contiguous() for _, _, e in data]
        rows = sorted(set(range(min(4, nq))) | set(range(max(0, nq - 4), nq)))
        reference_rows = _row_reference(data[0][0], data[0][1], data[0][2], rows)
        limit = 5e-3 if tf32 else 1e-4
        outputs = [torch.empty(nq, ng, lq, device=DEVICE), torch.empty(nq, ng, lg, device=DEVICE),
                   torch.empty(nq, ng, lq, device=DEVICE, dtype=torch.int32),
                   torch.empty(nq, ng, lg, device=DEVICE, dtype=torch.int32)]

        def poisoned():
            return [torch.full_like(outputs[0], float("nan")), torch.full_like(outputs[1], float("nan")),
                    torch.full_like(outputs[2], -1), torch.full_like(outputs[3], -1)]

        launches = []
        if kernels is not None:
            configs, source = triton_candidates(kernels, lq, lg, d, dtype)
            entry["triton_candidates_source"] = source
            # float32: TF32 or exact; 16-bit dots ignore it ("tf32", as kernels.input_precision).
            precision = "tf32" if tf32 or dtype != torch.float32 else "ieee"
            for config in configs:
                def run(k, outs, config=config):
                    q, g, _ = data[k]
                    kernels.forward(q, g, sigs[k], outs, config=config, precision=precision)
                launches.append(({"backend": "triton", "name": config_name(config),
                                  "config": dataclasses.asdict(config)}, run))
        else:
            entry["triton_candidates_source"] = "unavailable (no triton backend)"
        if cuda_op is not None:
            for group in cuda_query_groups():
                def run(k, outs, group=group):
                    q, g, e = data[k]
                    cuda_op(q, g, e, *outs, tf32, group)
                launches.append(({"backend": "cuda", "name": f"cuda-qg{group}",
                                  "query_group": group}, run))
        else:
            entry["cuda"] = "unavailable (" + ("no cuda backend" if "cuda" not in backends else
                                               "torch.ops.transmatcher_fast_C.max_sim_forward missing") + ")"
        # Defaults first, then the CUDA orders (no compilation), then the Triton sweep.
        first = launches[0][0]["name"] if launches else None
        launches.sort(key=lambda item: (0 if item[0]["name"] in (first, "cuda-qg0")
                                        else 1 if item[0]["backend"] == "cuda" else 2))
        for position, (info, run) in enumerate(launches):
            row = dict(info)
            defaults = 2 if cuda_op is not None and kernels is not None else 1
            if position >= defaults and time.time() > class_end:  # the defaults always run
                row["skipped"] = "sweep budget"
                entry["variants"].append(row)
                continue
            start = time.time()
            try:
                outs = poisoned()
                run(0, outs)
                _sync()
                row.update(check_rows(outs, reference_rows, rows, limit))
                del outs
                row["ms"] = _time(lambda k: run(k, outputs), copies, warmup=25, rep=150)
                row["tflops"] = flops / row["ms"] / 1e9
            except Exception:
                row.update(ok=False, error=traceback.format_exc(limit=3)[-1500:])
                _sync()
            row["seconds"] = round(time.time() - start, 1)
            entry["variants"].append(row)
            log(f"variant {cls:16} {row['name']:38} "
                + (f"{row['ms']:8.3f} ms {row['tflops']:6.1f} TFLOP/s ok={row['ok']}"
                   if "ms" in row else f"ERROR {row.get('error', '')[-300:]}"))
        try:  # the GEMM limit for this class, bf16, same FLOPs
            a = torch.randn(nq * lq, d, device=DEVICE, dtype=torch.bfloat16)
            b = torch.randn(ng * lg, d, device=DEVICE, dtype=torch.bfloat16)
            chunk = ng  # gallery images per GEMM: a divisor of ng, output at most 2 GiB
            while chunk * nq * lq * lg * 2 > (2 << 30) and chunk % 2 == 0:
                chunk //= 2
            out = torch.empty(nq * lq, chunk * lg, device=DEVICE, dtype=torch.bfloat16)

            def gemm(_k):
                for j0 in range(0, ng * lg, chunk * lg):
                    torch.mm(a, b[j0:j0 + chunk * lg].T, out=out)
            entry["gemm_ms"] = _time(gemm, 1, warmup=25, rep=150)
            del a, b, out
        except Exception:
            entry["gemm_error"] = traceback.format_exc(limit=2)
        del data, sigs, outputs, reference_rows
        _empty_cache()
        if progress is not None:
            progress(result)
    dispatch.poison_outputs(False)
    return result


def propose_tuning_table(sweep: dict, device_name: str, source: str) -> dict:
    """The launch table (ops/tuning.py's format) that the sweep's measurements support: per
    class the fastest correct launch's backend, and each backend's fastest correct launch."""
    try:
        from transmatcher_fast.ops import tuning

        fmt, validate = tuning.FORMAT, tuning.validate
    except ImportError:
        fmt, validate = 1, None
    classes = {}
    for cls, entry in (sweep.get("classes") or {}).items():
        good = [r for r in entry.get("variants", []) if r.get("ok") and isinstance(r.get("ms"), (int, float))]
        if not good:
            continue
        best = min(good, key=lambda r: r["ms"])
        chosen = {"backend": best["backend"]}
        triton = [r for r in good if r["backend"] == "triton"]
        cuda = [r for r in good if r["backend"] == "cuda"]
        if triton:
            chosen["triton"] = dict(min(triton, key=lambda r: r["ms"])["config"])
        if cuda:
            chosen["cuda"] = {"query_group": int(min(cuda, key=lambda r: r["ms"])["query_group"])}
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
                        "failed": [r["name"] for r in entry["variants"] if r.get("ok") is False],
                        "skipped": sum(1 for r in entry["variants"] if "skipped" in r)}
    return summary


def write_tuning_table(table: dict, out: Path, tag: str) -> Path:
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
                (q, g, e), = _inputs(shape, dtype, 1)
                rows = [0, 1, shape[0] - 1]
                try:
                    with float32_precision(tf32):
                        picked = dispatch.select(q.device, dtype, shape[0] * shape[1]).name
                        out = transmatcher_fast.max_sim(q, g, e, return_indices=True)
                    _sync()
                    checks[cls] = {"backend": picked, **check_rows(
                        out, _row_reference(q, g, e, rows), rows, 5e-3 if tf32 else 1e-4)}
                except Exception:
                    checks[cls] = {"ok": False, "error": traceback.format_exc(limit=3)}
                log(f"table check {cls}: {checks[cls]}")
                del q, g, e
                _empty_cache()
    finally:
        dispatch.poison_outputs(False)
    return checks


# --------------------------------------------------------------------------------------------
# 5.-7. Timings


def bench_training(backends, log, table=None, compile_reference=True,
                   shape=(64, 64, 192, 192, 512), remaining=None) -> dict:
    """64x64 pairs, forward + backward under fp16 autocast (upstream's AMP training)."""
    import torch

    import transmatcher_fast
    from transmatcher_fast import reference

    copies = _copies_beyond_l2(shape, torch.float32)
    data = _inputs(shape, torch.float32, copies, requires_grad=True)

    def step(op):
        def run(k):
            q, g, e = data[k]
            with torch.autocast(torch.device(DEVICE).type, dtype=torch.float16):
                q_best, g_best = op(q, g, e)[:2]
            (q_best.float().sum() + g_best.float().sum()).backward()
        return run

    methods = {}
    for backend in backends:
        def ours(q, g, e, backend=backend):
            with transmatcher_fast.use_backend(backend):
                return transmatcher_fast.max_sim(q, g, e)
        methods[backend] = step(ours)
    if table is not None:
        from transmatcher_fast.ops import tuning

        def tuned(q, g, e):
            with tuning.use_table(table), transmatcher_fast.use_backend(None):
                return transmatcher_fast.max_sim(q, g, e)
        methods["tuned_auto"] = step(tuned)
    methods["reference"] = step(reference.max_sim)
    if compile_reference:
        methods["compiled_reference"] = step(torch.compile(reference.max_sim))
    a = torch.randn(shape[0] * shape[2], shape[4], device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(shape[1] * shape[3], shape[4], device=DEVICE, dtype=torch.bfloat16)
    # fwd + bwd of the matcher is three GEMMs of this size in the materialised computation.
    methods["gemm"] = lambda k: (a @ b.T, a @ b.T, a @ b.T)
    flops = 3 * _flops(*shape)
    rows = _measure(methods, copies, log, "training fwd+bwd fp16", flops, remaining)
    return {"shape": dict(zip(("nq", "ng", "lq", "lg", "d"), shape)), "flops": flops,
            "methods": rows, "compiled_reference": compile_reference,
            "note": "flops = 3 x 2*Nq*Ng*Lq*Lg*D (fwd + bwd); gemm = 3 bf16 GEMMs "
                    "[Nq*Lq, D] x [D, Ng*Lg]"}


def bench_evaluation(backends, log, table=None, compile_reference=True, remaining=None,
                     shape=(256, 4096, 192, 192, 512), chunk=128,
                     dtypes=(("bf16", "bfloat16"), ("fp32-tf32", "float32")), progress=None) -> dict:
    """256x4096 pairs, forward only, bf16 and fp32 (ours with TF32 allowed; the reference with
    TF32 off, upstream's setting, and with it on). ``chunk``: gallery images per reference
    chunk (256*128*192*192 scores: 2.4 GB in bf16); a divisor of Ng."""
    import torch

    import transmatcher_fast
    from transmatcher_fast import reference

    nq, ng, lq, lg, d = shape
    reports = {}
    compiled_chunk = torch.compile(reference.max_sim) if compile_reference else None

    def chunked(fn):
        def run(q, g, e):
            for j0 in range(0, ng, chunk):
                fn(q, g[j0:j0 + chunk], e)
        return run

    for label, dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        if remaining is not None and remaining() < 25:
            reports[label] = {"skipped": "deadline"}
            continue
        copies = 2  # each copy is 0.85 GB (bf16): far beyond L2
        data = _inputs(shape, dtype, copies)
        methods = {}
        with torch.no_grad():
            for backend in backends:
                def ours(k, backend=backend):
                    with transmatcher_fast.use_backend(backend), float32_precision(True):
                        transmatcher_fast.max_sim(*data[k])
                methods[backend] = ours
            if table is not None:
                from transmatcher_fast.ops import tuning

                def tuned(k):
                    with tuning.use_table(table), transmatcher_fast.use_backend(None), \
                            float32_precision(True):
                        transmatcher_fast.max_sim(*data[k])
                methods["tuned_auto"] = tuned
            for tf32 in ([False, True] if dtype == torch.float32 else [False]):
                def ref(k, tf32=tf32):
                    with float32_precision(tf32):
                        chunked(reference.max_sim)(*data[k])
                methods["reference" + ("_tf32" if tf32 else "")] = ref
            if compiled_chunk is not None:
                if dtype == torch.float32:  # compiled with TF32 on, as ours runs
                    def compiled(k):
                        with float32_precision(True):
                            chunked(compiled_chunk)(*data[k])
                    methods["compiled_reference_tf32"] = compiled
                else:
                    methods["compiled_reference"] = lambda k: chunked(compiled_chunk)(*data[k])
            a = torch.randn(nq * lq, d, device=DEVICE, dtype=torch.bfloat16)
            b = torch.randn(ng * lg, d, device=DEVICE, dtype=torch.bfloat16)
            out = torch.empty(nq * lq, chunk * lg, device=DEVICE, dtype=torch.bfloat16)

            def gemm(k):
                for j0 in range(0, ng * lg, chunk * lg):
                    torch.mm(a, b[j0:j0 + chunk * lg].T, out=out)
            methods["gemm"] = gemm
            rows = _measure(methods, copies, log, f"evaluation fwd {label}", _flops(*shape),
                            remaining)
        reports[label] = {"shape": dict(zip(("nq", "ng", "lq", "lg", "d"), shape)),
                          "flops": _flops(*shape), "methods": rows,
                          "note": "gemm = bf16 [Nq*Lq, D] x [D, 128*Lg] chunks (the limit for "
                                  "both dtypes); reference = upstream's materialised computation "
                                  "in 128-image gallery chunks"}
        del data, a, b, out
        _empty_cache()
        if progress is not None:
            progress(reports)
    return reports


def bench_market_eval(out: Path, log, timeout: float) -> dict:
    """benchmarks/bench_eval.py at Market-1501 size (3,368 x 15,913, 3 layers, bf16): ours in full,
    upstream's materialised evaluation on 128 x 2,048 pairs, scaled by the pair count."""
    market = out / "market"
    market.mkdir(exist_ok=True)
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_eval.py"), "--queries", "3368",
           "--gallery", "15913", "--device", "cuda", "--reference-pairs", str(128 * 2048),
           "--out", str(market)]
    record = _run(cmd, timeout, log, tail=3000)
    record["summary"] = record.get("output_tail", "").strip().splitlines()[-6:]
    return record


def bench_transreid_gpu(out: Path, log, timeout: float) -> dict:
    """benchmarks/bench_transreid.py on the GPU: ViT-B/16 training step (batch 64, 256x128,
    strides 16 and 12, JPM + SIE, fp16 AMP as upstream trains) and feature extraction, ours
    against upstream's explicit-attention, sequential-JPM computation."""
    folder = out / "transreid"
    folder.mkdir(exist_ok=True)
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_transreid.py"), "--device", "cuda",
           "--arch", "vit_base_patch16", "--batch", "64", "--amp", "fp16", "--out", str(folder)]
    record = _run(cmd, timeout, log, tail=3000)
    record["summary"] = record.get("output_tail", "").strip().splitlines()[-8:]
    return record


# --------------------------------------------------------------------------------------------
# Summary and plot


def _fmt(value, spec, default="-"):
    return default if value is None else format(value, spec)


def summary_table(results: dict) -> str:
    """The compact table printed last: sections, then every timing's methods."""
    lines = [f"== gpu_suite: {results.get('device', '?')} "
             f"(deadline {results.get('deadline_s', '?')} s, "
             f"{results.get('seconds_left_before_deadline', '?')} s left) =="]
    if "backends" in results or "import" in results:
        lines.append(f"backends: {', '.join(results.get('backends') or []) or '-'}; package "
                     f"import: {(results.get('import') or {}).get('mode', '?')}")
    lines.append(f"{'section':14} {'status':8} {'s':>7} {'est':>5}  note")
    for name, entry in results.get("sections", {}).items():
        note = entry.get("reason", "")
        section = results.get(name)
        if isinstance(section, dict) and name not in ("build",):
            checks = [c for key in ("checks", "triton_vs_cuda") for c in section.get(key, [])
                      if isinstance(c, dict)]
            if checks:
                bad = sum(1 for c in checks if c.get("ok") is False)
                note = f"{len(checks) - bad}/{len(checks)} checks ok" + (f", {note}" if note else "")
        if name == "build" and isinstance(results.get("build"), dict):
            b = results["build"]
            note = (f"extension {'built' if b.get('with_extension') else 'NOT built'}"
                    f"{' (fallback SKIP_EXT=1)' if b.get('fallback') else ''}, ok={b.get('ok')}"
                    f"{'; ' + b['note'] if b.get('note') else ''}")
        if name == "pytest" and isinstance(section, dict):
            note = f"rc={section.get('returncode')} {' '.join(section.get('summary') or [])}"
        lines.append(f"{name:14} {entry.get('status', '?'):8} {_fmt(entry.get('seconds'), '7.1f'):>7} "
                     f"{_fmt(entry.get('estimate_s'), '5.0f'):>5}  {note}"[:160])
    reports = []
    if isinstance(results.get("training"), dict) and "methods" in results["training"]:
        reports.append(("training fwd+bwd fp16 (64x64, L192, D512)", results["training"]))
    skipped = []
    for label, report in (results.get("evaluation") or {}).items():
        if isinstance(report, dict) and "methods" in report:
            reports.append((f"evaluation fwd {label} (256x4096)", report))
        elif isinstance(report, dict) and "skipped" in report:
            skipped.append(f"evaluation fwd {label}: skipped ({report['skipped']})")
    if reports:
        lines.append(f"{'method':22} {'ms':>10} {'TFLOP/s':>8} {'of gemm':>8} {'x ref':>7} {'peak MB':>9}")
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
                         f"{_fmt(row.get('speedup_vs_reference'), '7.2f'):>7} "
                         f"{_fmt(None if peak is None else peak / 2**20, '9.0f'):>9}")
    lines += skipped
    sweep = (results.get("variants") or {}).get("summary") or {}
    for cls, entry in sweep.items():
        if entry.get("best"):
            lines.append(f"variants {cls:16} best {entry['best']} {entry['best_ms']:.3f} ms "
                         f"({_fmt(entry.get('best_tflops'), '.0f')} TFLOP/s, "
                         f"{_fmt(entry.get('fraction_of_gemm'), '.0%')} of gemm, "
                         f"x{_fmt(entry.get('gain_over_default'), '.2f')} over {entry.get('default')})")
        else:
            lines.append(f"variants {cls:16} no correct launch measured")
    variants = results.get("variants") or {}
    if variants.get("proposed_table_path"):
        lines.append(f"launch table: {variants['proposed_table_path']} "
                     + " ".join(f"{c}={e.get('backend')}" for c, e in
                                variants.get("proposed_table", {}).get("classes", {}).items()))
    ceil = results.get("ceilings")
    if isinstance(ceil, dict) and "gemm_bf16_8192_tflops" in ceil:
        lines.append(f"ceilings: bf16 GEMM {ceil['gemm_bf16_8192_tflops']:.0f} TFLOP/s, "
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


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S,
                        help="seconds from start for the whole run (default %(default)s)")
    parser.add_argument("--deadline-at", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--skip-build", action="store_true",
                        help="measure in this process with the package as installed")
    parser.add_argument("--build-cmd", default=None,
                        help="the install command (shell words; default: pip install --no-index "
                             "--no-build-isolation --no-deps -e .)")
    parser.add_argument("--build-timeout", type=float, default=240.0,
                        help="seconds for the install with the extension (then one without)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip")
    parser.add_argument("--only", default="", help="comma-separated sections to run (and no other)")
    parser.add_argument("--skip-pytest", action="store_true")
    parser.add_argument("--quick", action="store_true", help="skip evaluation and market_eval")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU sections; exit 0 where there is no CUDA device")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="without CUDA: run a tiny correctness check on the Triton interpreter")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tag", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    deadline_at = args.deadline_at or start + args.deadline
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.child or args.skip_build:
        return measure(args, out, deadline_at)
    # The building process: never imports the package (the install's .pth is read at start-up).
    tag = args.tag or _device_tag(_gpu_name_from_nvidia_smi())
    suite = Suite(out, tag, deadline_at)
    suite.log_path.write_text("")
    suite.results.update(date=datetime.datetime.now().isoformat(timespec="seconds"),
                         deadline_s=args.deadline, argv=sys.argv[1:] if argv is None else argv,
                         python=sys.executable, dry_run=args.dry_run, build_pid=os.getpid())
    build_cmd = shlex.split(args.build_cmd) if args.build_cmd else None

    def build():
        record = build_extension(
            suite.log, cmd=build_cmd,
            timeout=min(args.build_timeout, max(30.0, suite.remaining() - 180)),
            fallback_timeout=60.0)  # the install without the extension: seconds
        if args.build_cmd:
            record["note"] = "install command replaced (--build-cmd)" + (
                ": dry run" if args.dry_run else "")
        return record
    suite.section("build", build, estimate_s=0)
    child = [sys.executable, str(Path(__file__).resolve()), "--child", "--out", str(out),
             "--deadline-at", repr(deadline_at), "--tag", tag, "--deadline", str(args.deadline)]
    for flag in ("skip_pytest", "quick", "dry_run", "cpu_smoke"):
        if getattr(args, flag):
            child.append("--" + flag.replace("_", "-"))
    for option in ("skip", "only"):
        if getattr(args, option):
            child += ["--" + option, getattr(args, option)]
    suite.log(f"measuring in a fresh interpreter: {' '.join(child)}")
    try:
        rc = subprocess.run(child, cwd=REPO, timeout=max(10.0, suite.remaining() + WATCHDOG_GRACE_S + 30)).returncode
    except subprocess.TimeoutExpired:
        rc = 124
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
    tag = args.tag or _device_tag(device_name)
    results = {}
    json_path = out / f"gpu_suite_{tag}.json"
    if args.child and json_path.exists():
        results = json.loads(json_path.read_text())  # the build's record, from the parent
    suite = Suite(out, tag, deadline_at, results)
    if not args.child:
        suite.log_path.write_text("")
        results.update(date=datetime.datetime.now().isoformat(timespec="seconds"),
                       deadline_s=args.deadline, argv=sys.argv[1:])
    results.update(device=device_name, cuda_available=cuda, pid=os.getpid())
    try:
        results["import"] = import_package(suite.log)
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
                                    for name in ("numpy", "matplotlib", "pytest", "tqdm", "yaml", "PIL")}
    results["nvidia_smi"] = _nvidia_smi()
    if not cuda:
        suite.log("no CUDA device: no GPU section runs")
        results["no_cuda"] = True
        if args.cpu_smoke:
            suite.section("cpu_smoke", lambda: correctness(
                [b for b in ("triton",) if b in dispatch.available_backends("cpu")], suite.log,
                device="cpu", shapes=[(2, 3, 9, 7, 20)], labels=["fp32-ieee"]), estimate_s=0)
        suite.save()
        print(summary_table(results), flush=True)
        return 0 if args.dry_run else 1
    backends = [b for b in ("triton", "cuda") if b in dispatch.available_backends("cuda")]
    results["backends"] = backends
    suite.log(f"device {device_name}; backends {backends}; torch {torch.__version__}; "
              f"import {results['import'].get('mode')}")
    suite.save()
    suite.start_watchdog(summary=lambda: print(summary_table(suite.results), flush=True))
    run_sections(suite, args, backends, device_name)
    results["correctness_failures"] = correctness_failures(results)
    with contextlib.suppress(Exception):
        plot(results, out / f"gpu_suite_{tag}.png", suite.log)
    suite.save()
    print(summary_table(results), flush=True)
    return 1 if results["correctness_failures"] else 0


def _nvidia_smi() -> dict:
    if shutil.which("nvidia-smi") is None:
        return {"available": False}
    try:
        query = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu"
        result = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
        return {"available": True, "fields": query, "value": result.stdout.strip()}
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"available": True, "error": str(error)}


def run_sections(suite: Suite, args, backends, device_name) -> None:
    only = {s for s in args.only.split(",") if s}
    skip = {s for s in args.skip.split(",") if s}
    if args.skip_pytest:
        skip.add("pytest")
    if args.quick:
        skip |= {"evaluation", "market_eval", "transreid"}

    def reason(name):
        if args.dry_run:
            return "dry run"
        if (only and name not in only) or name in skip:
            return "not selected"
        return None

    log = suite.log
    pytest_job = None
    if reason("pytest") is None and suite.remaining() > 200:
        pytest_job, why = start_pytest(log)
        if why:
            suite.results["pytest_note"] = why
    try:
        _sections(suite, args, backends, device_name, reason, pytest_job)
    finally:
        if pytest_job is not None and pytest_job["proc"].poll() is None:
            _kill_group(pytest_job["proc"])


def _sections(suite, args, backends, device_name, reason, pytest_job) -> None:
    log = suite.log
    suite.section("correctness", lambda: correctness(backends, log), skip_reason=reason("correctness"))
    suite.section("ties", lambda: ties(backends, log), skip_reason=reason("ties"))
    suite.section("nan", lambda: nan_check(backends, log), skip_reason=reason("nan"))
    suite.section("offset_2_31", lambda: offset_case(backends, log, remaining=suite.remaining),
                  skip_reason=reason("offset_2_31"))
    if pytest_job is not None:  # finished before the timings start: they must run alone
        budget = min(90.0, suite.remaining() - 200)
        suite.section("pytest", lambda: finish_pytest(pytest_job, log, budget))
    else:
        suite.section("pytest", None, skip_reason=reason("pytest") or suite.results.get(
            "pytest_note", "not started: too little time"))
    suite.section("ceilings", lambda: ceilings(log), skip_reason=reason("ceilings"))
    table = None

    def variants():
        nonlocal table
        budget = max(SWEEP_MIN_S, min(SWEEP_BUDGET_S, suite.remaining() - SWEEP_RESERVE_S))
        sweep = sweep_variants(backends, log, budget,
                               progress=lambda partial: suite.partial("variants", partial))
        sweep["summary"] = sweep_summary(sweep)
        try:
            table = propose_tuning_table(sweep, device_name,
                                         f"benchmarks/gpu_suite.py variants, {datetime.date.today()}")
            sweep["proposed_table"] = table
            sweep["proposed_table_path"] = str(write_tuning_table(table, suite.out, suite.tag))
            suite.save()
            sweep["table_check"] = verify_table(table, log)
        except Exception:
            sweep["table_error"] = traceback.format_exc()
            log(sweep["table_error"])
        return sweep

    suite.section("variants", variants, skip_reason=reason("variants"))
    suite.section("training", lambda: bench_training(
        backends, log, table, compile_reference=suite.remaining() > 150,
        remaining=suite.remaining), skip_reason=reason("training"))
    suite.section("evaluation", lambda: bench_evaluation(
        backends, log, table, compile_reference=suite.remaining() > 110, remaining=suite.remaining,
        progress=lambda reports: suite.partial("evaluation", reports)),
        skip_reason=reason("evaluation"))
    market_reason = reason("market_eval")
    if market_reason is None and importlib.util.find_spec("tqdm") is None:
        market_reason = "tqdm is not installed (engine.matching imports it)"
    suite.section("market_eval", lambda: bench_market_eval(suite.out, log, suite.remaining() - 10),
                  skip_reason=market_reason)
    suite.section("transreid", lambda: bench_transreid_gpu(suite.out, log, min(150.0, suite.remaining() - 10)),
                  skip_reason=reason("transreid"))


if __name__ == "__main__":
    sys.exit(main())
