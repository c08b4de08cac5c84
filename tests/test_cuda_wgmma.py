"""The CUDA extension's wgmma forward (query_group = -1, csrc/cuda/max_sim_forward_wgmma.cu) against
the float64 reference, on an sm_90 GPU only (skipped elsewhere; tests/test_cuda_build.py checks
what it compiles to without a GPU). Covers the three tile widths (Lg <= 64, 128, 192), query
images longer than one 192-row pass, D not a multiple of the 32-feature stage, with and without
the gate, exact ties (lowest location wins) and NaN (propagates, lowest NaN location wins).
The kernel takes D % 128 == 0 (other D run the mma.sync kernel: checked here too), and its
padding rows and columns repeat location 0 (exact ties prove they never win an index).
"""

import pytest
import torch

from transmatcher_fast import reference

WGMMA = -1  # ForwardArgs::query_group value of the wgmma kernel (kForwardWgmma)


def _op():
    return getattr(getattr(torch.ops, "transmatcher_fast_C", None), "max_sim_forward", None)


pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
    reason="needs an sm_90 GPU (H100/H200)")


def _run(q, g, e, query_group=WGMMA):
    op = _op()
    if op is None:
        pytest.skip("transmatcher_fast._C has no CUDA forward")
    nq, lq, _ = q.shape
    ng, lg, _ = g.shape
    outs = [torch.full((nq, ng, lq), float("nan"), device=q.device),
            torch.full((nq, ng, lg), float("nan"), device=q.device),
            torch.full((nq, ng, lq), -1, device=q.device, dtype=torch.int32),
            torch.full((nq, ng, lg), -1, device=q.device, dtype=torch.int32)]
    op(q, g, e, *outs, False, query_group)
    torch.cuda.synchronize()
    return outs


def _check(q, g, e, outs):
    """Maxima at the scale of the scores; each argmax selects a maximum (within rounding)."""
    q64, g64 = q.double().cpu(), g.double().cpu()
    e64 = None if e is None else e.double().cpu()
    rq, rg = reference.max_sim(q64, g64, e64)
    scores = torch.einsum("itd,jsd->ijst", q64, g64)
    if e64 is not None:
        scores = scores * torch.sigmoid(e64)
    scale = scores.abs().max().item()
    tol = 1e-5 * q.shape[-1] ** 0.5 * scale  # fp32 accumulation of exact 16-bit products
    q_best, g_best, q_index, g_index = [t.cpu() for t in outs]
    assert (q_index >= 0).all() and (g_index >= 0).all(), "unwritten index"
    assert (q_best.double() - rq).abs().max().item() <= tol
    assert (g_best.double() - rg).abs().max().item() <= tol
    at_q = scores.gather(2, q_index.long().unsqueeze(2)).squeeze(2)
    at_g = scores.gather(3, g_index.long().unsqueeze(3)).squeeze(3)
    assert (at_q >= rq - 2 * tol).all() and (at_g >= rg - 2 * tol).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [
    (3, 5, 192, 192, 512),   # TransMatcher's maps: one pass, N = 192
    (2, 3, 200, 150, 128),   # two passes (Lq > 192), N = 192 with padding columns
    (4, 3, 50, 60, 256),     # N = 64, three warpgroups of which two idle
    (2, 2, 7, 100, 384),     # N = 128
    (2, 2, 7, 100, 40),      # D not a multiple of 128: the mma.sync kernel
])
@pytest.mark.parametrize("gated", [True, False])
def test_wgmma_matches_reference(dtype, shape, gated):
    nq, ng, lq, lg, d = shape
    gen = torch.Generator(device="cuda").manual_seed(hash((shape, gated)) % 2**31)
    q = torch.randn(nq, lq, d, device="cuda", generator=gen).to(dtype)
    g = torch.randn(ng, lg, d, device="cuda", generator=gen).to(dtype)
    e = torch.randn(lg, lq, device="cuda", generator=gen) if gated else None
    _check(q, g, e, _run(q, g, e))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lq, lg", [(192, 192), (200, 150)], ids=["one-pass", "padding"])
def test_wgmma_ties_and_nan(dtype, lq, lg):
    """Small integer features: every product and sum is exact in fp32 and float64, so the scores
    are equal to the reference's bit for bit, ties are plentiful and exact, and the indices must
    be the reference's (the lowest location among equal maxima). A NaN query row gives NaN
    maxima, at location 0 along its row and at its own location down every column."""
    nq, ng, d = 2, 3, 128
    gen = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randint(-2, 3, (nq, lq, d), device="cuda", generator=gen).to(dtype)
    g = torch.randint(-2, 3, (ng, lg, d), device="cuda", generator=gen).to(dtype)
    g[:, 100:] = g[:, 37:37 + lg - 100]  # repeated gallery locations: ties across far columns
    q[1, 77] = float("nan")
    q_best, g_best, q_index, g_index = [t.cpu() for t in _run(q, g, None)]
    r = reference.max_sim(q.double().cpu(), g.double().cpu(), None, return_indices=True)
    assert torch.equal(q_index, r[2]) and torch.equal(g_index, r[3])
    assert torch.equal(q_best.double().nan_to_num(7e7), r[0].nan_to_num(7e7))
    assert torch.equal(g_best.double().nan_to_num(7e7), r[1].nan_to_num(7e7))
    assert torch.isnan(q_best[1, :, 77]).all() and (q_index[1, :, 77] == 0).all()
    assert torch.isnan(g_best[1]).all() and (g_index[1] == 77).all()
    assert not torch.isnan(g_best[0]).any()


@pytest.mark.parametrize("lq, lg", [(200, 60), (50, 150)])
@pytest.mark.parametrize("side", ["query", "gallery"])
def test_padding_never_wins_an_index(lq, lg, side):
    """The kernel does not mask its padding rows (Lq past a 192-row pass) and columns (Lg below
    N): they repeat location 0, gate included, and must score exactly as location 0 does, at a
    higher index, whatever their position in the wgmma tile. Random gated scores with location
    0 of one side made the strict maximum of every row (or column): the index must be 0."""
    gen = torch.Generator(device="cuda").manual_seed(lq * 1000 + lg)
    common = torch.full((128,), 0.5, device="cuda")  # shared by the other side's locations
    q = torch.randn(2, lq, 128, device="cuda", generator=gen) * 0.1
    g = torch.randn(3, lg, 128, device="cuda", generator=gen) * 0.1
    e = torch.randn(lg, lq, device="cuda", generator=gen)
    if side == "query":  # query location 0 scores ~127 against every gallery location, others ~1
        g += common
        q[:, 0] = 4 * common
        e[:, 0] = 6.0
    else:  # gallery location 0 against every query location
        q += common
        g[:, 0] = 4 * common
        e[0, :] = 6.0
    q_best, g_best, q_index, g_index = [t.cpu() for t in _run(q.bfloat16(), g.bfloat16(), e)]
    index = g_index if side == "query" else q_index
    assert (index == 0).all(), index.unique()


def test_wgmma_agrees_with_mma_sync():
    """Both CUDA kernels on one input: the same maxima (at the scale of the scores)."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(4, 192, 512, device="cuda", generator=gen).bfloat16()
    g = torch.randn(6, 192, 512, device="cuda", generator=gen).bfloat16()
    e = torch.randn(192, 192, device="cuda", generator=gen)
    a = _run(q, g, e, WGMMA)
    b = _run(q, g, e, 0)
    scale = max(a[0].abs().max().item(), 1e-30)
    assert (a[0] - b[0]).abs().max().item() <= 1e-4 * scale
    assert (a[1] - b[1]).abs().max().item() <= 1e-4 * scale


@pytest.mark.parametrize("query_group", [0, WGMMA], ids=["mma_sync", "wgmma"])
def test_benchmark_ablations_inside_both_forward_kernels(query_group):
    """The GPU suite's ncu ablations (max_sim_forward_ablation, never reached from the op), bf16
    with a gate at Lg = 192: max_only gives the full forward's maxima bit for bit and leaves the
    index outputs alone; mma_only leaves g_best and both index outputs alone; gate_off is the
    no-gate forward; an unbuilt case (float16) is refused with a clear error."""
    ablation_op = getattr(getattr(torch.ops, "transmatcher_fast_C", None), "max_sim_forward_ablation",
                          None)
    if ablation_op is None:
        pytest.skip("transmatcher_fast._C has no CUDA forward ablations")
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 200, 128, generator=g).to("cuda", torch.bfloat16)  # the wgmma kernel: D % 128
    gal = torch.randn(4, 192, 128, generator=g).to("cuda", torch.bfloat16)
    e = torch.randn(192, 200, generator=g).cuda()

    def run(ablation, q=q, gal=gal):
        outs = [torch.full((3, 4, 200), float("nan"), device="cuda"),
                torch.full((3, 4, 192), float("nan"), device="cuda"),
                torch.full((3, 4, 200), -7, device="cuda", dtype=torch.int32),
                torch.full((3, 4, 192), -7, device="cuda", dtype=torch.int32)]
        ablation_op(q, gal, e, *outs, False, query_group, ablation)
        torch.cuda.synchronize()
        return [t.cpu() for t in outs]

    full = _run(q, gal, e, query_group)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(full, run("full")))
    max_only = run("max_only")
    assert torch.equal(max_only[0], full[0].cpu()) and torch.equal(max_only[1], full[1].cpu())
    assert (max_only[2] == -7).all() and (max_only[3] == -7).all()
    mma_only = run("mma_only")
    assert mma_only[1].isnan().all() and (mma_only[2] == -7).all() and (mma_only[3] == -7).all()
    no_gate = _run(q, gal, None, query_group)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(no_gate, run("gate_off")))
    with pytest.raises(RuntimeError, match="bfloat16"):
        run("max_only", q=q.half(), gal=gal.half())
