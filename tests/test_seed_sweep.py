"""The seed sweep (tests/seed_sweep.py, `make test-seeds`): it runs exactly the seed-drawn tests
over the derived seeds, counts them, and every replay command it prints reruns that failure."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from seed_sweep import sweep_seeds, unswept

TESTS = Path(__file__).resolve().parent

# Fails for about half the seeds; which ones is known from the seed alone.
SAMPLE = '''
import pytest
import torch

def test_drawn(rng):
    assert torch.rand((), generator=rng).item() < 0.5

@pytest.mark.parametrize("size", [1, 2])
def test_drawn_parametrized(size, rng):
    assert torch.rand((), generator=rng).item() < 0.5

def test_not_drawn():
    pass
'''


def fails(seed: int) -> bool:
    return torch.rand((), generator=torch.Generator().manual_seed(seed)).item() >= 0.5


def run_pytest(folder: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "TRANSMATCHER_FAST_TEST_SEED"}
    env = {**base, "PYTHONPATH": str(TESTS), **(env or {})}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def sample_suite(tmp_path: Path) -> Path:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["seed_sweep"]\n')
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    return tmp_path


def test_sweep_seeds_are_distinct_and_a_function_of_the_base():
    seeds = sweep_seeds(200, 12345)
    assert len(set(seeds)) == 200 and all(1 <= s < 2**32 for s in seeds)
    assert seeds == sweep_seeds(200, 12345) and seeds != sweep_seeds(200, 12346)
    assert sweep_seeds(10, 12345) == seeds[:10]


def test_unswept_gives_the_id_outside_a_sweep():
    assert unswept("t.py::f[seed12]") == ("t.py::f", 12)
    assert unswept("t.py::f[seed12-b]") == ("t.py::f[b]", 12)
    assert unswept("t.py::f[a-seed12]") == ("t.py::f[a]", 12)
    assert unswept("t.py::f[a-seed12-b]") == ("t.py::f[a-b]", 12)
    assert unswept("t.py::f[seedling-seed12]") == ("t.py::f[seedling]", 12)


def test_sweep_runs_only_drawn_tests_and_prints_replays_that_fail(tmp_path):
    folder = sample_suite(tmp_path)
    count, base = 6, 2024
    seeds = sweep_seeds(count, base)
    expected_failures = 3 * sum(fails(s) for s in seeds)  # three drawn tests per seed
    assert 0 < expected_failures < 3 * count  # the base is chosen so both outcomes occur

    result = run_pytest(folder, "--seed-sweep", str(count), "--seed-base", str(base))
    out = result.stdout
    assert result.returncode == 1, out
    assert (f"{count} seeds (base {base}) x 3 seed-drawn tests: {3 * count} runs, "
            f"{expected_failures} failed") in out
    assert "1 deselected" in out  # test_not_drawn
    replays = re.findall(r"replay: (.+)", out)
    assert len(replays) == expected_failures
    # Each replay command reruns one failing test with its seed, outside the sweep, and fails.
    for line in replays[:2]:
        setting, *command = shlex.split(line)
        name, seed = setting.split("=")
        assert fails(int(seed))
        again = run_pytest(folder, *command[3:], env={name: seed})
        assert again.returncode == 1 and "1 failed" in again.stdout, again.stdout


def test_sweep_needs_a_base_and_plain_runs_draw_one_seed(tmp_path):
    folder = sample_suite(tmp_path)
    refused = run_pytest(folder, "--seed-sweep", "3")
    assert refused.returncode != 0 and "--seed-base" in refused.stderr + refused.stdout
    # Outside a sweep every test runs once; a given seed replays.
    passing = next(s for s in range(1, 100) if not fails(s))
    plain = run_pytest(folder, env={"TRANSMATCHER_FAST_TEST_SEED": str(passing)})
    assert plain.returncode == 0 and "4 passed" in plain.stdout, plain.stdout
