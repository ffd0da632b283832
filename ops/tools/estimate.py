"""``lk3d estimate``: what lk3d's Triton kernels can reach on a GPU, read from their machine code
without one.

For a convolution and each of its passes, the launcher is called on ``device="meta"`` tensors with
its kernels swapped for recorders (``record``): that gives the exact launch it makes (kernel,
arguments, grid, warps, stages) for the default config of the arch. Each launch is compiled ahead
of time for ``sm_<arch>`` with the JIT's specialisation of its arguments (ints equal to 1 become
constexprs, ints divisible by 16 and 16-byte-aligned pointers are marked so: ``specialize``), its
registers, spills and shared memory are read from the cubin (``lk3d.tools.aot``) and the
innermost loop from the SASS (``lk3d.tools.sass``).

The **issue ceiling** (``issue_ceiling``) is the FLOP rate the kernel cannot exceed: an SM issues
at most 4 warp-instructions per clock, so a loop step of I instructions per warp on W warps takes
at least I·W/4 clocks per program, during which the program does the step's FLOPs (read off the
SASS: ``sass.step_flops``). That rate over every SM, capped by the unit's peak (tensor cores or
FP32 FMA) and by the bytes the launch must move at the device's bandwidth, is the ceiling; its
fraction of the peak says how far the kernel's code, not the memory system, keeps it from the
unit. A necessary condition only: latency and occupancy can keep a kernel below its ceiling.

    lk3d estimate --arch 90 --input 1,64,64,64,64 --weight 64,64,7,7,7 --dtype bf16 --padding same
"""
import argparse
import dataclasses
import inspect
import json
import math
import sys
from dataclasses import dataclass

import torch
import triton

from lk3d.tools import aot, sass

PASSES = ("forward", "grad_input", "grad_weight")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Device figures per arch, until a table of named GPUs replaces ``device_figures``.
# H100 SXM (sm_90): 132 SMs; max boost clock 1.98 GHz; dense bf16/fp16 tensor 989.4 TFLOP/s, tf32
# 494.7, fp32 FMA 66.9, HBM3 3.35 TB/s (NVIDIA H100 Tensor Core GPU datasheet, SXM column; the
# datasheet's sparsity figures halved). A100 80GB SXM (sm_80): 108 SMs, boost 1.41 GHz (NVIDIA
# A100 Tensor Core GPU Architecture whitepaper); dense bf16/fp16 tensor 312 TFLOP/s, tf32 156,
# fp32 FMA 19.5, HBM2e 2.039 TB/s (NVIDIA A100 datasheet, 80GB SXM column). Shared memory: the
# per-block opt-in limit (``aot.SHARED_LIMIT``).
_DEVICES = {
    90: dict(name="H100 SXM", sms=132, clock_ghz=1.98, fma_tflops=66.9, bandwidth_tbs=3.35,
             tensor_tflops={"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    80: dict(name="A100 80GB SXM", sms=108, clock_ghz=1.41, fma_tflops=19.5, bandwidth_tbs=2.039,
             tensor_tflops={"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
}
ISSUE_PER_CLOCK = 4  # warp-instructions an SM issues per clock (4 schedulers, 1 each)


def device_figures(arch):
    """SMs, clock (GHz), peaks (TFLOP/s), bandwidth (TB/s) and shared-memory limit (bytes) of the
    GPU the estimate for ``sm_<arch>`` assumes."""
    if arch not in _DEVICES:
        raise ValueError(f"arch: expected one of {sorted(_DEVICES)}, got {arch!r}")
    return dict(_DEVICES[arch], arch=arch, smem_limit=aot.SHARED_LIMIT[arch])


def peak_tflops(device, unit, dtype):
    """The peak of ``unit`` ("tensor" or "fma") for operands of ``dtype`` ("bf16", ...)."""
    if unit == "tensor":
        return device["tensor_tflops"][dtype]
    if unit == "fma":
        return device["fma_tflops"]
    raise ValueError(f"unit: expected 'tensor' or 'fma', got {unit!r}")


def issue_ceiling(loop_instructions, num_warps, step_flops, unit, device, dtype, flops, nbytes):
    """The FLOP rates (TFLOP/s) a launch cannot exceed, as a dict: ``issue`` (``step_flops`` per
    program every ``loop_instructions`` · ``num_warps`` / 4 clocks, on every SM), ``bandwidth``
    (``flops`` over the time ``nbytes`` take at the device's bandwidth), ``peak`` (the unit's),
    ``ceiling`` (the least of the three) and ``fraction`` (ceiling / peak)."""
    clocks = loop_instructions * num_warps / ISSUE_PER_CLOCK
    issue = step_flops / clocks * device["sms"] * device["clock_ghz"] * 1e9 / 1e12
    seconds = nbytes / (device["bandwidth_tbs"] * 1e12)
    bandwidth = flops / seconds / 1e12 if seconds else math.inf
    peak = peak_tflops(device, unit, dtype)
    ceiling = min(peak, issue, bandwidth)
    return dict(issue=issue, bandwidth=bandwidth, peak=peak, ceiling=ceiling,
                fraction=ceiling / peak)
