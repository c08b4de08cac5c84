"""benchmarks/sass_measure.py on hand-written SASS snippets (no nvcc, no GPU)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import sass_measure as sm  # noqa: E402

# cuobjdump style: hex branch targets, encodings on the next line. An outer loop (0x0020..0x00c0)
# holds an inner K loop (0x0030..0x0070) with two HGMMA, one trap self-branch after EXIT.
CUOBJDUMP = """
\t\tFunction : kernel_a
\t.headerflags\t@"EF_CUDA_SM90"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                    /* 0x00000a00ff017b82 */
                                                                             /* 0x000ff00000000800 */
        /*0010*/                   MOV R2, RZ ;                              /* 0x000000ff00027202 */
        /*0020*/                   S2R R0, SR_TID.X ;                        /* 0x0000000000007919 */
        /*0030*/                   UTMALDG.2D [UR8], [UR4] ;                 /* 0x00000000000075b4 */
        /*0040*/                   WARPGROUP.ARRIVE ;                        /* 0x00000000000079c8 */
        /*0050*/                   HGMMA.64x192x16.F32.BF16 R24, gdesc[UR8], R24 ;  /* 0x0 */
        /*0060*/                   HGMMA.64x192x16.F32.BF16 R24, gdesc[UR12], R24, gsb0 ;  /* 0x0 */
        /*0070*/              @!P0 BRA 0x30 ;                                /* 0xfffffff400888947 */
        /*0080*/                   FMNMX R3, R24, R25, !PT ;                 /* 0x0 */
        /*0090*/                   SHFL.BFLY PT, R4, R3, 0x1, 0x1f ;         /* 0x0 */
        /*00a0*/                   STG.E [R6.64], R3 ;                       /* 0x0 */
        /*00b0*/                   ISETP.NE.AND P1, PT, R2, 0x4, PT ;        /* 0x0 */
        /*00c0*/               @P1 BRA 0x20 ;                                /* 0x0 */
        /*00d0*/                   EXIT ;                                    /* 0x0 */
        /*00e0*/                   BRA 0xe0;                                 /* 0x0 */
\t\t..........

\t\tFunction : kernel_b
        /*0000*/                   EXIT ;                                    /* 0x0 */
\t\t..........
"""

# nvdisasm style: label targets.
NVDISASM = """
        /*0000*/                   MOV R2, RZ ;
.L_x_0:
        /*0010*/                   LDS.128 R4, [R0] ;
        /*0020*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0030*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0040*/                   ISETP.NE.AND P0, PT, R2, 0x8, PT ;
        /*0050*/               @P0 BRA `(.L_x_0) ;
        /*0060*/                   EXIT ;
"""


def test_classify():
    assert sm.classify("HGMMA.64x192x16.F32.BF16") == sm.TENSOR_CORE
    assert sm.classify("HMMA.16816.F32.BF16") == sm.TENSOR_CORE
    assert sm.classify("WARPGROUP.DEPBAR.LE") == sm.TENSOR_CORE
    for op in ("LDG.E.128", "LDS", "LDSM.16.M88.4", "STS.64", "STG.E", "LDC.64", "ULDC", "UTMALDG.2D",
               "LDGSTS.E.BYPASS.128", "ATOMG.E.ADD", "STL"):
        assert sm.classify(op) == sm.LOAD_STORE, op
    for op in ("FMNMX", "HMNMX2", "SHFL.BFLY", "BAR.SYNC", "BRA", "SEL", "ISETP.NE.AND", "SYNCS.ARRIVE"):
        assert sm.classify(op) == sm.OTHER, op


def test_split_and_parse_cuobjdump():
    funcs = sm.split_functions(CUOBJDUMP)
    assert list(funcs) == ["kernel_a", "kernel_b"]
    ins = sm.parse_sass(funcs["kernel_a"])
    assert [i.address for i in ins] == list(range(0, 0xF0, 0x10))
    br = ins[7]
    assert (br.opcode, br.predicate, br.target) == ("BRA", "@!P0", 0x30)
    assert ins[5].opcode == "HGMMA.64x192x16.F32.BF16" and ins[5].base == "HGMMA"
    assert len(sm.parse_sass(funcs["kernel_b"])) == 1


def test_blocks_and_loops():
    ins = sm.parse_sass(sm.split_functions(CUOBJDUMP)["kernel_a"])
    starts = [b[0].address for b in sm.basic_blocks(ins)]
    assert starts == [0x0, 0x20, 0x30, 0x80, 0xD0, 0xE0]
    loops = sm.find_loops(ins)
    assert [(lp.start, lp.end, lp.depth) for lp in loops] == [(0x20, 0xC0, 0), (0x30, 0x70, 1)]
    outer, inner = loops
    assert outer.inner == [inner]
    assert inner.counts() == {sm.TENSOR_CORE: 3, sm.LOAD_STORE: 1, sm.OTHER: 1}
    assert outer.counts() == {sm.TENSOR_CORE: 3, sm.LOAD_STORE: 2, sm.OTHER: 6}
    # Inner loop runs 8 times per outer iteration: its BRA counts 8 times among "other".
    per_iter = sm.loop_counts(outer, {inner.start: 8})
    assert per_iter == {sm.TENSOR_CORE: 24, sm.LOAD_STORE: 9, sm.OTHER: 5 + 8}
    # 128 threads, a 64x192 tile per outer iteration.
    assert sm.per_score(per_iter[sm.OTHER], threads=128, scores=64 * 192) == pytest.approx(13 * 128 / 12288)
    assert sm.per_score(2, threads=128, scores=64, iterations=4) == 16


def test_nvdisasm_labels():
    ins = sm.parse_sass(NVDISASM)
    assert ins[5].target == 0x10
    (loop,) = sm.find_loops(ins)
    assert (loop.start, loop.end) == (0x10, 0x50)
    assert sm.loop_counts(loop) == {sm.TENSOR_CORE: 1, sm.LOAD_STORE: 1, sm.OTHER: 3}
