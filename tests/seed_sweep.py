"""Seed-drawn tests: the `rng` fixture and the seed sweep.

Every test that draws random inputs takes the `rng` fixture: a fresh seed per run (printed, and
replayed with TRANSMATCHER_FAST_TEST_SEED=<seed>), so CI keeps exploring inputs. A test that
fails for some seed fails correct code now and then, so `make test-seeds` runs only these tests
over many seeds (--seed-sweep N --seed-base S, parallel under pytest-xdist) and ends with a
summary: the counts, and for each failure the command that replays it.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

SEED_ENV = "TRANSMATCHER_FAST_TEST_SEED"


def pytest_addoption(parser):
    group = parser.getgroup("seed sweep")
    group.addoption("--seed-sweep", type=int, default=0, metavar="N",
                    help="run only the tests that draw a random seed (the `rng` fixture), each "
                         "with N seeds derived from --seed-base (make test-seeds)")
    group.addoption("--seed-base", type=int, default=None, metavar="S",
                    help="the sweep's seeds are derived from S; the same S gives the same seeds "
                         "(and the same test ids in every pytest-xdist worker)")


def sweep_seeds(count: int, base: int) -> list[int]:
    """``count`` distinct seeds in [1, 2**32), a function of ``base`` alone."""
    draw = torch.Generator().manual_seed(base)
    seeds: list[int] = []
    while len(seeds) < count:
        seed = int(torch.randint(1, 2**32, (), generator=draw, dtype=torch.int64))
        if seed not in seeds:
            seeds.append(seed)
    return seeds


def pytest_configure(config):
    if config.getoption("--seed-sweep") and config.getoption("--seed-base") is None:
        raise pytest.UsageError("--seed-sweep needs --seed-base (so every xdist worker draws the "
                                "same seeds); make test-seeds passes one")


def pytest_generate_tests(metafunc):
    count = metafunc.config.getoption("--seed-sweep")
    if count and "rng" in metafunc.fixturenames:
        seeds = sweep_seeds(count, metafunc.config.getoption("--seed-base"))
        metafunc.parametrize("rng", seeds, indirect=True, ids=[f"seed{s}" for s in seeds])


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--seed-sweep"):
        return
    drawn = [item for item in items if "rng" in getattr(item, "fixturenames", ())]
    config.hook.pytest_deselected(items=[item for item in items if item not in drawn])
    items[:] = drawn


_SWEPT_SEED = re.compile(r"(?<=[\[-])seed(\d+)(?=[-\]])")


def unswept(nodeid: str) -> tuple[str, int]:
    """A swept test's id without its seed part (the id pytest gives it outside a sweep), and
    the seed."""
    match = _SWEPT_SEED.search(nodeid)
    start, end = match.span()
    if nodeid[end] == "-":
        end += 1  # 'a-seed1-b' -> 'a-b', 'seed1-b' -> 'b'
    elif nodeid[start - 1] == "-":
        start -= 1  # 'a-seed1]' -> 'a]'
    else:
        start, end = start - 1, end + 1  # '[seed1]' -> ''
    return nodeid[:start] + nodeid[end:], int(match.group(1))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not config.getoption("--seed-sweep"):
        return
    reports = [r for key in ("passed", "failed", "error") for r in terminalreporter.stats.get(key, [])
               if getattr(r, "nodeid", "") and _SWEPT_SEED.search(r.nodeid)]
    failed = {r.nodeid for r in reports if r.failed}
    runs = {r.nodeid for r in reports}
    tests = {unswept(nodeid)[0] for nodeid in runs}
    terminalreporter.section("seed sweep")
    terminalreporter.write_line(
        f"{config.getoption('--seed-sweep')} seeds (base {config.getoption('--seed-base')}) x "
        f"{len(tests)} seed-drawn tests: {len(runs)} runs, {len(failed)} failed")
    for nodeid in sorted(failed):
        test, seed = unswept(nodeid)
        terminalreporter.write_line(f"FAILED {nodeid}")
        terminalreporter.write_line(f"  replay: {SEED_ENV}={seed} python -m pytest '{test}'")


@pytest.fixture
def rng(request):
    """A generator with a fresh seed per test; the seed is printed so a failure can be replayed
    with TRANSMATCHER_FAST_TEST_SEED=<seed>. Under --seed-sweep the seed is the parameter."""
    seed = (getattr(request, "param", None) or int(os.environ.get(SEED_ENV, 0))
            or int.from_bytes(os.urandom(4), "little"))
    print(f"seed={seed} ({SEED_ENV}={seed} replays it)")
    return torch.Generator().manual_seed(seed)
