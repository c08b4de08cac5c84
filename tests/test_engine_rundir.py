"""The experiment folder of a training run: one run at a time holds its lock, and the lock names
its holder; a fresh start never replaces a run unless told to, and --overwrite removes only the
trainer's own files; --resume without a checkpoint starts only where no run is; stale
temporaries are removed by the lock's holder only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from transmatcher_fast.engine import checkpoint
from transmatcher_fast.engine import rundir
from transmatcher_fast.engine.rundir import LOCK_NAME, RunDirError, RunLock, open_run, run_files, temporaries

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
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # nothing left behind
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


# Takes the lock, forks a child (as a DataLoader worker is forked) that outlives it, and sleeps.
FORKING_HOLDER = ("import os, sys, time; from transmatcher_fast.engine.rundir import RunLock; "
                  "lock = RunLock(sys.argv[1]).acquire(); child = os.fork()\n"
                  "if child == 0: time.sleep(600); os._exit(0)\n"
                  "print(child, flush=True); time.sleep(600)")


def test_a_forked_child_does_not_keep_a_killed_holders_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", FORKING_HOLDER, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(holder.stdout.readline())
        with pytest.raises(RunDirError, match=f"pid {holder.pid}\\b"):
            RunLock(tmp_path).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the child still lives
        assert RunLock(tmp_path).acquire().held
    finally:
        holder.kill()
        holder.wait()
        if child:
            os.kill(child, signal.SIGKILL)


def _old_run(folder):
    """A folder holding a finished run's files and a user's files next to them."""
    (folder / "tensorboard" / "mine").mkdir(parents=True)
    for name in ("checkpoint.pt", "log.jsonl", "tensorboard/events.out.tfevents.1.host.2.0"):
        (folder / name).write_text("old run")
    for name in ("notes.txt", "tensorboard/mine/events.out.tfevents.3", "tensorboard/README"):
        (folder / name).write_text("not the trainer's")
    return folder


def test_a_fresh_start_refuses_a_folder_that_holds_a_run(tmp_path):
    run = open_run(tmp_path / "new")  # a missing or empty folder is fine
    assert run.mode == "fresh" and run.lock.held and run.prepare() == []
    run.release()
    _old_run(tmp_path)
    def contents():  # the lock file is the only one a refusal may create
        return {p: p.read_text() for p in tmp_path.rglob("*") if p.is_file() and p.name != LOCK_NAME}
    before = contents()
    with pytest.raises(RunDirError) as info:
        open_run(tmp_path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{tmp_path} already holds a training run")
    assert "checkpoint.pt, log.jsonl, tensorboard/" in message
    for choice in ("--resume", "--overwrite", "another --exp-dir"):
        assert choice in message
    assert contents() == before
    assert open_run(tmp_path, resume=True).mode == "resume"  # the refusal released the lock
    with pytest.raises(RunDirError, match="give one of them"):
        open_run(tmp_path, resume=True, overwrite=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match="not a folder"):
        open_run(tmp_path / "file")


def test_a_lock_on_a_file_its_holder_deleted_is_not_kept(tmp_path, monkeypatch):
    """A process that opened train.lock just before its holder deleted it must not keep a lock
    on the deleted file (a third process could lock the new one): acquire opens it again."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("")
    stale = os.open(folder / LOCK_NAME, os.O_RDWR)
    os.unlink(folder / LOCK_NAME)  # the previous holder's release, after our open
    opens, real_open = [], os.open

    def open_stale_first(path, *args):
        opens.append(path)
        return stale if len(opens) == 1 else real_open(path, *args)
    monkeypatch.setattr(rundir.os, "open", open_stale_first)
    lock = RunLock(folder).acquire()
    assert len(opens) == 2 and lock.held
    assert os.path.samestat(os.fstat(lock._fd), os.stat(folder / LOCK_NAME))
    with pytest.raises(RunDirError, match="in use"):
        RunLock(folder).acquire()  # the file at the path is the locked one
    lock.release()
    assert not (folder / LOCK_NAME).exists()


def test_overwrite_removes_only_the_trainers_files(tmp_path):
    _old_run(tmp_path)
    run = open_run(tmp_path, overwrite=True)
    assert len(run_files(tmp_path)) == 3  # nothing is removed before prepare()
    assert sorted(p.name for p in run.prepare()) == ["checkpoint.pt", "events.out.tfevents.1.host.2.0",
                                                     "log.jsonl"]
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted([LOCK_NAME, "notes.txt", "tensorboard/README", "tensorboard/mine/events.out.tfevents.3"])
    run.release()
    with pytest.raises(RuntimeError, match="not locked"):
        run.prepare()  # removing files needs the lock


def test_resume_without_a_checkpoint_starts_only_where_no_run_is(tmp_path):
    run = open_run(tmp_path / "empty", resume=True)
    assert run.mode == "resume"
    run.release()
    (tmp_path / "log.jsonl").write_text('{"kind": "step", "epoch": 0, "step": 1}\n')
    with pytest.raises(RunDirError) as info:
        open_run(tmp_path, resume=True)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{tmp_path} has no checkpoint.pt to resume from")
    assert "log.jsonl" in message and "--overwrite" in message and "another --exp-dir" in message
    assert (tmp_path / "log.jsonl").read_text() == '{"kind": "step", "epoch": 0, "step": 1}\n'


def test_stale_temporaries_are_removed_by_the_lock_holder_only(tmp_path):
    stale = [tmp_path / ".checkpoint.pt.k1ll3d.tmp", tmp_path / ".log.jsonl.tmp", tmp_path / "log.tmp"]
    others = [tmp_path / "sub" / ".checkpoint.pt.k1ll3d.tmp", tmp_path / ".other.pt.x.tmp",
              tmp_path / ".checkpoint.pt.x.tmp.keep", tmp_path / "checkpoint.pt.x.tmp"]
    (tmp_path / "sub").mkdir()
    for path in stale + others:
        path.write_text("")
    assert sorted(temporaries(tmp_path)) == sorted(stale)
    assert checkpoint.temporaries(tmp_path / "checkpoint.pt") == stale[:1]
    holder = open_run(tmp_path)  # holds the lock, has not cleaned yet
    with pytest.raises(RunDirError, match="in use"):
        open_run(tmp_path, resume=True).prepare()
    assert all(path.exists() for path in stale)  # the second start touched nothing
    assert sorted(holder.prepare()) == sorted(stale)
    assert not any(path.exists() for path in stale) and all(path.exists() for path in others)
    holder.release()
