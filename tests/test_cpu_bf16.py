"""The C++ kernel's bfloat16 forward (bfloat16 block GEMMs on AMX tiles or AVX512-BF16, then a
16-lane AVX-512 scale-and-max epilogue) against the reference, and the ISA it reports.

Integer-valued features make every score exact in float32 whatever the summation order (products
of small integers, sums far below 2**24), and the reference run in float32 then applies the same
float32 gate with the same one rounding. So values and indices must match bit for bit: the
lowest-index rule among equal maxima and the first-NaN rule are checked at every lane, at the
16-lane vector boundaries, the vector tails, and the GEMM block boundaries (several images per
block, a query image split over GEMM steps, a gallery image wider than a column block).
"""

import os

import pytest
import torch

import transmatcher_fast
from transmatcher_fast import max_sim, reference

# (nq, ng, lq, lg, d): the model's L (12 full vectors, two gallery images per column block, one
# or two query images per GEMM step); vector tails with several images per block and an odd D;
# fewer than 16 gallery locations; query images longer than a GEMM step (192 rows, or 384 where
# the L2 holds them) with one exact vector; a gallery image wider than a column block (384
# columns) with a tail; an odd D above 32 with column and feature-pair tails in the gallery's
# 16 x 16 packing tiles.
SHAPES = [
    (2, 3, 192, 192, 64),
    (3, 4, 17, 33, 9),
    (2, 5, 5, 7, 3),
    (2, 2, 200, 16, 32),
    (1, 2, 400, 16, 8),
    (1, 3, 20, 401, 8),
    (2, 3, 20, 40, 37),
]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
KNOWN_ISAS = {"avx512_core_amx", "avx512_core_bf16", ""}


def _ops_or_skip():
    if "cpu" not in transmatcher_fast.available_backends("cpu"):
        pytest.skip("C++ extension not built")
    return torch.ops.transmatcher_fast_C


def _isa(ops) -> str:
    if not hasattr(ops, "cpu_bf16_gemm_isa"):
        pytest.fail("the extension predates cpu_bf16_gemm_isa: rebuild it")
    return ops.cpu_bf16_gemm_isa()


def _integer_inputs(rng, nq, ng, lq, lg, d, gate):
    """Features in {-2, ..., 2} (many exact ties), as bfloat16; float32 gate logits or None."""
    query = torch.randint(-2, 3, (nq, lq, d), generator=rng).to(torch.bfloat16)
    gallery = torch.randint(-2, 3, (ng, lg, d), generator=rng).to(torch.bfloat16)
    embed = torch.randn(lg, lq, generator=rng) if gate else None
    return query, gallery, embed


def _expected(query, gallery, embed):
    """The reference in float32 on the same values: exact scores, then the same gate product."""
    return reference.max_sim(query.float(), gallery.float(), embed, return_indices=True)


def _assert_same(got, expected):
    for a, b in zip(got[:2], expected[:2]):
        assert a.dtype == torch.float32
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a[~a.isnan()], b[~b.isnan()])
    for a, b in zip(got[2:], expected[2:]):
        assert a.dtype == torch.int32 and torch.equal(a, b)


@pytest.mark.parametrize("gate", [True, False], ids=["gate", "no-gate"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_bfloat16_forward_exact_on_integer_features_with_ties(rng, shape, gate):
    _ops_or_skip()
    query, gallery, embed = _integer_inputs(rng, *shape, gate)
    with transmatcher_fast.use_backend("cpu"):
        got = max_sim(query, gallery, embed, return_indices=True)
    _assert_same(got, _expected(query, gallery, embed))


def test_bfloat16_all_equal_scores_pick_location_zero(rng):
    _ops_or_skip()
    query = torch.ones(2, 200, 8, dtype=torch.bfloat16)
    gallery = torch.ones(3, 401, 8, dtype=torch.bfloat16)
    with transmatcher_fast.use_backend("cpu"):
        q_best, g_best, q_index, g_index = max_sim(query, gallery, return_indices=True)
    assert (q_best == 8).all() and (g_best == 8).all()
    assert not q_index.any() and not g_index.any()


def _locations(length):
    """Locations at the edges of 16-lane vectors, of GEMM steps (192 rows) and of the image."""
    edges = (0, 1, 15, 16, 17, 31, 191, 192, 383, 384, length - 1)
    return sorted({s for s in edges if 0 <= s < length})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")],
                         ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_bfloat16_nan_and_inf_at_block_boundaries(rng, shape, value):
    """A non-finite feature at vector and block edges: NaN scores win once and stay (the first
    NaN's index), infinities compete as values (inf * 0 gives NaN too)."""
    _ops_or_skip()
    nq, ng, lq, lg, d = shape
    query, gallery, embed = _integer_inputs(rng, *shape, gate=True)
    for k, s in enumerate(_locations(lg)):
        gallery[k % ng, s, k % d] = value
    for k, t in enumerate(_locations(lq)):
        query[k % nq, t, (k + 1) % d] = value
    with transmatcher_fast.use_backend("cpu"):
        got = max_sim(query, gallery, embed, return_indices=True)
    expected = _expected(query, gallery, embed)
    if value != value:
        assert expected[0].isnan().any() and expected[1].isnan().any()
    _assert_same(got, expected)


def test_bfloat16_nan_in_the_gate(rng):
    _ops_or_skip()
    query, gallery, embed = _integer_inputs(rng, 2, 3, 200, 33, 16, gate=True)
    embed[16, 0] = embed[32, 191] = embed[0, 199] = float("nan")
    with transmatcher_fast.use_backend("cpu"):
        got = max_sim(query, gallery, embed, return_indices=True)
    _assert_same(got, _expected(query, gallery, embed))


@pytest.mark.parametrize("shape", [(3, 4, 192, 192, 96), (2, 3, 17, 33, 9)], ids=["192", "tails"])
def test_bfloat16_random_features_within_float32_accumulation(rng, shape):
    """Random bfloat16 features: float32 accumulation error only, against float64 math of the
    same bfloat16 values; the saved indices hold the returned values."""
    _ops_or_skip()
    nq, ng, lq, lg, d = shape
    query = torch.randn(nq, lq, d, generator=rng).to(torch.bfloat16)
    gallery = torch.randn(ng, lg, d, generator=rng).to(torch.bfloat16)
    embed = torch.randn(lg, lq, generator=rng)
    with transmatcher_fast.use_backend("cpu"):
        q_best, g_best, q_index, g_index = max_sim(query, gallery, embed, return_indices=True)
    scores = torch.einsum("itd,jsd->ijst", query.double(), gallery.double())
    scores = scores * torch.sigmoid(embed.double())
    scale = scores.abs().max().item()
    tol = 1e-5 * scale
    assert (q_best.double() - scores.amax(dim=2)).abs().max().item() <= tol
    assert (g_best.double() - scores.amax(dim=3)).abs().max().item() <= tol
    at_q = scores.gather(2, q_index.long().unsqueeze(2)).squeeze(2)
    at_g = scores.gather(3, g_index.long().unsqueeze(3)).squeeze(3)
    assert (at_q - q_best.double()).abs().max().item() <= tol
    assert (at_g - g_best.double()).abs().max().item() <= tol


def test_reported_isa_is_a_known_name_and_matches_availability():
    ops = _ops_or_skip()
    isa = _isa(ops)
    assert isa in KNOWN_ISAS
    assert (isa != "") == ops.cpu_bf16_gemm_available()


def test_amx_runs_where_the_cpu_and_the_os_offer_it():
    """No silent fallback from AMX to AVX512-BF16 (oneDNN's ISA can only be capped on purpose,
    with ONEDNN_MAX_CPU_ISA)."""
    ops = _ops_or_skip()
    caps = getattr(torch._C._cpu, "_get_cpu_capability", lambda: {})()
    init_amx = getattr(torch._C._cpu, "_init_amx", None)
    if os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"):
        pytest.skip("oneDNN's ISA capped by the environment")
    if not (caps.get("amx_bf16") and caps.get("amx_tile") and init_amx is not None and init_amx()):
        pytest.skip("no AMX-BF16 usable here")
    if not ops.cpu_bf16_gemm_available():
        pytest.skip("bfloat16 GEMMs run in float32 with this torch")
    assert _isa(ops) == "avx512_core_amx"
