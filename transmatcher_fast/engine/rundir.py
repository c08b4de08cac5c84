"""An experiment folder (``--exp-dir``) owned by one training run at a time.

While a run lives it holds an exclusive ``flock`` on ``EXP_DIR/train.lock`` holding its pid, so
a second run on the same folder fails at once and names the holder; the operating system drops
the lock when the holder exits, however it exits. Every refusal is a :class:`RunDirError` whose
``str`` is one line.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Optional, Union

LOCK_NAME = "train.lock"

PathLike = Union[str, os.PathLike]


class RunDirError(RuntimeError):
    """An experiment folder cannot be used as asked; ``str(error)`` is a one-line message that
    names the folder and what to do."""


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``folder/train.lock``; the holder's pid and host are
    written into the file. The file is never deleted (deleting a lock file lets two processes
    lock two different files of the same name)."""

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
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # no stale pid once the run is over
        except OSError:
            pass
        os.close(fd)  # closing the only descriptor of the file drops the lock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()
