"""``lk3d estimate`` (``lk3d.tools.estimate``): the issue ceiling against the hand readings of the
SASS, the recorded launches and their specialisation, and the command on a tiny dense case
compiled for sm_90."""
import math

import pytest

pytest.importorskip("triton")

from lk3d.tools import estimate  # noqa: E402  (after the skip: it imports triton)

# The figures the hand readings used: 132 SMs at 1.98 GHz, bf16 tensor 790 TFLOP/s (measured),
# fp32 FMA 67 TFLOP/s, 4.3 TB/s.
H200_READ = dict(estimate.device_figures(90), tensor_tflops={"bf16": 790.0}, fma_tflops=67.0,
                 bandwidth_tbs=4.3)


def test_issue_ceiling_matches_hand_readings():
    # Implicit GEMM 128x64x32 on 4 warps: 438 instructions a step for 2*128*64*32 FLOPs.
    r = estimate.issue_ceiling(438, 4, 2 * 128 * 64 * 32, "tensor", H200_READ, "bf16",
                               flops=1e15, nbytes=1e6)
    assert r["issue"] == pytest.approx(313, rel=0.01)
    assert r["ceiling"] == r["issue"] and r["fraction"] == pytest.approx(0.396, rel=0.01)
    # Depthwise BLOCK 256 on 8 warps: 31 instructions for 2 FFMA per lane (2 FLOPs each).
    r = estimate.issue_ceiling(31, 8, 2 * 2 * 32 * 8, "fma", H200_READ, "bf16",
                               flops=1e15, nbytes=1e6)
    assert r["issue"] == pytest.approx(4.3, rel=0.01)
    assert r["fraction"] == pytest.approx(4.3 / 67, rel=0.01)


def test_issue_ceiling_caps():
    device = estimate.device_figures(90)
    # A step of one instruction per warp could issue far past the peak: the peak caps it.
    r = estimate.issue_ceiling(1, 4, 2 * 128 * 64 * 32, "tensor", device, "bf16", 1e15, 1e6)
    assert r["ceiling"] == r["peak"] == 989.4 and r["fraction"] == 1.0
    # 1 FLOP per byte at 3.35 TB/s: 3.35 TFLOP/s whatever the loop.
    r = estimate.issue_ceiling(100, 4, 2 * 128 * 64 * 32, "tensor", device, "bf16", 1e9, 1e9)
    assert r["ceiling"] == r["bandwidth"] == pytest.approx(3.35)
    assert math.isclose(r["fraction"], 3.35 / 989.4, rel_tol=1e-9)
    with pytest.raises(ValueError, match="arch: expected one of \\[80, 90\\], got 75"):
        estimate.device_figures(75)
    with pytest.raises(ValueError, match="unit: expected 'tensor' or 'fma', got 'sfu'"):
        estimate.peak_tflops(device, "sfu", "bf16")
