"""The Triton kernels of max_sim against the float64 reference (DESIGN.md §3, §6).

Without a GPU they run on CPU tensors through the Triton interpreter (conftest sets
TRITON_INTERPRET=1), which computes fp32 dots exactly: float32 is compared in "ieee" precision.
On a GPU machine the same tests run on CUDA tensors.
"""

import pytest
import torch

import transmatcher_fast
from helpers import as64, expected_grads, make_inputs, randn, rel_err, scores64, values_at
from transmatcher_fast import max_sim, reference
from transmatcher_fast.ops import dispatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif("triton" not in dispatch.available_backends(DEVICE),
                                reason=f"Triton cannot run on {DEVICE} here")

# (nq, ng, lq, lg, d, gate): ragged L and D (not multiples of 16 or of the blocks), Lq != Lg,
# a single location, no gate, and D larger than one feature block.
SHAPES = [
    (3, 4, 37, 21, 40, True),
    (2, 3, 5, 9, 20, True),
    (2, 2, 1, 3, 7, True),
    (3, 2, 12, 17, 9, False),
    (2, 3, 19, 11, 130, True),
]
SHAPE_IDS = ["x".join(map(str, s[:5])) + ("-gate" if s[5] else "") for s in SHAPES]


def kernels():
    from transmatcher_fast.kernels import max_sim as module

    return module


# Small tiles exercise the multi-block paths (running maxima across gallery blocks, the g_best
# read-back across query blocks, several feature blocks, several chunks of routes per gather);
# None is the default configuration.
def variant_fields(variant: str) -> dict:
    """ForwardConfig fields of a test's variant name: "tiled", "strip", "pairs" or "pairs-tma"
    (the pairs forward loading through TMA descriptors)."""
    name, _, tma = variant.partition("-")
    return {"variant": name, "tma": tma == "tma"}


def small_configs(variant="tiled"):
    k = kernels()
    return (k.ForwardConfig(block_s=16, block_t=16, block_k=16, group_q=2, num_warps=4,
                            group_g=2, **variant_fields(variant)),
            k.BackwardConfig(block_s=16, block_t=16, block_d=16, chunk=4,
                             score_embed_partials=2))


@pytest.fixture(params=["default", "small", "strip", "pairs"])
def configs(request, monkeypatch):
    """Runs the op with the default or the small tiles, or the strip or pairs forward with
    small tiles (up to 4 gallery blocks per program; pairs: 2 gallery images per work item, 3
    persistent programs in the interpreter, so programs take several work items), patched into
    the launch wrappers."""
    if request.param != "default":
        k = kernels()
        forward, backward = small_configs("tiled" if request.param == "small" else request.param)
        monkeypatch.setattr(k, "forward_config", lambda *args: forward)
        monkeypatch.setattr(k, "backward_config", lambda *args: backward)
    with transmatcher_fast.use_backend("triton"):
        yield request.param


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 in ieee precision: the interpreter is exact anyway; on a GPU TF32 is tested apart."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous[0]
    torch.set_float32_matmul_precision(previous[1])


def inputs(rng, dims, gate, dtype):
    return tuple(None if t is None else t.to(DEVICE)
                 for t in make_inputs(rng, *dims, gate=gate, dtype=dtype))


def check_indices_select_the_max(query, gallery, embed, q_index, g_index, rtol):
    scores = scores64(*(None if t is None else t.cpu() for t in (query, gallery, embed)))
    q_index, g_index = q_index.cpu(), g_index.cpu()
    assert q_index.dtype == g_index.dtype == torch.int32
    tol = rtol * scores.abs().max().item() + 1e-30
    assert (values_at(scores, q_index, 2) >= scores.max(dim=2).values - tol).all()
    assert (values_at(scores, g_index, 3) >= scores.max(dim=3).values - tol).all()


def routed_grads_check(rng, dims, gate, dtype, limit_for):
    query, gallery, embed = inputs(rng, dims, gate, dtype)
    nq, ng, lq, lg, _ = dims
    grad_q = randn((nq, ng, lq), rng, torch.float32).to(DEVICE)
    grad_g = randn((nq, ng, lg), rng, torch.float32).to(DEVICE)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (query, gallery, embed)]
    q_best, g_best, q_index, g_index = max_sim(*leaves, return_indices=True)
    ((q_best * grad_q).sum() + (g_best * grad_g).sum()).backward()
    exact = expected_grads(*(None if t is None else t.cpu() for t in (query, gallery, embed)),
                           grad_q.cpu(), grad_g.cpu(), q_index.cpu(), g_index.cpu())
    for leaf, truth in zip(leaves, exact):
        if leaf is None:
            continue
        assert leaf.grad.dtype == leaf.dtype
        assert rel_err(leaf.grad.cpu(), truth) <= limit_for(truth)


# --------------------------------------------------------------------------------------------
# Forward and gradients through the op


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_float32_within_1e5_of_float64(rng, configs, shape):
    *dims, gate = shape
    query, gallery, embed = inputs(rng, dims, gate, torch.float32)
    q_best, g_best, q_index, g_index = max_sim(query, gallery, embed, return_indices=True)
    expected = reference.max_sim(*as64(*(t.cpu() if t is not None else None
                                         for t in (query, gallery, embed))))
    assert q_best.dtype == g_best.dtype == torch.float32
    assert rel_err(q_best.cpu(), expected[0]) < 1e-5 and rel_err(g_best.cpu(), expected[1]) < 1e-5
    check_indices_select_the_max(query, gallery, embed, q_index, g_index, 1e-5)


@pytest.mark.parametrize("shape", SHAPES[:2] + SHAPES[3:4], ids=SHAPE_IDS[:2] + SHAPE_IDS[3:4])
def test_forward_float16_within_2x_reference_error(rng, configs, shape):
    *dims, gate = shape
    query, gallery, embed = inputs(rng, dims, gate, torch.float16)
    got = max_sim(query, gallery, embed, return_indices=True)
    cpu = tuple(None if t is None else t.cpu() for t in (query, gallery, embed))
    exact = reference.max_sim(*as64(*cpu))
    same_dtype = reference.max_sim(*cpu)  # upstream, run in float16
    for ours, theirs, truth in zip(got[:2], same_dtype, exact):
        assert ours.dtype == torch.float32
        assert rel_err(ours.cpu(), truth) <= 2 * rel_err(theirs, truth) + 1e-6
    check_indices_select_the_max(query, gallery, embed, *got[2:], rtol=1e-3)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_grads_float32_within_1e5(rng, configs, shape):
    """All three gradients against float64 math routed through the kernel's own argmax."""
    *dims, gate = shape
    routed_grads_check(rng, dims, gate, torch.float32, lambda truth: 1e-5)


@pytest.mark.parametrize("shape", SHAPES[:2] + SHAPES[3:4], ids=SHAPE_IDS[:2] + SHAPE_IDS[3:4])
def test_grads_float16_within_2x_rounding(rng, configs, shape):
    *dims, gate = shape
    # The gathers add float16 feature rows in float32; the reference's autocast backward
    # rounds dS to float16: within twice the rounding of the exact result, plus one float16
    # ulp of the largest term.
    routed_grads_check(rng, dims, gate, torch.float16,
                       lambda truth: 2 * rel_err(truth.half(), truth) + 2e-3)


def test_grads_when_only_one_output_is_used(rng, configs):
    query, gallery, embed = inputs(rng, (3, 2, 9, 6, 18), True, torch.float32)
    for used in (0, 1):
        leaves = [t.clone().requires_grad_() for t in (query, gallery, embed)]
        max_sim(*leaves)[used].sum().backward()
        refs = [t.detach().cpu().double().requires_grad_() for t in (query, gallery, embed)]
        reference.max_sim(*refs)[used].sum().backward()
        for leaf, ref in zip(leaves, refs):
            assert rel_err(leaf.grad.cpu(), ref.grad) < 1e-5


def test_same_tensor_as_query_and_gallery(rng, configs):
    x, _, embed = inputs(rng, (4, 1, 10, 10, 12), True, torch.float32)
    leaves = [x.clone().requires_grad_(), embed.clone().requires_grad_()]
    q_best, g_best = max_sim(leaves[0], leaves[0], leaves[1])
    (q_best.sum() + 2 * g_best.sum()).backward()
    refs = [t.detach().cpu().double().requires_grad_() for t in (x, embed)]
    ref_q, ref_g = reference.max_sim(refs[0], refs[0], refs[1])
    (ref_q.sum() + 2 * ref_g.sum()).backward()
    assert rel_err(leaves[0].grad.cpu(), refs[0].grad) < 1e-5
    assert rel_err(leaves[1].grad.cpu(), refs[1].grad) < 1e-5


# --------------------------------------------------------------------------------------------
# Contract details


def test_argmax_and_grads_equal_the_cpu_kernel_exactly(rng, configs):
    """Integer features make every score exact in float32: the argmax (ties included) and the
    gradients are then the C++ CPU kernel's, bit for bit."""
    if "cpu" not in dispatch.available_backends("cpu"):
        pytest.skip("C++ extension not built")
    query = torch.randint(-3, 4, (3, 13, 24), generator=rng).float()
    gallery = torch.randint(-3, 4, (2, 11, 24), generator=rng).float()
    query[:, 7] = query[:, 2]  # ties between query locations 2 and 7
    gallery[:, 9] = gallery[:, 0]
    grad_q = torch.randint(-4, 5, (3, 2, 13), generator=rng).float()
    grad_g = torch.randint(-4, 5, (3, 2, 11), generator=rng).float()
    results = {}
    for name, device in (("triton", DEVICE), ("cpu", "cpu")):
        leaves = [t.to(device).requires_grad_() for t in (query, gallery)]
        with transmatcher_fast.use_backend(name):
            *values, q_index, g_index = max_sim(*leaves, return_indices=True)
        ((values[0] * grad_q.to(device)).sum() + (values[1] * grad_g.to(device)).sum()).backward()
        results[name] = [t.detach().cpu() for t in (*values, q_index, g_index,
                                                    leaves[0].grad, leaves[1].grad)]
    for ours, theirs in zip(results["triton"], results["cpu"]):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("where", ["query", "gallery", "score_embed"])
def test_nan_propagates_like_torch_max(rng, configs, where):
    query, gallery, embed = inputs(rng, (3, 4, 6, 5, 7), True, torch.float32)
    target = {"query": query, "gallery": gallery, "score_embed": embed}[where]
    flat = target.view(-1)
    flat[torch.randint(0, flat.numel(), (2,), generator=rng)] = float("nan")
    got = max_sim(query, gallery, embed, return_indices=True)
    expected = reference.max_sim(*as64(query.cpu(), gallery.cpu(), embed.cpu()),
                                 return_indices=True)
    for a, b in zip(got[:2], expected[:2]):
        a = a.cpu()
        assert torch.equal(a.isnan(), b.isnan()) and a.isnan().any()
        assert rel_err(a[~b.isnan()], b[~b.isnan()]) < 1e-5
    for index, ref_index, ref_value in zip(got[2:], expected[2:], expected[:2]):
        assert torch.equal(index.cpu()[ref_value.isnan()], ref_index[ref_value.isnan()])


@pytest.mark.parametrize("nq,ng", [(0, 3), (3, 0)])
def test_empty_inputs(rng, configs, nq, ng):
    leaves = [t.requires_grad_() for t in inputs(rng, (nq, ng, 4, 5, 3), True, torch.float32)]
    q_best, g_best = max_sim(*leaves)
    assert q_best.shape == (nq, ng, 4) and g_best.shape == (nq, ng, 5)
    (q_best.sum() + g_best.sum()).backward()
    for leaf in leaves:
        assert leaf.grad.shape == leaf.shape and not leaf.grad.any()


def test_gradients_are_bit_identical_run_to_run(rng, configs):
    query, gallery, embed = inputs(rng, (5, 4, 23, 19, 33), True, torch.float32)
    grad_q = randn((5, 4, 23), rng, torch.float32).to(DEVICE)
    grad_g = randn((5, 4, 19), rng, torch.float32).to(DEVICE)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (query, gallery, embed)]
        q_best, g_best = max_sim(*leaves)
        ((q_best * grad_q).sum() + (g_best * grad_g).sum()).backward()
        runs.append([leaf.grad.clone() for leaf in leaves])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_every_output_element_is_written():
    """Direct kernel calls into NaN/-1 filled buffers, with tiles that do not divide the shape."""
    k = kernels()
    forward, backward = small_configs()
    g = torch.Generator().manual_seed(0)
    query, gallery = randn((2, 18, 20), g, torch.float32), randn((3, 17, 20), g, torch.float32)
    sig = torch.sigmoid(randn((17, 18), g, torch.float32))
    query, gallery, sig = query.to(DEVICE), gallery.to(DEVICE), sig.to(DEVICE)
    outs = (torch.full((2, 3, 18), float("nan"), device=DEVICE),
            torch.full((2, 3, 17), float("nan"), device=DEVICE),
            torch.full((2, 3, 18), -1, dtype=torch.int32, device=DEVICE),
            torch.full((2, 3, 17), -1, dtype=torch.int32, device=DEVICE))
    k.forward(query, gallery, sig, outs, forward, "ieee")
    assert not any(t.isnan().any() for t in outs[:2]) and all((t >= 0).all() for t in outs[2:])
    grads = [torch.full_like(t, float("nan")) for t in (query, gallery, sig)]
    k.backward(torch.ones_like(outs[0]), torch.ones_like(outs[1]), query, gallery, sig, *outs,
               *grads, backward, "ieee")
    assert not any(t.isnan().any() for t in grads)


def test_float32_precision_follows_torch():
    k = kernels()
    assert k.input_precision(torch.float32, False) == "ieee"
    assert k.input_precision(torch.float32, True) == "tf32"
    assert k.input_precision(torch.float16, False) == "tf32"  # 16-bit dots ignore it


def check_nan_forward(k, query, gallery, embed, variant):
    """The ``variant`` forward (block_k 32, ieee) of inputs holding NaNs: maxima with NaN where the
    reference has them (some) and equal elsewhere, argmax bit for bit; returns its outputs."""
    (num_q, length_q, _), (num_g, length_g, _) = query.shape, gallery.shape
    config = k.ForwardConfig(block_k=32, **variant_fields(variant))
    outs = k.forward(query, gallery, torch.sigmoid(embed).contiguous(),
                     tuple(dispatch.new_output((num_q, num_g, length), dt, query.device)
                           for length, dt in ((length_q, torch.float32), (length_g, torch.float32),
                                              (length_q, torch.int32), (length_g, torch.int32))),
                     config, "ieee")
    expected = reference.max_sim(*as64(query.cpu(), gallery.cpu(), embed.cpu()),
                                 return_indices=True)
    for ours, theirs in zip(outs[:2], expected[:2]):
        ours = ours.cpu()
        assert torch.equal(ours.isnan(), theirs.isnan()) and ours.isnan().any()
        assert rel_err(ours[~theirs.isnan()], theirs[~theirs.isnan()]) < 1e-5
    for ours, theirs in zip(outs[2:], expected[2:]):
        assert torch.equal(ours.cpu(), theirs.int())
    return outs


@pytest.mark.parametrize("variant", ["tiled", "strip", "pairs", "pairs-tma"])
@pytest.mark.parametrize("length", [64, 192])
def test_nan_and_ties_in_full_blocks(rng, variant, length):
    """Default 64-location tiles that are full (L = 64, and 192 = 3 x 64 as in the paper): a NaN
    query location, a NaN gallery location and exact ties (zero features) give the reference's
    values and argmax: the first NaN wins, then the lowest index among equal maxima. For
    "pairs" full blocks are also the unmasked specialisation (EVEN_L, EVEN_K)."""
    k = kernels()
    query, gallery, embed = inputs(rng, (2, 3, length, length, 32), True, torch.float32)
    query[1, 5, 3] = float("nan")
    gallery[2, length - 1, 0] = float("nan")
    query[0] = 0.0  # every score of query image 0 ties at 0 (and -0.0 ties with +0.0)
    query[0, 7] = -query[0, 7]
    gallery[0, 3] = 0.0
    check_nan_forward(k, query, gallery, embed, variant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_every_forward_candidate_matches_the_reference(rng, dtype):
    """Every launch the GPU suite sweeps (both variants), on a shape with two location blocks."""
    k = kernels()
    query, gallery, embed = inputs(rng, (2, 3, 70, 66, 48), True, dtype)
    sig = torch.sigmoid(embed).contiguous()
    expected = reference.max_sim(*as64(query.cpu(), gallery.cpu(), embed.cpu()))
    candidates = k.forward_candidates(70, 66, 48, dtype)
    assert {c.variant for c in candidates} == {"tiled", "strip", "pairs"}
    assert any(c.tma for c in candidates)  # TMA descriptors over rows that cross images
    for config in candidates:
        outs = tuple(dispatch.new_output(shape, dt, query.device) for shape, dt in (
            ((2, 3, 70), torch.float32), ((2, 3, 66), torch.float32),
            ((2, 3, 70), torch.int32), ((2, 3, 66), torch.int32)))
        k.forward(query, gallery, sig, outs, config, "ieee")
        limit = 1e-5 if dtype == torch.float32 else 1e-4
        assert rel_err(outs[0].cpu(), expected[0]) < limit, config.name
        assert rel_err(outs[1].cpu(), expected[1]) < limit, config.name
        check_indices_select_the_max(query, gallery, embed, *outs[2:], rtol=limit)


def test_fp16_backward_keeps_scaled_gradients_in_range(rng, configs):
    """GradScaler multiplies the loss by 2**16 and more. The routed gradient (grad * sig at the
    argmax) must never pass through fp16 (overflow above 65504, flush below ~6e-8), as in the
    CUDA backward: the gathers weigh the fp16 rows in float32, so the float32 gradient buffers
    hold the exact result, even where a routed value is far outside fp16's range."""
    k = kernels()
    nq, ng, lq, lg, d = 2, 3, 9, 7, 20
    for scale, feature_scale in ((2.0**20, 0.01), (2.0**-30, 100.0)):
        query, gallery, embed = inputs(rng, (nq, ng, lq, lg, d), True, torch.float32)
        query, gallery = (feature_scale * query).half(), (feature_scale * gallery).half()
        sig = torch.sigmoid(embed).contiguous()
        outs = k.forward(query, gallery, sig, tuple(dispatch.new_output(shape, dt, query.device)
                         for shape, dt in (((nq, ng, lq), torch.float32),
                                           ((nq, ng, lg), torch.float32),
                                           ((nq, ng, lq), torch.int32),
                                           ((nq, ng, lg), torch.int32))))
        grad_q = (scale * randn((nq, ng, lq), rng, torch.float32)).to(DEVICE)
        grad_g = (scale * randn((nq, ng, lg), rng, torch.float32)).to(DEVICE)
        grads = [dispatch.new_output(t.shape, torch.float32, query.device)
                 for t in (query, gallery, sig)]
        k.backward(grad_q, grad_g, query, gallery, sig, *outs, *grads)
        exact = expected_grads(query.cpu(), gallery.cpu(), embed.cpu(), grad_q.cpu(),
                               grad_g.cpu(), outs[2].cpu(), outs[3].cpu())
        for ours, truth in zip(grads, exact):
            assert torch.isfinite(ours).all() and ours.abs().max() > 0
            assert rel_err(ours.cpu(), truth) <= 2e-3, scale


def test_launches_run_on_the_inputs_device(rng, monkeypatch):
    """Triton launches on the current CUDA device; the wrappers make it the tensors' device (a
    tensor on cuda:1 is launched on device 1, not 0)."""
    k = kernels()
    guard = k._on_device(type("FakeCudaTensor", (), {"is_cuda": True,
                                                    "device": torch.device("cuda", 1)})())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    seen = []
    real = k._on_device
    monkeypatch.setattr(k, "_on_device", lambda t: seen.append(t.device) or real(t))
    with transmatcher_fast.use_backend("triton"):
        leaves = [t.requires_grad_() for t in inputs(rng, (2, 2, 5, 4, 8), True, torch.float32)]
        q_best, g_best = max_sim(*leaves)
        (q_best.sum() + g_best.sum()).backward()
    assert seen == [torch.device(DEVICE)] * 2  # the forward and the backward launches


def test_float32_calls_work_with_torchs_new_precision_api(rng):
    """After torch.backends.cuda.matmul.fp32_precision = "tf32", torch's legacy getters raise
    ("mix of the legacy and new APIs"); the op reads the new API first."""
    from transmatcher_fast.ops import precision

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API")
    query, gallery, embed = inputs(rng, (2, 2, 5, 4, 8), True, torch.float32)
    try:
        for setting, tf32 in (("tf32", True), ("ieee", False)):
            matmul.fp32_precision = setting
            assert precision.float32_matmul_allows_tf32() is tf32
            with transmatcher_fast.use_backend("triton"):
                q_best, _ = max_sim(query, gallery, embed)
            assert rel_err(q_best.cpu(), reference.max_sim(*as64(query.cpu(), gallery.cpu(),
                                                                 embed.cpu()))[0]) < 5e-3
        matmul.fp32_precision = "none"
        torch.backends.fp32_precision = "tf32"  # the generic setting is inherited
        assert precision.float32_matmul_allows_tf32() is True
    finally:
        torch.backends.fp32_precision = "none"
        matmul.fp32_precision = "none"
    assert precision.float32_matmul_allows_tf32() is False  # legacy flags readable again


def test_float64_on_the_triton_device_falls_back_to_reference():
    assert dispatch.select(torch.device(DEVICE), torch.float64).name in ("reference", "cpu")
    with transmatcher_fast.use_backend("triton"):
        with pytest.raises(RuntimeError, match="backend 'triton' cannot run"):
            max_sim(torch.zeros(1, 2, 3, dtype=torch.float64, device=DEVICE),
                    torch.zeros(1, 2, 3, dtype=torch.float64, device=DEVICE))


@pytest.mark.parametrize("variant", ["tiled", "strip", "pairs", "pairs-tma"])
def test_g_best_fold_across_query_blocks_keeps_the_first_nan_and_the_lowest_tie(rng, variant):
    """Three full 64-location query blocks (L = 192): g_best is folded across blocks. A NaN
    only in the second block's query locations must replace the first block's number, a NaN
    in both the first and the third must keep the first's index, and ties at 0 keep the
    lowest query location."""
    k = kernels()
    query, gallery, embed = inputs(rng, (3, 2, 192, 64, 32), True, torch.float32)
    query[0, 100, 1] = float("nan")  # image 0: the NaN first appears in block 1
    query[1, 10, 2] = query[1, 150, 3] = float("nan")  # image 1: blocks 0 and 2
    gallery[1] = 0.0  # query image 2 (no NaN) ties at 0 with gallery image 1 everywhere
    gallery[1, 5] = -0.0
    outs = check_nan_forward(k, query, gallery, embed, variant)
    assert (outs[3][2, 1] == 0).all()  # the ties: the lowest query location


@pytest.mark.parametrize("variant", ["tiled", "strip", "pairs", "pairs-tma"])
@pytest.mark.parametrize("ablation", ["gate_off", "max_only", "mma_only"])
def test_forward_ablations(rng, variant, ablation):
    """The GPU suite's ncu ablations (kernels.forward(..., ablation=...), never from the op):
    gate_off gives the no-gate op's values and argmax; max_only the gated maxima and leaves the
    index outputs alone; mma_only leaves g_best and both index outputs alone. Small tiles, so
    every running maximum crosses blocks."""
    k = kernels()
    forward, _ = small_configs(variant)
    query, gallery, embed = inputs(rng, (2, 3, 37, 21, 40), True, torch.float32)
    sig = torch.sigmoid(embed).contiguous()
    outs = (torch.full((2, 3, 37), float("nan"), device=DEVICE),
            torch.full((2, 3, 21), float("nan"), device=DEVICE),
            torch.full((2, 3, 37), -7, dtype=torch.int32, device=DEVICE),
            torch.full((2, 3, 21), -7, dtype=torch.int32, device=DEVICE))
    k.forward(query, gallery, sig, outs, forward, "ieee", ablation=ablation)
    gate = None if ablation == "gate_off" else embed.cpu()
    expected = reference.max_sim(*as64(query.cpu(), gallery.cpu()), None if gate is None
                                 else gate.double(), return_indices=True)
    untouched = [False, False, True, True] if ablation == "max_only" else [False] * 4
    if ablation == "mma_only":
        untouched = [False, True, True, True]
    for i, (ours, theirs) in enumerate(zip(outs, expected)):
        ours = ours.cpu()
        if untouched[i]:
            assert (ours.isnan() if i < 2 else ours == -7).all(), (ablation, i)
        elif ablation != "mma_only" and i < 2:
            assert rel_err(ours, theirs) < 1e-5, (ablation, i)
    if ablation == "gate_off":
        check_indices_select_the_max(query, gallery, None, outs[2], outs[3], rtol=1e-5)
    with pytest.raises(ValueError, match="ablation"):
        k.forward(query, gallery, sig, outs, forward, "ieee", ablation="argmax_only")
