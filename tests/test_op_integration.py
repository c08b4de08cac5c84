"""max_sim as a torch.library op: torch.compile, autocast, opcheck, determinism, backend choice,
the compiled extension, and the demo command."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import transmatcher_fast
from helpers import make_inputs, randn, rel_err
from transmatcher_fast import _extension, cli, max_sim, reference
from transmatcher_fast.ops import dispatch


def test_extension_is_built():
    if os.environ.get("TRANSMATCHER_FAST_SKIP_EXT") == "1":
        pytest.skip("built without the extension on purpose")
    assert _extension.has_cpu_kernels(), f"transmatcher_fast._C failed: {_extension.load_error}"
    assert dispatch.select(torch.device("cpu")).name == "cpu"


def transposed(t):
    """The same values in a non-contiguous layout (last two dims stored swapped)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("gate", [True, False])
def test_opcheck(backend, rng, gate, layout):
    """Schema, fake implementations (shapes and strides), autograd registration and AOT dispatch
    of both ops."""
    query, gallery, embed = make_inputs(rng, 2, 3, 5, 4, 6, gate=gate)
    if layout == "transposed":
        query, gallery = transposed(query), transposed(gallery)
        embed = None if embed is None else transposed(embed)
    inputs = [None if t is None else t.requires_grad_() for t in (query, gallery, embed)]
    torch.library.opcheck(torch.ops.transmatcher_fast.max_sim.default, tuple(inputs))
    outs = [t.detach() for t in torch.ops.transmatcher_fast.max_sim(*inputs)]
    grads = randn(outs[0].shape, rng), randn(outs[1].shape, rng)
    backward_args = (*grads, *[t if t is None else t.detach() for t in inputs], *outs,
                     True, True, gate, backend)
    torch.library.opcheck(torch.ops.transmatcher_fast.max_sim_backward.default, backward_args)


@pytest.mark.parametrize("layout", ["projected", "channels_first"])
def test_torch_compile_fullgraph(backend, rng, layout):
    query, gallery, embed = make_inputs(rng, 3, 4, 6, 5, 8, dtype=torch.float32)
    weight = randn((8, 8), rng, torch.float32)
    if layout == "channels_first":  # [N, D, L] storage, as a CNN hands features over
        query, gallery = query.transpose(1, 2).contiguous(), gallery.transpose(1, 2).contiguous()

    def loss_fn(q, g, e, w):
        if layout == "channels_first":
            q, g = q.transpose(1, 2), g.transpose(1, 2)  # non-contiguous views into the op
        else:
            q, g = q @ w, g @ w  # a projection in front, as in TransMatcher
        q_best, g_best = max_sim(q, g, e)
        return q_best.square().sum() + g_best.mean()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        leaves = [t.clone().requires_grad_() for t in (query, gallery, embed, weight)]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves if t.grad is not None])
    assert len(results[0]) == len(results[1]) >= 4
    for eager, comp in zip(*results):
        assert rel_err(comp, eager) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_casts_features_like_matmul(backend, rng, dtype):
    query, gallery, embed = make_inputs(rng, 2, 3, 5, 4, 8, dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in (query, gallery, embed)]
    with torch.autocast("cpu", dtype=dtype):
        q_best, g_best = max_sim(*leaves)
    assert q_best.dtype == g_best.dtype == torch.float32
    expected = max_sim(query.to(dtype), gallery.to(dtype), embed)
    assert torch.equal(q_best, expected[0]) and torch.equal(g_best, expected[1])
    (q_best.sum() + g_best.sum()).backward()
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.dtype == torch.float32


def test_autocast_leaves_float64_alone(rng):
    query, gallery, _ = make_inputs(rng, 2, 2, 3, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q_best, _ = max_sim(query, gallery)
    assert q_best.dtype == torch.float64
    assert torch.equal(q_best, max_sim(query, gallery)[0])


def test_cpu_backward_is_deterministic_and_thread_independent(rng):
    if "cpu" not in dispatch.available_backends("cpu"):
        pytest.skip("C++ extension not built")
    query, gallery, embed = make_inputs(rng, 37, 5, 12, 10, 16, dtype=torch.float32)
    grad_q, grad_g = randn((37, 5, 12), rng, torch.float32), randn((37, 5, 10), rng, torch.float32)
    threads = torch.get_num_threads()

    def run():
        leaves = [t.clone().requires_grad_() for t in (query, gallery, embed)]
        q_best, g_best = max_sim(*leaves)
        ((q_best * grad_q).sum() + (g_best * grad_g).sum()).backward()
        return [q_best, g_best] + [t.grad for t in leaves]

    try:
        with transmatcher_fast.use_backend("cpu"):
            first, second = run(), run()
            torch.set_num_threads(1)
            single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_set_backend_validates_and_restores():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        transmatcher_fast.set_backend("fast")
    with transmatcher_fast.use_backend("reference"):
        assert transmatcher_fast.get_backend() == "reference"
        assert dispatch.select(torch.device("cpu")).name == "reference"
    assert transmatcher_fast.get_backend() == "auto"


def test_forcing_a_backend_that_cannot_serve_the_device_is_an_error():
    query = torch.zeros(1, 2, 3)
    with transmatcher_fast.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu tensors"):
            max_sim(query, query)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)


def test_backward_runs_on_the_backend_that_ran_the_forward(rng, monkeypatch):
    if "cpu" not in dispatch.available_backends("cpu"):
        pytest.skip("C++ extension not built")
    calls = []
    cpu = dispatch.by_name("cpu")

    def counted_backward(*args):
        calls.append("cpu")
        return cpu.backward(*args)

    monkeypatch.setitem(dispatch._registry, "cpu", dataclasses.replace(cpu, backward=counted_backward))
    query, gallery, embed = make_inputs(rng, 2, 3, 4, 5, 6, dtype=torch.float32)
    query.requires_grad_()
    with transmatcher_fast.use_backend("cpu"):
        q_best, _ = max_sim(query, gallery, embed)
    with transmatcher_fast.use_backend("reference"):
        q_best.sum().backward()  # the saved indices are the C++ kernel's: so is the backward
    assert calls == ["cpu"] and query.grad is not None


def test_environment_variable_selects_the_backend():
    code = ("import torch, transmatcher_fast as t; from transmatcher_fast.ops import dispatch;"
            "print(t.get_backend(), dispatch.select(torch.device('cpu')).name)")
    assert _python(code, TRANSMATCHER_FAST_BACKEND="reference").stdout.split() == ["reference"] * 2
    typo = _python(code, TRANSMATCHER_FAST_BACKEND="refrence")
    assert typo.returncode == 0 and typo.stdout.split()[0] == "auto"
    assert "TRANSMATCHER_FAST_BACKEND ignored" in typo.stderr


def test_missing_extension_warns_and_falls_back_to_reference():
    code = (
        "import sys; sys.modules['transmatcher_fast._C'] = None\n"
        "import torch, transmatcher_fast as t\n"
        "q = torch.randn(2, 3, 4)\n"
        "a, b = t.max_sim(q, q)\n"
        "print(t.available_backends('cpu'), tuple(a.shape))"
    )
    result = _python(code, TRITON_INTERPRET="0")
    assert result.returncode == 0, result.stderr
    assert "compiled extension transmatcher_fast._C could not be loaded" in result.stderr
    assert "available backends: reference" in result.stderr
    assert result.stdout.strip() == "['reference'] (2, 2, 3)"


def test_reference_backend_bounds_memory_with_blocks(rng, monkeypatch):
    query, gallery, embed = make_inputs(rng, 4, 5, 6, 7, 3)
    expected = reference.max_sim(query, gallery, embed)
    blocks = []
    one_shot = reference.max_sim

    def counting(q, g, *args, **kwargs):
        blocks.append(q.shape[0] * g.shape[0] * q.shape[1] * g.shape[1])
        return one_shot(q, g, *args, **kwargs)

    monkeypatch.setattr(reference, "DEFAULT_MAX_ELEMENTS", 100)
    monkeypatch.setattr(reference, "max_sim", counting)
    with transmatcher_fast.use_backend("reference"):
        got = max_sim(query, gallery, embed)
    assert len(blocks) > 1 and max(blocks) <= 100
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(got, expected))


def test_demo_command_prints_the_comparison(capsys):
    assert cli.main(["op-demo", "--queries", "2", "--gallery", "3", "--locations", "20",
                     "--dim", "8", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "q_best (2, 3, 20)" in out and "fused max_sim" in out
    assert "argmax identical in 2/2 directions" in out


def test_demo_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        cli.main(["op-demo", "--queries", "0"])
