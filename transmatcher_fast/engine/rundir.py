"""An experiment folder (``--exp-dir``) owned by one training run at a time.

A run's files are ``checkpoint.pt``, ``best.pt``, ``config.yaml``, ``log.jsonl`` and
``tensorboard/events.out.tfevents.*``; its temporaries are ``.checkpoint.pt.*.tmp`` and
``.best.pt.*.tmp`` (an atomic save that was killed), ``.log.jsonl.tmp`` (a log rewrite that was
killed) and ``.config.yaml.tmp``. :func:`open_run` decides, before anything is written, what a
start does with them:

- a fresh start (neither ``resume`` nor ``overwrite``) needs a folder without a run: it refuses
  to replace one;
- ``overwrite`` removes the old run's files (those above, nothing else) and starts fresh;
- ``resume`` continues from ``checkpoint.pt``; without one it starts fresh only if the folder
  holds no run files either but perhaps ``config.yaml`` (so a new log never follows an old run's
  records), and refuses otherwise.

While a run lives it holds an exclusive ``flock`` on ``EXP_DIR/train.lock`` holding its pid, so
a second run on the same folder fails at once and names the holder; the operating system drops
the lock when the holder exits, however it exits. A run that ends deletes the file; one that was
killed leaves it behind, empty or with its dead pid and unlocked, and the next run takes it. Stale temporaries are removed at start-up, by
the holder of the lock only (a save in progress has one too). Every refusal is a
:class:`RunDirError` whose ``str`` is one line.
"""

from __future__ import annotations

import os
import socket
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

from . import checkpoint

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
CONFIG_NAME = "config.yaml"
LOG_NAME = "log.jsonl"
TENSORBOARD_NAME = "tensorboard"
LOCK_NAME = "train.lock"
TENSORBOARD_PATTERN = "events.out.tfevents.*"
# Written by older versions when the log was rewritten on resume.
_LEGACY_LOG_TMP = "log.tmp"

PathLike = Union[str, os.PathLike]


class RunDirError(RuntimeError):
    """An experiment folder cannot be used as asked; ``str(error)`` is a one-line message that
    names the folder and what to do."""


def log_temporary(folder: PathLike) -> Path:
    """The temporary file a rewrite of ``log.jsonl`` goes through (``hooks.LogHook.truncate``)."""
    return Path(folder) / f".{LOG_NAME}.tmp"


def config_temporary(folder: PathLike) -> Path:
    """The temporary file ``config.yaml`` is written through."""
    return Path(folder) / f".{CONFIG_NAME}.tmp"


def run_files(folder: PathLike) -> List[Path]:
    """The files of a training run in ``folder``: checkpoints (latest and best), configuration,
    log and TensorBoard event files."""
    folder = Path(folder)
    found = [folder / name for name in (CHECKPOINT_NAME, BEST_NAME, CONFIG_NAME, LOG_NAME)
             if (folder / name).is_file()]
    tensorboard = folder / TENSORBOARD_NAME
    if tensorboard.is_dir():
        found += sorted(p for p in tensorboard.glob(TENSORBOARD_PATTERN) if p.is_file())
    return found


def temporaries(folder: PathLike) -> List[Path]:
    """The temporaries a killed trainer may leave in ``folder`` (not in its sub-folders)."""
    folder = Path(folder)
    found = checkpoint.temporaries(folder / CHECKPOINT_NAME) + checkpoint.temporaries(folder / BEST_NAME)
    found += [p for p in (log_temporary(folder), config_temporary(folder), folder / _LEGACY_LOG_TMP)
              if p.is_file()]
    return found


def _describe(folder: Path, files: List[Path]) -> str:
    names = []
    for path in files:
        name = path.relative_to(folder).parent.as_posix() + "/" if path.parent != folder else path.name
        if name not in names:
            names.append(name)
    return ", ".join(names)


# The locks this process holds. A forked child (a DataLoader worker) closes its copies at once:
# a lock belongs to its open file, so a copy in a child that outlives a killed parent would
# keep the folder locked.
_HELD: "weakref.WeakSet[RunLock]" = weakref.WeakSet()


def _forget_locks_in_child() -> None:
    for lock in list(_HELD):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            try:
                os.close(fd)  # the child's copy only: the parent's lock stays
            except OSError:
                pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``folder/train.lock``; the holder's pid and host are
    written into the file, and the holder deletes it on release. Forked children do not inherit
    the lock.

    Deleting a lock file is safe only with a check on the other side: a process that opened the
    file just before the holder deleted it would lock the deleted file while a third one locks
    a new file of the same name. So the holder deletes the file while it still holds the lock,
    and :meth:`acquire` keeps a lock only when the locked file is still the one at the path
    (same inode), and else tries again."""

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> str:
        """What the lock file says about its holder, e.g. ``pid 1234 on host1``."""
        for attempt in range(20):  # the holder writes its pid right after it locks
            try:
                text = self.path.read_text().split()
            except OSError:
                text = []
            if text:
                pid = text[0]
                host = text[1] if len(text) > 1 else None
                return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")
            time.sleep(0.01)
        return "a process that has not written its pid yet"

    def acquire(self) -> "RunLock":
        if self.held:
            return self
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            import warnings
            warnings.warn(f"cannot lock {self.folder} on this platform: nothing stops a second run "
                          "from using it")
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):
                os.close(fd)
                raise RunDirError(f"{self.folder} is in use by another training run ({self.holder()}, "
                                  f"lock {self.path}): wait for it to end, stop it, or choose another "
                                  f"--exp-dir") from None
            except BaseException:
                os.close(fd)
                raise
            if self._still_at_path(fd):
                break
            os.close(fd)  # the previous holder deleted it after we opened it: open the new one
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _HELD.add(self)
        return self

    def _still_at_path(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.discard(self)
        try:
            os.ftruncate(fd, 0)  # no stale pid, should the file outlive the run
            if self._still_at_path(fd):
                os.unlink(self.path)  # still locked: see the class docstring
        except OSError:
            pass
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_UN)  # also if a copy of the descriptor is still open
        except (ImportError, OSError):
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:  # at interpreter shutdown
            pass


@dataclass
class RunDir:
    """The outcome of :func:`open_run`: the locked folder and what the start does with it."""
    folder: Path
    lock: RunLock
    mode: str  # "fresh", "overwrite" or "resume"

    def prepare(self) -> List[Path]:
        """Under the lock: removes stale temporaries and, for ``overwrite``, the old run's files;
        returns what it removed."""
        if not self.lock.held:
            raise RuntimeError(f"{self.folder} is not locked: open it again with open_run")
        removed = temporaries(self.folder)
        if self.mode == "overwrite":
            removed += run_files(self.folder)
        for path in removed:
            path.unlink(missing_ok=True)
        tensorboard = self.folder / TENSORBOARD_NAME
        if self.mode == "overwrite" and tensorboard.is_dir() and not any(tensorboard.iterdir()):
            tensorboard.rmdir()
        return removed

    def release(self) -> None:
        self.lock.release()


def open_run(folder: PathLike, *, resume: bool = False, overwrite: bool = False) -> RunDir:
    """Locks ``folder`` (creating it) and checks that a start with these options may use it;
    raises :class:`RunDirError` (and holds no lock) if not. Nothing is removed yet: see
    :meth:`RunDir.prepare`."""
    if resume and overwrite:
        raise RunDirError("--resume continues the run in the folder and --overwrite replaces it: "
                          "give one of them")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"--exp-dir {folder} is not a folder")
    lock = RunLock(folder).acquire()
    try:
        existing = run_files(folder)
        if overwrite:
            mode = "overwrite"
        elif resume:
            mode = "resume"
            # config.yaml alone: killed between writing it and the first record (the first
            # epoch's planning can take minutes); that start is repeated, config.yaml rewritten.
            if not (folder / CHECKPOINT_NAME).is_file() and [p for p in existing
                                                           if p.name != CONFIG_NAME]:
                raise RunDirError(
                    f"{folder} has no {CHECKPOINT_NAME} to resume from but holds another run's files "
                    f"({_describe(folder, existing)}; killed before its first checkpoint?): pass "
                    f"--overwrite to start afresh there, or choose another --exp-dir")
        else:
            mode = "fresh"
            if existing:
                raise RunDirError(
                    f"{folder} already holds a training run ({_describe(folder, existing)}): pass "
                    f"--resume to continue it, --overwrite to replace it, or choose another --exp-dir")
    except BaseException:
        lock.release()
        raise
    return RunDir(folder, lock, mode)
