"""transmatcher_fast.max_sim on CPU backends against the float64 reference (DESIGN.md §3, §6)."""

import pytest
import torch

import transmatcher_fast
from helpers import (as64, expected_grads, grads_by_autograd, make_inputs, randn, rel_err,
                     scores64, values_at)
from transmatcher_fast import max_sim, reference

# (nq, ng, lq, lg, d, gate): ragged L and D, Lq != Lg, Nq != Ng, no gate, single location, and
# shapes that take the C++ kernel's other block paths (query images longer than a block; gallery
# images wider than a block).
SHAPES = [
    (3, 5, 7, 9, 13, True),
    (4, 2, 16, 16, 32, True),
    (2, 3, 12, 20, 5, False),
    (1, 1, 1, 1, 1, True),
    (5, 3, 30, 1, 3, True),
    (2, 3, 1000, 700, 6, True),
    (3, 7, 24, 600, 4, False),
]
SHAPE_IDS = ["x".join(map(str, s[:5])) + ("-gate" if s[5] else "") for s in SHAPES]
HALF_DTYPES = [torch.float16, torch.bfloat16]


def random_grads(rng, nq, ng, lq, lg):
    return randn((nq, ng, lq), rng), randn((nq, ng, lg), rng)


def check_indices_select_the_max(query, gallery, embed, q_best, g_best, q_index, g_index, rtol):
    """The selected locations hold the maximum (up to rounding in the tested dtype)."""
    scores = scores64(query, gallery, embed)
    assert q_index.dtype == g_index.dtype == torch.int32
    assert (q_index >= 0).all() and (q_index < gallery.shape[1]).all()
    assert (g_index >= 0).all() and (g_index < query.shape[1]).all()
    tol = rtol * scores.abs().max().item() + 1e-30
    assert (values_at(scores, q_index, 2) >= scores.max(dim=2).values - tol).all()
    assert (values_at(scores, g_index, 3) >= scores.max(dim=3).values - tol).all()


# --------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_float64_equals_reference(backend, rng, shape):
    *dims, gate = shape
    query, gallery, embed = make_inputs(rng, *dims, gate=gate)
    got = max_sim(query, gallery, embed, return_indices=True)
    expected = reference.max_sim(query, gallery, embed, return_indices=True)
    assert got[0].dtype == torch.float64
    for a, b in zip(got[:2], expected[:2]):
        assert rel_err(a, b) < 1e-12
    for a, b in zip(got[2:], expected[2:]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_float32_within_1e5_of_float64(backend, rng, shape):
    *dims, gate = shape
    query, gallery, embed = make_inputs(rng, *dims, gate=gate, dtype=torch.float32)
    q_best, g_best, q_index, g_index = max_sim(query, gallery, embed, return_indices=True)
    expected = reference.max_sim(*as64(query, gallery, embed))
    assert q_best.dtype == g_best.dtype == torch.float32
    assert rel_err(q_best, expected[0]) < 1e-5 and rel_err(g_best, expected[1]) < 1e-5
    check_indices_select_the_max(query, gallery, embed, q_best, g_best, q_index, g_index, 1e-5)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=SHAPE_IDS[:3])
def test_forward_16bit_within_2x_reference_error(backend, rng, shape, dtype):
    *dims, gate = shape
    query, gallery, embed = make_inputs(rng, *dims, gate=gate, dtype=dtype)
    got = max_sim(query, gallery, embed, return_indices=True)
    exact = reference.max_sim(*as64(query, gallery, embed))
    same_dtype = reference.max_sim(query, gallery, embed)  # upstream run in the 16-bit dtype
    assert got[0].dtype == got[1].dtype == torch.float32
    for ours, theirs, truth in zip(got[:2], same_dtype, exact):
        assert rel_err(ours, truth) <= 2 * rel_err(theirs, truth) + 1e-6
    check_indices_select_the_max(query, gallery, embed, *got, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Backward


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_grads_float64_equal_reference_autograd(backend, rng, shape):
    *dims, gate = shape
    query, gallery, embed = make_inputs(rng, *dims, gate=gate)
    embed = None if embed is None else embed.double()
    grad_q, grad_g = random_grads(rng, *dims[:4])
    got = grads_by_autograd(max_sim, query, gallery, embed, grad_q, grad_g)
    expected = grads_by_autograd(reference.max_sim, query, gallery, embed, grad_q, grad_g)
    for a, b in zip(got, expected):
        if b is None:
            assert a is None
        else:
            assert a.dtype == b.dtype and rel_err(a, b) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32] + HALF_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3] + SHAPES[5:6], ids=SHAPE_IDS[:3] + SHAPE_IDS[5:6])
def test_grads_low_precision(backend, rng, shape, dtype):
    """Gradients against float64 math routed through the op's own argmax (so that a near-tie that
    rounds the other way in low precision does not count as an error)."""
    *dims, gate = shape
    query, gallery, embed = make_inputs(rng, *dims, gate=gate, dtype=dtype)
    grad_q, grad_g = random_grads(rng, *dims[:4])
    grad_q, grad_g = grad_q.float(), grad_g.float()
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (query, gallery, embed)]
    q_best, g_best, q_index, g_index = max_sim(*leaves, return_indices=True)
    ((q_best * grad_q).sum() + (g_best * grad_g).sum()).backward()
    exact = expected_grads(query, gallery, embed, grad_q, grad_g, q_index, g_index)
    for leaf, truth in zip(leaves, exact):
        if leaf is None:
            continue
        assert leaf.grad.dtype == leaf.dtype
        # float32: 1e-5; 16-bit: twice the rounding of the exact gradient to that dtype.
        limit = 1e-5 if dtype == torch.float32 else 2 * rel_err(truth.to(dtype), truth) + 1e-6
        assert rel_err(leaf.grad, truth) <= limit


def separated_inputs(rng, nq, ng, lq, lg, d, gate, gap=1e-3):
    """Inputs whose maxima are at least `gap` ahead of the runner-up, so that gradcheck's finite
    differences never cross an argmax change."""
    for _ in range(100):
        query, gallery, embed = make_inputs(rng, nq, ng, lq, lg, d, gate=gate)
        embed = None if embed is None else embed.double()
        scores = scores64(query, gallery, embed)
        top2 = [scores.movedim(dim, -1).topk(2).values for dim in (2, 3) if scores.shape[dim] > 1]
        if all((v[..., 0] - v[..., 1]).min() > gap for v in top2):
            return query, gallery, embed
    raise AssertionError("could not draw well-separated inputs")


@pytest.mark.parametrize("gate", [True, False])
def test_gradcheck_float64(backend, rng, gate):
    inputs = [t.requires_grad_() if t is not None else None
              for t in separated_inputs(rng, 2, 3, 4, 5, 3, gate)]
    assert torch.autograd.gradcheck(lambda *x: max_sim(*x), tuple(inputs))


def test_gradcheck_same_tensor_as_query_and_gallery(backend, rng):
    x, _, embed = separated_inputs(rng, 3, 3, 4, 4, 3, gate=True)
    x.requires_grad_(), embed.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, e: max_sim(x, x, e), (x, embed))


def test_same_tensor_as_query_and_gallery(backend, rng):
    x, _, embed = make_inputs(rng, 4, 1, 6, 6, 5)
    grad_q, grad_g = random_grads(rng, 4, 4, 6, 6)
    got = grads_by_autograd(lambda a, _, e: max_sim(a, a, e), x, None, embed, grad_q, grad_g)
    expected = grads_by_autograd(lambda a, _, e: reference.max_sim(a, a, e), x, None, embed,
                                 grad_q, grad_g)
    assert rel_err(got[0], expected[0]) < 1e-10 and rel_err(got[2], expected[2]) < 1e-10
    assert torch.equal(max_sim(x, x, embed)[0], max_sim(x, x.clone(), embed)[0])


def test_only_one_output_used(backend, rng):
    query, gallery, embed = make_inputs(rng, 3, 2, 5, 4, 6)
    embed = embed.double().requires_grad_()
    query.requires_grad_()
    max_sim(query, gallery, embed)[1].sum().backward()
    q_ref, e_ref = query.detach().clone().requires_grad_(), embed.detach().clone().requires_grad_()
    reference.max_sim(q_ref, gallery, e_ref)[1].sum().backward()
    assert rel_err(query.grad, q_ref.grad) < 1e-10 and rel_err(embed.grad, e_ref.grad) < 1e-10


# --------------------------------------------------------------------------------------------
# Contract details: ties, NaN, empty, non-contiguous, 64-bit shapes


def test_ties_go_to_the_lowest_index(backend, rng):
    # Integer features in float64: duplicated locations give exactly equal scores.
    query = torch.randint(-3, 4, (2, 5, 4), generator=rng).double()
    gallery = torch.randint(-3, 4, (3, 6, 4), generator=rng).double()
    query[:, 3] = query[:, 1]  # query locations 1 and 3 tie everywhere
    gallery[:, 4] = gallery[:, 0]  # gallery locations 0 and 4 tie everywhere
    _, _, q_index, g_index = max_sim(query, gallery, return_indices=True)
    _, _, q_ref, g_ref = reference.max_sim(query, gallery, return_indices=True)
    assert torch.equal(q_index, q_ref) and torch.equal(g_index, g_ref)
    assert not (q_index == 4).any() and not (g_index == 3).any()
    zeros = torch.zeros(2, 3, 4, dtype=torch.float64)
    _, _, q_zero, g_zero = max_sim(zeros, zeros, return_indices=True)
    assert not q_zero.any() and not g_zero.any()
    grad_q, grad_g = random_grads(rng, 2, 3, 5, 6)
    got = grads_by_autograd(max_sim, query, gallery, None, grad_q, grad_g)
    expected = grads_by_autograd(reference.max_sim, query, gallery, None, grad_q, grad_g)
    assert rel_err(got[0], expected[0]) < 1e-12 and rel_err(got[1], expected[1]) < 1e-12


@pytest.mark.parametrize("where", ["query", "gallery", "score_embed"])
def test_nan_propagates_like_torch_max(backend, rng, where):
    query, gallery, embed = make_inputs(rng, 3, 4, 6, 5, 7, dtype=torch.float32)
    target = {"query": query, "gallery": gallery, "score_embed": embed}[where]
    target.view(-1)[torch.randint(0, target.numel(), (2,), generator=rng)] = float("nan")
    got = max_sim(query, gallery, embed, return_indices=True)
    expected = reference.max_sim(*as64(query, gallery, embed), return_indices=True)
    for a, b in zip(got[:2], expected[:2]):
        assert torch.equal(a.isnan(), b.isnan()) and a.isnan().any()
        finite = ~b.isnan()
        assert rel_err(a[finite], b[finite]) < 1e-5
    for index, ref_index, ref_value in zip(got[2:], expected[2:], expected[:2]):
        assert torch.equal(index[ref_value.isnan()], ref_index[ref_value.isnan()])


@pytest.mark.parametrize("nq,ng", [(0, 3), (3, 0), (0, 0)])
def test_empty_inputs(backend, rng, nq, ng):
    query, gallery, embed = make_inputs(rng, nq, ng, 4, 5, 3, dtype=torch.float32)
    leaves = [query.requires_grad_(), gallery.requires_grad_(), embed.requires_grad_()]
    q_best, g_best, q_index, g_index = max_sim(*leaves, return_indices=True)
    assert q_best.shape == q_index.shape == (nq, ng, 4)
    assert g_best.shape == g_index.shape == (nq, ng, 5)
    (q_best.sum() + g_best.sum()).backward()
    for leaf in leaves:
        assert leaf.grad.shape == leaf.shape and not leaf.grad.any()


def test_non_contiguous_inputs(backend, rng):
    base_q = randn((6, 3, 4), rng, torch.float32)  # [Lq, Nq, D] storage
    base_g = randn((5, 2, 8), rng, torch.float32)[..., ::2]  # strided D
    embed = randn((2 * 5, 6), rng, torch.float32)[::2]  # strided rows
    query, gallery = base_q.transpose(0, 1), base_g.transpose(0, 1)
    assert not (query.is_contiguous() or gallery.is_contiguous() or embed.is_contiguous())
    got = max_sim(query, gallery, embed, return_indices=True)
    expected = max_sim(query.contiguous(), gallery.contiguous(), embed.contiguous(),
                       return_indices=True)
    for a, b in zip(got[:2], expected[:2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(got[2:], expected[2:]):
        assert torch.equal(a, b)


def test_shapes_past_2_31_on_the_meta_path():
    # Nq * Ng * L = 4096 * 4096 * 192 > 2**31: the fake implementation and autograd must not
    # overflow (the kernels index with 64-bit offsets).
    query = torch.empty(4096, 192, 64, device="meta", requires_grad=True)
    gallery = torch.empty(4096, 192, 64, device="meta", requires_grad=True)
    embed = torch.empty(192, 192, device="meta", requires_grad=True)
    q_best, g_best, q_index, _ = max_sim(query, gallery, embed, return_indices=True)
    assert q_best.shape == (4096, 4096, 192) and q_best.numel() > 2**31
    assert g_best.dtype == torch.float32 and q_index.dtype == torch.int32
    (q_best.sum() + g_best.sum()).backward()
    assert query.grad.shape == query.shape and embed.grad.shape == embed.shape


def test_fake_tensor_mode_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        query = torch.empty(70000, 192, 512, dtype=torch.bfloat16)
        gallery = torch.empty(50000, 100, 512, dtype=torch.bfloat16)
        q_best, g_best = max_sim(query, gallery, torch.empty(100, 192))
    assert q_best.shape == (70000, 50000, 192) and g_best.shape == (70000, 50000, 100)
    assert q_best.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument and the shapes


def _bad_inputs():
    q = torch.zeros(2, 3, 4)
    g = torch.zeros(5, 6, 4)
    e = torch.zeros(6, 3)
    return [
        ("rank of query", (torch.zeros(3, 4), g, e), ValueError,
         r"query must be \[Nq, Lq, D\], got shape \(3, 4\)"),
        ("rank of gallery", (q, torch.zeros(1, 5, 6, 4), e), ValueError,
         r"gallery must be \[Ng, Lg, D\], got shape \(1, 5, 6, 4\)"),
        ("D mismatch", (q, torch.zeros(5, 6, 7), None), ValueError,
         r"query shape \(2, 3, 4\) has D=4, gallery shape \(5, 6, 7\) has D=7"),
        ("dtype mismatch", (q, g.double(), e), TypeError,
         r"gallery dtype torch.float64 differs from query dtype torch.float32 "
         r"\(query shape \(2, 3, 4\), gallery shape \(5, 6, 4\)\)"),
        ("integer dtype", (q.long(), g.long(), e), TypeError, r"query dtype must be one of"),
        ("device mismatch", (q, g.to("meta"), e), ValueError,
         r"gallery is on meta but query is on cpu \(query shape \(2, 3, 4\), "
         r"gallery shape \(5, 6, 4\)\)"),
        ("score_embed shape", (q, g, e.t()), ValueError,
         r"score_embed must be \[Lg, Lq\] = \(6, 3\) for query shape \(2, 3, 4\) and gallery "
         r"shape \(5, 6, 4\), got shape \(3, 6\)"),
        ("score_embed dtype", (q, g, e.long()), TypeError, r"score_embed must be floating point"),
        ("score_embed device", (q, g, e.to("meta")), ValueError,
         r"score_embed is on meta but query is on cpu"),
        ("score_embed type", (q, g, [[0.0]]), TypeError, r"score_embed must be a torch.Tensor"),
        ("query type", ([[[0.0]]], g, None), TypeError, r"query must be a torch.Tensor, got list"),
        ("no locations", (torch.zeros(2, 0, 4), g, None), ValueError,
         r"at least one location: query shape \(2, 0, 4\)"),
    ]


@pytest.mark.parametrize("args,error,match", [c[1:] for c in _bad_inputs()],
                         ids=[c[0] for c in _bad_inputs()])
def test_bad_input_errors_name_the_argument_and_shapes(args, error, match):
    with pytest.raises(error, match=match):
        max_sim(*args)


def test_kernel_checks_its_outputs():
    query, gallery = torch.zeros(2, 3, 4), torch.zeros(5, 6, 4)
    if "cpu" not in transmatcher_fast.available_backends("cpu"):
        pytest.skip("C++ extension not built")
    outs = [torch.empty(2, 5, 3), torch.empty(2, 5, 6), torch.empty(2, 5, 3, dtype=torch.int32),
            torch.empty(2, 5, 7, dtype=torch.int32)]
    with pytest.raises(RuntimeError, match="g_index must be a contiguous Int tensor of shape"):
        torch.ops.transmatcher_fast_C.max_sim_forward(query, gallery, None, *outs)


# --------------------------------------------------------------------------------------------
# The C++ kernel's bfloat16 path: block GEMMs on the bfloat16 operands, float32 accumulation and
# outputs. The products of two bfloat16 values are exact in float32, so the only error left is
# float32 accumulation: the float32 bound holds against the float64 math of the bf16 inputs.


def _cpu_kernel_or_skip():
    if "cpu" not in transmatcher_fast.available_backends("cpu"):
        pytest.skip("C++ extension not built")
    return torch.ops.transmatcher_fast_C


def _raw_forward(ops, query, gallery, embed, out_dtype=torch.float32):
    nq, lq, _ = query.shape
    ng, lg, _ = gallery.shape
    outs = [torch.full((nq, ng, lq), float("nan"), dtype=out_dtype),
            torch.full((nq, ng, lg), float("nan"), dtype=out_dtype),
            torch.full((nq, ng, lq), -1, dtype=torch.int32),
            torch.full((nq, ng, lg), -1, dtype=torch.int32)]
    ops.max_sim_forward(query, gallery, embed, *outs, False, 0)
    return outs


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_cpu_bfloat16_forward_within_1e5_of_float64_math_of_its_inputs(rng, shape):
    _cpu_kernel_or_skip()
    *dims, gate = shape
    query, gallery, embed = make_inputs(rng, *dims, gate=gate, dtype=torch.bfloat16)
    with transmatcher_fast.use_backend("cpu"):
        q_best, g_best, q_index, g_index = max_sim(query, gallery, embed, return_indices=True)
    exact = reference.max_sim(*as64(query, gallery, embed))
    assert q_best.dtype == g_best.dtype == torch.float32
    assert rel_err(q_best, exact[0]) < 1e-5 and rel_err(g_best, exact[1]) < 1e-5
    check_indices_select_the_max(query, gallery, embed, q_best, g_best, q_index, g_index, 1e-5)
    # The saved indices are where the returned values came from.
    scores = scores64(query, gallery, embed)
    assert rel_err(values_at(scores, q_index, 2), q_best) < 1e-5
    assert rel_err(values_at(scores, g_index, 3), g_best) < 1e-5


def test_cpu_bfloat16_same_tensor_non_contiguous_and_empty(rng):
    _cpu_kernel_or_skip()
    base = randn((7, 4, 2 * 33), rng, torch.bfloat16)[..., ::2]  # [L, N, D] storage, strided D
    x = base.transpose(0, 1)
    embed = randn((2 * 7, 7), rng, torch.float32)[::2]
    assert not (x.is_contiguous() or embed.is_contiguous())
    with transmatcher_fast.use_backend("cpu"):
        got = max_sim(x, x, embed, return_indices=True)
        expected = max_sim(x.contiguous(), x.contiguous().clone(), embed.contiguous(),
                           return_indices=True)
        empty = max_sim(x[:0], x, embed)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert rel_err(got[0], reference.max_sim(*as64(x, x, embed))[0]) < 1e-5
    assert empty[0].shape == (0, 4, 7) and empty[0].dtype == torch.float32


@pytest.mark.parametrize("where", ["query", "gallery", "score_embed"])
def test_cpu_bfloat16_nan_propagates(rng, where):
    _cpu_kernel_or_skip()
    query, gallery, embed = make_inputs(rng, 3, 4, 6, 5, 8, dtype=torch.bfloat16)
    target = {"query": query, "gallery": gallery, "score_embed": embed}[where]
    target.view(-1)[torch.randint(0, target.numel(), (2,), generator=rng)] = float("nan")
    with transmatcher_fast.use_backend("cpu"):
        got = max_sim(query, gallery, embed, return_indices=True)
    expected = reference.max_sim(*as64(query, gallery, embed), return_indices=True)
    for a, b in zip(got[:2], expected[:2]):
        assert torch.equal(a.isnan(), b.isnan()) and a.isnan().any()
        assert rel_err(a[~b.isnan()], b[~b.isnan()]) < 1e-5
    for index, ref_index, ref_value in zip(got[2:], expected[2:], expected[:2]):
        assert torch.equal(index[ref_value.isnan()], ref_index[ref_value.isnan()])


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_cpu_bfloat16_grads_against_float64_routed_through_its_argmax(rng, shape):
    """The kernel's float32 gradients for bfloat16 inputs (before the op casts them to bfloat16)
    against float64 math of the bf16 inputs, routed through the kernel's own indices."""
    ops = _cpu_kernel_or_skip()
    *dims, gate = shape
    query, gallery, embed = make_inputs(rng, *dims, gate=gate, dtype=torch.bfloat16)
    grad_q, grad_g = (g.float() for g in random_grads(rng, *dims[:4]))
    q_best, g_best, q_index, g_index = _raw_forward(ops, query, gallery, embed)
    dq, dg = torch.full(query.shape, float("nan")), torch.full(gallery.shape, float("nan"))
    de = None if embed is None else torch.full(embed.shape, float("nan"))
    ops.max_sim_backward(grad_q, grad_g, query, gallery, embed, q_best, g_best, q_index, g_index,
                         dq, dg, de)
    exact = expected_grads(query, gallery, embed, grad_q, grad_g, q_index, g_index)
    for got, truth in zip((dq, dg, de), exact):
        if got is not None:
            assert got.dtype == torch.float32 and rel_err(got, truth) < 1e-5
    # The op returns them in the inputs' dtypes.
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (query, gallery, embed)]
    with transmatcher_fast.use_backend("cpu"):
        out = max_sim(*leaves)
    ((out[0] * grad_q).sum() + (out[1] * grad_g).sum()).backward()
    for leaf, got in zip(leaves, (dq, dg, de)):
        if leaf is not None:
            assert leaf.grad.dtype == leaf.dtype
            assert torch.equal(leaf.grad, got.to(leaf.dtype))


def test_cpu_kernel_16bit_outputs_are_float32_and_float16_equals_its_float32_run(rng):
    """float16 reaches the kernel converted to float32 (_kernel_dtype); a direct call with
    float16 is converted inside and gives the float32 run's results; 16-bit outputs must be
    float32."""
    ops = _cpu_kernel_or_skip()
    query, gallery, embed = make_inputs(rng, 3, 2, 9, 11, 17, dtype=torch.float16)
    got = _raw_forward(ops, query, gallery, embed)
    expected = _raw_forward(ops, query.float(), gallery.float(), embed)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    for dtype in (torch.float16, torch.bfloat16):
        q, g = query.to(dtype), gallery.to(dtype)
        with pytest.raises(RuntimeError, match="q_best must be a contiguous Float tensor"):
            _raw_forward(ops, q, g, embed, out_dtype=dtype)


def _cpu_has_bf16_dot() -> bool:
    caps = getattr(torch._C._cpu, "_get_cpu_capability", None)
    if caps is not None:
        caps = caps()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return bool(getattr(torch._C._cpu, "_is_avx512_bf16_supported", lambda: False)())


def test_cpu_bfloat16_gemm_runs_in_bfloat16_where_the_cpu_and_torch_allow():
    """No silent fallback: on a CPU with bfloat16 dot products and torch >= 2.7, bfloat16
    inputs run their GEMMs in bfloat16 (the kernel's start-up self-check passed)."""
    ops = _cpu_kernel_or_skip()
    available = ops.cpu_bf16_gemm_available()
    assert isinstance(available, bool)
    if _cpu_has_bf16_dot() and tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 7):
        assert available
    elif not _cpu_has_bf16_dot():
        assert not available
