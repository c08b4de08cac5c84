"""Ahead-of-time compilation of every Triton kernel for Hopper (sm_90) and Ampere (sm_80), on a
machine without a GPU, with the divisibility specialisation a real launch gets
(benchmarks/triton_resources.py does the compiling and prints the table): the PTX must use the
tensor cores (wgmma / mma.sync), aligned 16-bit loads must go through cp.async, and no kernel
the GPU suite runs (every forward candidate, the backward) may spill on Hopper. Every forward
candidate carries its static measure (SASS instructions per score element beside the MMA).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "triton_resources.py"


def _compile(tmp_path_factory, *flags):
    out = tmp_path_factory.mktemp("triton") / "resources.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, str(SCRIPT), *flags, "--json", str(out)],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)  # the resource table (pytest -s)
    return json.loads(out.read_text())["kernels"]


@pytest.fixture(scope="module")
def hopper(tmp_path_factory):
    return _compile(tmp_path_factory, "--target", "sm_90", "--precision", "fp16",
                    "--precision", "fp32-tf32")


@pytest.fixture(scope="module")
def ampere(tmp_path_factory):
    return _compile(tmp_path_factory, "--target", "sm_80", "--precision", "fp16",
                    "--geometry", "aligned")


def test_every_kernel_and_forward_candidate_compiles(hopper, ampere):
    from transmatcher_fast.kernels import max_sim as kernels

    import torch

    names = {"forward", "backward_query", "backward_gallery"}
    for rows, precisions in ((hopper, ("fp16", "fp32-tf32")), (ampere, ("fp16",))):
        for precision in precisions:
            got = [r for r in rows if r["precision"] == precision and r["geometry"] == "aligned"]
            assert names <= {r["kernel"] for r in got}, (precision, got)
    dtype = {"fp16": torch.float16, "fp32-tf32": torch.float32}
    for precision in ("fp16", "fp32-tf32"):
        expected = {c.name for c in kernels.forward_candidates(192, 192, 512, dtype[precision])}
        compiled = {r["config"] for r in hopper if r["kernel"] == "forward"
                    and r["precision"] == precision and r["geometry"] == "aligned"}
        assert compiled == expected
        assert {"tiled", "strip", "pairs"} == {n.split("-")[0] for n in compiled}


def test_hopper_ptx_uses_wgmma_and_ampere_ptx_mma(hopper, ampere):
    for row in hopper:
        assert row["wgmma"] or not row["has_dot"], row
    for row in ampere:
        assert (row["mma"] and not row["wgmma"]) or not row["has_dot"], row


def test_aligned_16bit_loads_are_asynchronous_copies(hopper):
    """With 16-byte aligned pointers and D = 512 the forward's tiles arrive by cp.async into a
    multi-stage shared-memory ring (48 KB at 3 stages); without the specialisation the compile
    showed neither (16 KB, plain loads), so this also checks that the report is specialised."""
    forward = [r for r in hopper if r["kernel"] == "forward" and r["precision"] == "fp16"]
    for row in forward:
        if row["geometry"] == "aligned":
            assert row["cp_async"] and row["shared_bytes"] >= 32768, row
        else:
            assert not row["cp_async"], row  # D % 16 != 0: rows are not 16-byte aligned


def test_nothing_the_gpu_runs_spills_on_hopper(hopper):
    for row in hopper:
        assert not row["spills"], row


def test_the_static_measure_is_recorded_for_every_forward_candidate(hopper, ampere):
    """Per forward candidate, in the same JSON entry: the SASS measure (epilogue and MMA
    instructions per score element), the tensor-core family and target, registers, shared
    memory, spills and the analytic L2 bytes per FLOP; the "pairs" candidates compile to wgmma
    for sm_90."""
    for rows, family, sm in ((hopper, "wgmma", "sm_90"), (ampere, "mma", "sm_80")):
        forward = [r for r in rows if r["kernel"] == "forward" and r["geometry"] == "aligned"]
        assert forward and any(r["variant"] == "pairs" for r in forward)
        for row in forward:
            assert row["tensor_cores"] == family and row["sm"] == sm, row
            assert row["epilogue_instructions_per_score"] > 0, row
            assert row["mma_instructions_per_score"] > 0, row
            assert 0 < row["l2_bytes_per_flop"] < 1, row
            for key in ("registers", "shared_bytes", "spills"):
                assert key in row, (key, row)


def test_pairs_epilogue_issues_fewer_instructions_than_the_default(hopper):
    """The point of the "pairs" candidate, read off its SASS: fewer non-MMA, non-memory
    instructions per score element than the default tiled kernel."""
    from transmatcher_fast.kernels import max_sim as kernels

    import torch

    for precision, dtype in (("fp16", torch.float16), ("fp32-tf32", torch.float32)):
        rows = {r["config"]: r for r in hopper if r["kernel"] == "forward"
                and r["precision"] == precision and r["geometry"] == "aligned"}
        default = rows[kernels.forward_config(192, 192, 512, dtype).name]
        pairs = min(r["epilogue_instructions_per_score"] for r in rows.values()
                    if r["variant"] == "pairs")
        assert pairs < default["epilogue_instructions_per_score"], (pairs, default)


def test_the_tma_candidate_loads_its_tiles_through_tma_on_hopper(hopper):
    """The "pairs" candidate with tensor descriptors compiles to TMA loads (UTMALDG in the
    sm_90 SASS, cp.async.bulk.tensor in the PTX) in every tensor-core precision; the others
    have none."""
    forward = [r for r in hopper if r["kernel"] == "forward" and r["geometry"] == "aligned"
               and r["precision"] != "fp32-ieee"]
    tma = [r for r in forward if r["config"].endswith("-tma")]
    assert {r["precision"] for r in tma} == {"fp16", "fp32-tf32"}  # those the fixture compiles
    for row in forward:
        assert row["tma"] == (row in tma) == (row["tma_loads_in_sass"] > 0), row


def test_the_measure_reads_the_tile_loop_off_the_back_branches():
    """A listing with a tile loop around a K loop (HGMMA inside), a forward branch and the
    trailing self-branch: the K loop counts per iteration, the rest of the tile loop once."""
    sys.path.insert(0, str(SCRIPT.parent))
    import triton_resources

    listing = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        "        /*0010*/                   FMUL R2, R2, R3 ;",           # tile loop starts
        "        /*0020*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], R24 ;",  # K loop
        "        /*0030*/                   IADD3 R4, R4, 0x1, RZ ;",
        "        /*0040*/                   LDG.E R5, desc[UR6][R6.64] ;",
        "        /*0050*/               @P0 BRA 0x20 ;",
        "        /*0060*/               @P1 BRA 0x80 ;",               # forward: not a loop
        "        /*0070*/                   FMNMX R7, R7, R8, !PT ;",
        "        /*0080*/                   STG.E desc[UR6][R6.64], R7 ;",
        "        /*0090*/               @P2 BRA 0x10 ;",
        "        /*00a0*/                   EXIT ;",
        "        /*00b0*/                   BRA 0xb0;",
    ])
    measure = triton_resources.tile_loop_measure(listing, k_iterations=4, threads=2,
                                                 scores_per_tile=8)
    assert measure["tile_loop_sass"] == ["0x10", "0x90"]
    assert measure["k_loop_sass"] == ["0x20", "0x50"]
    # Once per tile: FMUL, BRA (forward), FMNMX, BRA (back) = 4; per K step: IADD3, BRA = 2.
    assert measure["epilogue_instructions_per_score"] == 4 * 2 / 8
    assert measure["k_loop_instructions_per_score"] == 2 * 4 * 2 / 8
    assert measure["mma_instructions_per_score"] == 1 * 4 * 2 / 8


def test_the_ncu_ablations_compile_for_hopper_without_spills(tmp_path_factory):
    """The GPU suite's ncu ablations (kernels.max_sim.ABLATIONS: constexpr switches inside each
    forward kernel) compile for sm_90 in bf16 (the ncu cases' dtype) for every variant, with
    wgmma, no spills, and an epilogue that shrinks as the ablations leave work out."""
    from transmatcher_fast.kernels import max_sim as kernels

    flags = ["--target", "sm_90", "--precision", "bf16", "--geometry", "aligned"]
    for ablation in kernels.ABLATIONS:
        flags += ["--ablation", ablation]
    rows = _compile(tmp_path_factory, *flags)
    assert {(r["ablation"], r["variant"]) for r in rows} == {
        (a, v) for a in kernels.ABLATIONS for v in kernels.VARIANTS}
    epilogue = {(r["ablation"], r["variant"]): r["epilogue_instructions_per_score"] for r in rows}
    for row in rows:
        assert row["kernel"] == "forward" and row["wgmma"] and not row["spills"], row
    for variant in kernels.VARIANTS:
        assert (epilogue[("mma_only", variant)] < epilogue[("max_only", variant)]
                < epilogue[("gate_off", variant)]), (variant, epilogue)
