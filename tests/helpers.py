"""Shared test helpers: random inputs, error measures and the float64 ground truth."""

from __future__ import annotations

import re

import torch

from transmatcher_fast import reference


def randn(shape, rng, dtype=torch.float64, scale=1.0):
    return (scale * torch.randn(shape, generator=rng, dtype=torch.float64)).to(dtype)


def make_inputs(rng, nq, ng, lq, lg, d, *, gate=True, dtype=torch.float64):
    query = randn((nq, lq, d), rng, dtype)
    gallery = randn((ng, lg, d), rng, dtype)
    # The gate is a float32 parameter next to low-precision features, float64 in float64 runs.
    embed_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    score_embed = randn((lg, lq), rng, embed_dtype) if gate else None
    return query, gallery, score_embed


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual - expected).abs().max() / scale).item()


def as64(*tensors):
    return tuple(None if t is None else t.detach().double() for t in tensors)


def grads_by_autograd(fn, query, gallery, score_embed, grad_q, grad_g):
    """d(sum(q_best*grad_q) + sum(g_best*grad_g)) w.r.t. the three inputs, by autograd."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (query, gallery, score_embed)]
    q_best, g_best = fn(*leaves)[:2]
    ((q_best * grad_q).sum() + (g_best * grad_g).sum()).backward()
    return tuple(None if t is None else t.grad for t in leaves)


def values_at(scores, index, dim):
    return scores.gather(dim, index.long().unsqueeze(dim)).squeeze(dim)


def scores64(query, gallery, score_embed):
    """The materialised float64 scores S[i, j, s, t]."""
    q, g, e = as64(query, gallery, score_embed)
    s = torch.einsum("itd,jsd->ijst", q, g)
    return s if e is None else s * torch.sigmoid(e)


def expected_grads(query, gallery, score_embed, grad_q, grad_g, q_index, g_index):
    """Float64 gradients routed through the given argmax (the fused backward's formula)."""
    q, g, e = as64(query, gallery, score_embed)
    return reference.max_sim_grads(grad_q.double(), grad_g.double(), q, g, e, q_index, g_index)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two(script, *args, env, timeout: float = 300):
    """``script args`` on two local processes under torchrun (on a free port); the
    ``subprocess.CompletedProcess`` with its output captured as text."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def fit_interrupted_in_epoch(trainer, epoch: int) -> None:
    """``trainer.fit()`` stopped by a KeyboardInterrupt (as Ctrl-C) when epoch ``epoch`` starts,
    so the checkpoint holds the epochs before it."""
    import pytest

    train_epoch = trainer.train_epoch

    def stop(e):
        if e == epoch:
            raise KeyboardInterrupt
        return train_epoch(e)

    trainer.train_epoch = stop
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()


def one_line_error(argv) -> str:
    """The message ``transmatcher_fast.cli.main(argv)`` exits with (status 1, not a traceback),
    checked to be one line that is not the CLI's 'unexpected error' summary."""
    import pytest

    from transmatcher_fast import cli

    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in argv])
    message = info.value.code
    assert isinstance(message, str), f"exit status {message!r}, expected a message (status 1)"
    assert len(message.strip().splitlines()) == 1, message
    assert not re.search(r": unexpected \w+: ", message) and "Caught" not in message, message
    return message
