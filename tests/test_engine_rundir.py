"""The experiment folder of a training run: one run at a time holds its lock, and the lock names
its holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from transmatcher_fast.engine.rundir import LOCK_NAME, RunDirError, RunLock

# A process that takes the lock, says so, and sleeps until it is killed.
HOLDER = ("import sys, time; from transmatcher_fast.engine.rundir import RunLock; "
          "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)")


def test_lock_is_exclusive_names_the_holder_and_is_free_after_release(tmp_path):
    first = RunLock(tmp_path / "run").acquire()
    assert first.held and (tmp_path / "run" / LOCK_NAME).read_text().split()[0] == str(os.getpid())
    with pytest.raises(RunDirError, match=f"in use by another training run \\(pid {os.getpid()}") as info:
        RunLock(tmp_path / "run").acquire()
    assert "\n" not in str(info.value) and str(tmp_path / "run") in str(info.value)
    first.release()
    assert (tmp_path / "run" / LOCK_NAME).read_text() == ""  # no stale pid
    with RunLock(tmp_path / "run") as second:
        assert second.held
    assert not second.held
    assert RunLock(tmp_path / "other").acquire().held  # another folder, another lock


def test_lock_held_by_another_process_names_its_pid_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        with pytest.raises(RunDirError, match=f"pid {holder.pid}\\b"):
            RunLock(tmp_path).acquire()
        assert time.monotonic() - start < 1  # it does not wait for the lock
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert RunLock(tmp_path).acquire().held  # the OS dropped the killed holder's lock
    finally:
        holder.kill()
        holder.wait()
