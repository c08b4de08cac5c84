"""GPU suite, build: the extension built in place (``python setup.py build_ext --inplace``,
CUDA for sm_90a only) and the package imported from the source tree through ``PYTHONPATH``;
nothing is installed into the machine's environment.

If the build fails (or times out) it runs again with ``TRANSMATCHER_FAST_SKIP_EXT=1`` and the
suite goes on without the extension, so the Triton measurements still run; the JSON's ``build``
(``with_extension``, ``fallback``) and ``import`` (``extension_loaded``) say which happened.
The building process never imports the package: the measurements run in a fresh interpreter,
which loads the extension that was just built.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import gpu_suite_common as common
from gpu_suite_common import REPO

KERNELS_LINK = REPO / "transmatcher_fast" / "kernels"  # setup.py maps kernels/ here when installed


def default_build_cmd() -> list:
    return [sys.executable, "setup.py", "build_ext", "--inplace"]


def extension_path() -> Path:
    """Where an in-place build puts ``transmatcher_fast._C`` for this interpreter."""
    return REPO / "transmatcher_fast" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))


def child_env(extra: dict | None = None) -> dict:
    """The environment of every process after the build: the source tree first on the path."""
    env = {**os.environ, **(extra or {})}
    path = env.get("PYTHONPATH", "")
    if str(REPO) not in path.split(os.pathsep):
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + path if path else "")
    return env


def build_extension(log, cmd=None, timeout: float = 300.0, fallback_timeout: float = 120.0,
                    env=None) -> dict:
    """Builds the extension in place; on failure again without it (TRANSMATCHER_FAST_SKIP_EXT=1).
    With the default command a stale in-place extension is removed first, so what the
    measurements load is what this build made (or nothing)."""
    env = {**os.environ, **(env or {})}
    env.setdefault("TRANSMATCHER_FAST_CUDA_ARCH", "90a")  # H100/H200 only: half the compile time
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    # The interpreter's own bin first: torch's BuildExtension runs `ninja` from PATH (else a slow
    # sequential build), and the ninja package installs it beside python.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    default = cmd is None
    cmd = cmd or default_build_cmd()
    record = {"cmd": cmd if isinstance(cmd, str) else " ".join(map(str, cmd)), "in_place": default,
              "arch": env["TRANSMATCHER_FAST_CUDA_ARCH"], "max_jobs": env["MAX_JOBS"],
              "ninja": shutil.which("ninja", path=env["PATH"]),
              "nvcc": shutil.which("nvcc", path=env["PATH"]), "attempts": []}
    if default and extension_path().exists():
        extension_path().unlink()
        record["removed_stale_extension"] = str(extension_path())
    start = time.time()
    first = common.run(cmd, timeout, log, env={**env, "TRANSMATCHER_FAST_SKIP_EXT": "0"})
    record["attempts"].append({"skip_ext": False, **first})
    if first["returncode"] == 0 and (not default or extension_path().exists()):
        record.update(ok=True, with_extension=True, fallback=False)
    else:
        log("build with the extension failed: going on without it (TRANSMATCHER_FAST_SKIP_EXT=1)"
            " so that the Triton measurements still run")
        second = common.run(cmd, fallback_timeout, log, env={**env, "TRANSMATCHER_FAST_SKIP_EXT": "1"})
        record["attempts"].append({"skip_ext": True, **second})
        record.update(ok=second["returncode"] == 0, with_extension=False, fallback=True)
    record["seconds"] = round(time.time() - start, 1)
    return record


def link_kernels(log) -> bool:
    """``transmatcher_fast/kernels`` -> ``../kernels`` (what setup.py's package_dir does for an
    install), so that every process importing from the source tree finds the Triton kernels.
    True when this call made the link (the suite removes it at the end)."""
    if KERNELS_LINK.exists() or KERNELS_LINK.is_symlink():
        return False
    try:
        KERNELS_LINK.symlink_to(Path("..") / "kernels", target_is_directory=True)
    except OSError as error:
        log(f"could not link transmatcher_fast/kernels: {error}")
        return False
    return True


def unlink_kernels(made: bool) -> None:
    if made and KERNELS_LINK.is_symlink():
        KERNELS_LINK.unlink()


def import_package(log=print) -> dict:
    """Imports transmatcher_fast (the source tree, where PYTHONPATH puts it first; else an
    installed copy) and makes ``transmatcher_fast.kernels`` importable from ``kernels/``."""
    info = {}
    try:
        import transmatcher_fast  # noqa: F401
    except ImportError as error:
        info["first_import_error"] = repr(error)
        for name in [m for m in sys.modules if m == "transmatcher_fast" or m.startswith("transmatcher_fast.")]:
            del sys.modules[name]
        sys.path.insert(0, str(REPO))
        log(f"transmatcher_fast imported from the source tree ({error})")
    import transmatcher_fast

    try:
        importlib.import_module("transmatcher_fast.kernels")
    except ImportError:
        if str(REPO) not in sys.path:
            sys.path.append(str(REPO))
        kernels = importlib.import_module("kernels")
        sys.modules["transmatcher_fast.kernels"] = kernels
        transmatcher_fast.kernels = kernels
        info["kernels"] = "aliased from the source tree's kernels/"
    info["file"] = transmatcher_fast.__file__
    in_tree = Path(transmatcher_fast.__file__).resolve().is_relative_to(REPO)
    info["mode"] = "in-place" if in_tree else "installed"
    extension = getattr(transmatcher_fast, "_extension", None)
    info["extension_loaded"] = bool(extension is not None and extension.extension is not None)
    info["extension_error"] = getattr(extension, "load_error", "") or None
    return info
