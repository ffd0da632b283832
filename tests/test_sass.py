"""The innermost loop of a kernel's SASS and its counts by class (``lk3d.tools.sass``): on a
short SASS text with a known loop nest, and on a small ``tl.dot`` loop compiled ahead of time for
sm_90 (HGMMA in the loop) and sm_80 (HMMA)."""
import os

import pytest

pytest.importorskip("triton")

from lk3d.tools import aot, sass  # noqa: E402  (after the skip: they import triton)

# An outer loop 0x0040..0x00e0 holding an inner one 0x0060..0x00a0 with the math, a forward
# branch, and the trap after EXIT (a branch to itself, no loop).
SYNTHETIC = """
        Function : k
        /*0000*/                   MOV R1, c[0x0][0x28] ;                 /* 0x00000a0000017a02 */
        /*0010*/                   S2R R0, SR_TID.X ;                     /* 0x0000000000007919 */
        /*0020*/                   ISETP.GE.AND P0, PT, R0, 0x1, PT ;     /* 0x0000000000007919 */
        /*0030*/              @!P0 BRA 0x100 ;                            /* 0x0000000000007919 */
        /*0040*/                   IMAD R2, R0, 0x4, RZ ;                 /* 0x0000000000007919 */
        /*0050*/                   LDG.E R3, desc[UR4][R2.64] ;           /* 0x0000000000007919 */
        /*0060*/                   LDG.E.U16 R4, desc[UR4][R2.64+0x2] ;   /* 0x0000000000007919 */
        /*0070*/                   FFMA R5, R4, R3, R5 ;                  /* 0x0000000000007919 */
        /*0080*/                   FFMA R6, R4, R3, R6 ;                  /* 0x0000000000007919 */
        /*0090*/                   IADD3 R7, R7, 0x1, RZ ;                /* 0x0000000000007919 */
        /*00a0*/               @P1 BRA 0x60 ;                             /* 0x0000000000007919 */
        /*00b0*/                   IMAD.WIDE R2, R0, 0x4, R2 ;            /* 0x0000000000007919 */
        /*00c0*/                   ISETP.NE.AND P2, PT, R7, RZ, PT ;      /* 0x0000000000007919 */
        /*00d0*/                   NOP ;                                  /* 0x0000000000007919 */
        /*00e0*/               @P2 BRA `(.L_x_1) ;                        /* 0x0000000000007919 */
        /*00f0*/                   STG.E [R2.64], R5 ;                    /* 0x0000000000007919 */
        /*0100*/                   EXIT ;                                 /* 0x0000000000007919 */
.L_x_2:
        /*0110*/                   BRA `(.L_x_2);                         /* 0x0000000000007919 */
"""


def test_synthetic_loops():
    # The label form of a target: .L_x_1 names 0x0040, the head of the outer loop.
    text = SYNTHETIC.replace("        /*0040*/", ".L_x_1:\n        /*0040*/")
    found = sass.loops(text)
    assert [(lp.start, lp.end, lp.instructions) for lp in found] == [(0x60, 0xA0, 5),
                                                                     (0x40, 0xE0, 11)]
    inner = sass.innermost_loop(text)
    assert (inner.start, inner.end) == (0x60, 0xA0)
    assert inner.counts() == {"FFMA": 2, "LDG": 1, "IADD3": 1, "BRA": 1}
    assert sass.step_flops(inner, num_warps=2) == (2 * 2 * 32 * 2, "fma")


def test_synthetic_reduction_loop_over_epilogue_loop():
    # A smaller sibling loop after the inner one, with math and a store but no load: an
    # epilogue; the loop that loads its operands is the reduction.
    epilogue = """
        /*0100*/                   FFMA R5, R5, R3, RZ ;                  /* 0x0000000000007919 */
        /*0110*/                   STG.E [R2.64], R5 ;                    /* 0x0000000000007919 */
        /*0120*/               @P3 BRA 0x100 ;                            /* 0x0000000000007919 */
        /*0130*/                   EXIT ;                                 /* 0x0000000000007919 */
"""
    text = SYNTHETIC.split("        /*0100*/")[0].replace("`(.L_x_1)", "0x40") + epilogue
    assert [(lp.start, lp.instructions) for lp in sass.loops(text)] == [(0x100, 3), (0x60, 5),
                                                                       (0x40, 11)]
    loop = sass.innermost_loop(text)
    assert (loop.start, loop.end) == (0x60, 0xA0)
    # Without the load, the smaller of the two innermost hot loops.
    loop = sass.innermost_loop(text.replace("LDG.E.U16 R4", "MOV R4"))
    assert (loop.start, loop.end) == (0x100, 0x120)


def test_synthetic_wait_retry_after_exit_is_no_loop():
    # A barrier wait's retry placed after EXIT that branches back into the inner loop (as
    # Triton's pipelined TMA loops compile): its span holds the EXIT, so it is no loop.
    retry = """
        /*0120*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [R2+0x10], R4 ; /* 0x0 */
        /*0130*/              @!P1 BRA 0x120 ;                            /* 0x0000000000007919 */
        /*0140*/                   BRA 0x70 ;                             /* 0x0000000000007919 */
"""
    text = SYNTHETIC.replace("`(.L_x_1)", "0x40").split(".L_x_2:")[0] + retry
    assert [(lp.start, lp.end) for lp in sass.loops(text)] == [(0x120, 0x130), (0x60, 0xA0),
                                                              (0x40, 0xE0)]
    assert (sass.innermost_loop(text).start, sass.innermost_loop(text).end) == (0x60, 0xA0)


def test_synthetic_hot_instructions_choose_the_loop():
    # With the math moved out of the inner loop into the outer one, the outer loop is the hot one.
    text = SYNTHETIC.replace("FFMA R5", "IMAD R5").replace("FFMA R6", "IMAD R6").replace(
        "IMAD.WIDE R2", "FFMA R2").replace("`(.L_x_1)", "0x40")
    loop = sass.innermost_loop(text)
    assert (loop.start, loop.end) == (0x40, 0xE0)
    assert loop.counts()["FFMA"] == 1 and loop.counts()["NOP"] == 1
    assert sass.innermost_loop("no sass here") is None


SIGNATURE = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "K": "i32",
             "stride_am": "i32", "stride_bk": "i32", "BLOCK_M": "constexpr",
             "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
TILE = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)


@pytest.mark.xdist_group("aot")
@pytest.mark.skipif(not os.path.exists(aot.CUOBJDUMP),
                    reason=f"no cuobjdump bundled with triton at {aot.CUOBJDUMP}")
def test_dot_loop_compiled(monkeypatch):
    """The tl.dot loop's innermost loop holds the tensor-core instructions of one BLOCK_K step:
    64·64·32 multiply-adds per step either way."""
    import _sass_probe

    here = os.path.dirname(os.path.abspath(__file__))  # the compile children import the probe
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (
        here, os.environ.get("PYTHONPATH")))))
    jobs = [(_sass_probe.dot_loop_kernel, SIGNATURE, TILE, arch, 4, 3) for arch in (90, 80)]
    sm90, sm80 = aot.compile_many(jobs, processes=1)
    for compiled, mma in ((sm90, "HGMMA"), (sm80, "HMMA")):
        if isinstance(compiled, Exception):
            raise compiled
        text = aot.sass(compiled)
        loop = sass.innermost_loop(text)
        counts = loop.counts()
        assert counts.get(mma, 0) >= 1, (mma, counts)
        assert counts["LDG"] >= 1 and counts["BRA"] == 1
        assert sum(counts.values()) == loop.instructions < len(sass.parse(text))
        assert sass.step_flops(loop, num_warps=4) == (2 * 64 * 64 * 32, "tensor")
    assert "HGMMA" not in sass.innermost_loop(aot.sass(sm80)).counts()
