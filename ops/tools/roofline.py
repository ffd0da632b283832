"""Roofline helpers: the work a 3D convolution must do, and the ceilings of this machine.

A convolution of input ``[N, Cin, D, H, W]`` with weight ``[Cout, Cin/g, kd, kh, kw]`` into
``[N, Cout, OD, OH, OW]`` is a GEMM with M = N·OD·OH·OW, N = Cout, K = Cin/g·kd·kh·kw:

* FLOPs (``conv3d_flops``): ``2·N·Cout·OD·OH·OW·(Cin/g)·kd·kh·kw`` for the forward (a multiply
  and an add per tap; the bias is not counted). ``bwd`` is twice that and ``fwdbwd`` three times:
  grad-input and grad-weight are each a convolution of the same size.
* Bytes (``conv3d_bytes``): the least memory traffic any algorithm needs, each tensor moved once,
  times the element size. Forward: read the input, the weight and the bias, write the output.
  ``bwd`` is the backward alone: read the input, the weight and grad-output, write grad-input,
  grad-weight and grad-bias (no saved workspace, no recomputation counted); ``fwdbwd`` both.
* A rank-R CP kernel (``cp_flops``, ``cp_bytes``) needs, per output voxel, the factored sequence's
  ``2·R·(Cin + kd + kh + kw + Cout)`` FLOPs (stride 1: each of the four stages once per voxel),
  and the traffic of the input, the output and the factors. A block-sparse kernel needs the
  dense count times its density, and moves its stored blocks instead of the dense weight
  (``weight_elems``).

The ceilings (``measure_ceilings``) are measured, not taken from a datasheet: FLOP/s of a large
square matmul in the case's dtype (float32 on the CPU; on CUDA float32 runs as TF32 exactly when
``torch.backends.cudnn.allow_tf32`` lets ``F.conv3d`` use it; on the CPU the faster of
``torch.mm`` (MKL) and oneDNN's GEMM, the library behind ``F.conv3d``: on a 2-core AMD EPYC MKL's
sgemm ran at 0.2 TFLOP/s, oneDNN's at 0.43 and oneDNN's dense 7³ convolution at 0.54, so an MKL
ceiling alone put convolutions far above 100%), and bytes/s of a large
device-to-device tensor copy (read + write), each the fastest of its repetitions.
``roofline_fraction`` is the time the roofline allows
over the time measured: ``max(flops / peak_flops, bytes / peak_bw) / seconds`` (1.0: at the
ceiling; it can pass 1 where an algorithm does less work than the direct count, e.g. FFT).
"""
import math
from typing import NamedTuple, Optional, Sequence

import torch

from lk3d._algos import allow_tf32
from lk3d.autotune.timing import repeat_ms

MODES = ("fwd", "bwd", "fwdbwd")
_PASSES = {"fwd": 1, "bwd": 2, "fwdbwd": 3}  # convolutions of the forward's size per mode

# Ceiling measurements: sizes that reach steady state but stay well inside memory, and timed
# repetitions short enough that the CPU measurement takes < 2 s in all.
_MATMUL_N = {"cpu": 1024, "cuda": 8192}
_COPY_MIB = {"cpu": 64, "cuda": 1024}
_MIN_RUN_TIME_S = {"cpu": 0.25, "cuda": 0.1}


class Ceilings(NamedTuple):
    """Measured peaks of one device: FLOP/s of a matmul (in ``dtype``) and copy bytes/s."""
    flops_per_s: float
    bytes_per_s: float
    dtype: str = "float32"


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def conv3d_flops(N: int, cin: int, cout: int, groups: int, out_size: Sequence[int],
                 kernel: Sequence[int], mode: str = "fwd") -> int:
    """FLOPs of one step: ``2·N·Cout·OD·OH·OW·(Cin/g)·kd·kh·kw``; twice that for bwd, three
    times for fwdbwd."""
    _check_mode(mode)
    if cin % groups:
        raise ValueError(f"groups={groups} must divide cin={cin}")
    fwd = 2 * N * cout * math.prod(out_size) * (cin // groups) * math.prod(kernel)
    return _PASSES[mode] * fwd


def cp_flops(N: int, cin: int, cout: int, rank: int, out_size: Sequence[int],
             kernel: Sequence[int], mode: str = "fwd") -> int:
    """FLOPs of a rank-R CP convolution's factored sequence, ``2·N·OD·OH·OW·R·(Cin + kd + kh +
    kw + Cout)``; twice that for bwd, three times for fwdbwd."""
    _check_mode(mode)
    fwd = 2 * N * math.prod(out_size) * rank * (cin + sum(kernel) + cout)
    return _PASSES[mode] * fwd


def conv3d_bytes(N: int, cin: int, cout: int, groups: int, in_size: Sequence[int],
                 out_size: Sequence[int], kernel: Sequence[int], mode: str = "fwd",
                 bias: bool = True, elem_size: int = 4,
                 weight_elems: Optional[int] = None) -> int:
    """Least bytes moved by one step (see the module docstring for the model); ``weight_elems``
    replaces the dense weight's element count (CP factors, stored sparse blocks)."""
    _check_mode(mode)
    if cin % groups:
        raise ValueError(f"groups={groups} must divide cin={cin}")
    x = N * cin * math.prod(in_size)
    w = cout * (cin // groups) * math.prod(kernel) if weight_elems is None else weight_elems
    b = cout if bias else 0
    y = N * cout * math.prod(out_size)
    fwd = x + w + b + y                   # forward: read x, w, b; write y
    bwd = (x + w + y) + (x + w + b)       # backward: read x, w, grad_y; write the grads
    elems = {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]
    return elems * elem_size


def roofline_fraction(flops: float, nbytes: float, seconds: float,
                      ceilings: Ceilings) -> Optional[float]:
    """The roofline's time over the measured time; None where nothing was measured."""
    if seconds is None or not seconds > 0 or ceilings is None:
        return None
    bound = max(flops / ceilings.flops_per_s, nbytes / ceilings.bytes_per_s)
    return bound / seconds


def _best_s(fn, device: torch.device, min_run_time: float) -> float:
    """Seconds of ``fn()``: the fastest repetition (CUDA) or block of repetitions (CPU), since a
    ceiling is the best the machine does (on a shared machine the median drifts with its
    neighbours: copy bandwidth of one 2-core VM ranged 17-86 GB/s within minutes)."""
    fn()  # warm-up: allocator, oneDNN / cuBLAS heuristics
    return repeat_ms(fn, device, min_run_time, stat="min", warmup_ms=10) * 1e-3


def measure_ceilings(device="cpu", dtype: Optional[torch.dtype] = None) -> Ceilings:
    """FLOP/s of a large matmul in ``dtype`` (default: float32 on the CPU, bfloat16 on CUDA) and
    bytes/s of a large tensor copy on ``device``. CPU: about 1.5 s; CUDA: well under that."""
    device = torch.device(device)
    dev = device.type
    if dev not in _MATMUL_N:
        raise ValueError(f"device: expected cpu or cuda, got {device}")
    if dtype is None:
        dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    n, t = _MATMUL_N[dev], _MIN_RUN_TIME_S[dev]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    if dev == "cuda":  # fp32 convolutions run as TF32 exactly when cuDNN may use it
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32()
    try:
        matmul_s = _best_s(lambda: torch.mm(a, b, out=out), device, t)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    if dev == "cpu":  # oneDNN's GEMM where torch has it: twice MKL's sgemm on an AMD EPYC
        onednn = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
        try:
            matmul_s = min(matmul_s, _best_s(lambda: onednn(a, b, None, "none", [], ""),
                                             device, t))
        except Exception:  # not built with oneDNN, or the private op changed: MKL's rate
            pass
    del a, b, out

    elems = _COPY_MIB[dev] * 2**20 // 4
    src = torch.ones(elems, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_s = _best_s(lambda: dst.copy_(src), device, t)
    nbytes = 2 * src.numel() * src.element_size()  # read + write
    del src, dst
    return Ceilings(flops_per_s=2 * n**3 / matmul_s, bytes_per_s=nbytes / copy_s,
                    dtype=str(dtype).removeprefix("torch."))


def measure_ceilings_by_name(device: str, dtype: str) -> Ceilings:
    """``measure_ceilings`` with the dtype by name (for a worker process: plain arguments)."""
    ceilings = measure_ceilings(device, getattr(torch, dtype))
    if device == "cuda":
        torch.cuda.empty_cache()
    return ceilings
