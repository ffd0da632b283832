"""The CUDA cost models' rates: every CUDA candidate's modelled time comes from the device's
figures (``lk3d.autotune.devices.Figures``: a named GPU or the local one), never from the host.

    lk3d's Triton kernels   FLOPs at a fraction of the unit's peak per kernel kind: the kernels'
                            issue ceilings for the device's SM version (``ceilings``, shipped
                            in lk3d/autotune/ceilings.json), floored by the bytes they must move
    aten (cuDNN)            FLOPs at a fraction of the peak per op kind (``ATEN_FRACTION``),
                            floored by the bytes they must move
    the FFT (lk3d.fft)      its passes' FLOPs at the FP32 FMA rate and bytes at the bandwidth,
                            counted from ``lk3d.fft.fft_features`` for the transform lengths the
                            algorithm runs with (``lk3d.fft.plan_tiles``)

Measured plans (the plan cache, ``lk3d tune``) override these, as they do any model.
"""
import functools
import json
import math
from importlib import resources

import torch

from lk3d import fft

# lk3d's kernels: the kernel kinds the cost models price, each at a fraction of one unit's peak
# (tensor cores or FP32 FMA): its issue ceiling, read from the kernels' machine code for the
# device's SM version by `lk3d estimate` over the goal cases and shipped as data
# (lk3d/autotune/ceilings.json; ``ceilings``). A ceiling is a bound, not a speed: the model takes
# it as the rate until a GPU measures the kernels.
KERNEL_KINDS = ("implicit_gemm",        # dense/grouped forward and grad-input, gathered
                "implicit_gemm_desc",   # ... on tensor descriptors (lk3d.kernels.implicit_gemm)
                "implicit_gemm_wgrad",  # dense/grouped grad-weight, gathered
                "implicit_gemm_desc_wgrad",  # ... on tensor descriptors
                "depthwise",            # depthwise forward and grad-input
                "depthwise_cl",         # ... channels innermost (lk3d.kernels.depthwise)
                "depthwise_wgrad",      # depthwise grad-weight
                "depthwise_cl_wgrad",   # ... channels innermost (lk3d.kernels.depthwise)
                "cp_fused",             # the fused k³ CP kernels, forward and backward
                "cp_separable_tensor",  # separable CP: projections through a factor matrix
                "cp_separable_fma",     # separable CP: the 1-D passes along one axis
                "block_sparse_16x16",   # block-sparse 16x16 channel blocks, forward, grad-input
                "block_sparse_16x16_wgrad",  # ... and grad-values
                "block_sparse_desc",  # channel blocks on tensor descriptors, forward, grad-input
                "block_sparse_desc_wgrad")  # ... and grad-values
CEILINGS_FILE = "ceilings.json"  # in lk3d.autotune
# A ceiling above what any kernel sustains is taken at that: the best sustained rate measured on
# these GPUs, a bf16 8192³ matmul through PyTorch on an H200, 788 of 989 TFLOP/s (80%).
SUSTAINED_FRACTION = 0.8

# aten (cuDNN) by op kind and unit, as fractions of the device's peak: guesses until measured.
# Dense 16-bit (and fp32 with TF32) on the tensor cores; fp32 without TF32 on the FMA units;
# depthwise 3D on the FMA units at a few per cent (cuDNN has no fast large-kernel depthwise 3D).
ATEN_FRACTION = {("dense", "tensor"): 0.35, ("dense", "fma"): 0.5, ("depthwise", "fma"): 0.03}
BANDWIDTH_FRACTION = 0.7  # sustained share of the HBM bandwidth of streaming kernels
LAUNCH_MS = 0.008         # one kernel launch

# The FFT: FLOPs per n·log2(n) unit of a real-to-complex transform (half of a complex one's 5),
# FLOPs per complex multiply-add; bytes per transformed complex element (about three passes over
# the data, each reading and writing 8 bytes), per elementwise complex product (two read, one
# written) and per complex element moved (read and written). Rates: the FP32 FMA peak and the
# bandwidth at these fractions (guesses until measured); ~40 torch calls of overhead.
FFT_FLOPS_PER_UNIT = 2.5
FFT_BYTES_PER_ELEMENT = 48
FFT_FLOP_FRACTION = 0.5
FFT_OVERHEAD_MS = 40 * LAUNCH_MS


def unit_peak(gpu, unit, dtype, tf32=True):
    """The peak FLOP/s of ``unit`` ("tensor" or "fma") on ``gpu`` for ``dtype``."""
    return gpu.tensor_peak(dtype, tf32) if unit == "tensor" else gpu.fma_fp32


def _ms(flops, rate, moved, gpu, launches=1):
    return 1e3 * max(flops / rate, moved / (BANDWIDTH_FRACTION * gpu.bandwidth)) + \
        launches * LAUNCH_MS


def ceilings(path=None) -> dict:
    """The kernel ceilings of the file ``path`` (default: the shipped
    lk3d/autotune/ceilings.json, read once): SM version (int) -> kernel kind -> (unit, fraction
    of the unit's peak). Written by ``lk3d estimate --cases goals --arch ARCH --ceilings FILE``
    (``lk3d.tools.ceilings``)."""
    return _shipped() if path is None else _read(path)


@functools.lru_cache(maxsize=None)
def _shipped():
    return _read(None)


def _read(path):
    where = path or f"lk3d/autotune/{CEILINGS_FILE}"
    try:
        text = (resources.files("lk3d.autotune").joinpath(CEILINGS_FILE).read_text()
                if path is None else open(path).read())
        raw = json.loads(text)
        table = {int(arch): {kind: (c["unit"], float(c["fraction"]))
                             for kind, c in entry["kinds"].items()}
                 for arch, entry in raw.items() if arch != "about"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{where}: expected lk3d's kernel ceilings ({type(e).__name__}: {e})"
                         ) from None
    for arch, kinds in table.items():
        for kind, (unit, fraction) in kinds.items():
            if unit not in ("tensor", "fma") or not 0 < fraction <= 1:
                raise ValueError(f"{where}: sm_{arch} {kind}: expected unit 'tensor' or 'fma' "
                                 f"and a fraction in (0, 1], got {unit!r}, {fraction!r}")
    return table


def kernel_ceiling(kind, gpu, path=None):
    """(unit, fraction of its peak) lk3d's kernel ``kind`` runs at on ``gpu`` (its ``arch``'s
    entry of ``ceilings(path)``)."""
    table = ceilings(path)
    if gpu.arch not in table:
        raise ValueError(f"arch: expected one of {sorted(table)} (the SM versions of "
                         f"{path or CEILINGS_FILE}), got {gpu.arch!r}")
    if kind not in table[gpu.arch]:
        raise ValueError(f"kind: expected one of {sorted(table[gpu.arch])} (sm_{gpu.arch} in "
                         f"{path or CEILINGS_FILE}), got {kind!r}")
    return table[gpu.arch][kind]


def kernel_ms(kind, flops, moved, gpu, dtype, tf32=True, path=None):
    """Modelled ms of one launch of lk3d's kernel ``kind`` doing ``flops`` and moving ``moved``
    bytes on ``gpu``, at its ceiling (``kernel_ceiling``; ``path``: another ceilings file), at
    most ``SUSTAINED_FRACTION`` of the unit's peak."""
    unit, fraction = kernel_ceiling(kind, gpu, path)
    fraction = min(fraction, SUSTAINED_FRACTION)
    return _ms(flops, fraction * unit_peak(gpu, unit, dtype, tf32), moved, gpu)


def copy_ms(nbytes, gpu):
    """Modelled ms of one copy kernel moving ``nbytes`` (read and written counted)."""
    return 1e3 * nbytes / (BANDWIDTH_FRACTION * gpu.bandwidth) + LAUNCH_MS


def aten_unit(form, dtype, tf32=True):
    """The unit cuDNN's convolution of ``form`` ("dense" or "depthwise") runs on."""
    if form == "depthwise" or dtype == torch.float64 or (dtype == torch.float32 and not tf32):
        return "fma"
    return "tensor"


def aten_ms(form, flops, moved, gpu, dtype, tf32=True, launches=1):
    """Modelled ms of aten's convolution of ``form`` doing ``flops`` and moving ``moved`` bytes."""
    unit = aten_unit(form, dtype, tf32)
    return _ms(flops, ATEN_FRACTION[form, unit] * unit_peak(gpu, unit, dtype, tf32), moved, gpu,
               launches)


def fft_ms(L, Q, E, K, N, cin, cout, groups, moved, gpu):
    """Modelled ms of lk3d.fft's overlap-save correlation with transform lengths ``L`` on
    ``gpu``, plus ``moved`` bytes of its input and output (casts, padding, cropping)."""
    return features_ms(fft.fft_features(L, Q, E, K, N, cin, cout, groups), L, moved, gpu)


def features_ms(f, L, moved, gpu):
    """Modelled ms on ``gpu`` of FFT work ``f`` (``lk3d.fft.fft_features``' units) at transform
    lengths ``L``, plus ``moved`` bytes."""
    logv = math.log2(max(2, math.prod(L)))
    flops = FFT_FLOPS_PER_UNIT * f["fft"] + 8 * (f["dft"] + f["bmm"] + f["elem"])
    nbytes = (FFT_BYTES_PER_ELEMENT / 2 * f["fft"] / logv  # the half spectrum: vol/2 complex
              + 24 * f["elem"] + 16 * f["move"] + moved)
    return 1e3 * (flops / (FFT_FLOP_FRACTION * gpu.fma_fp32)
                  + nbytes / (BANDWIDTH_FRACTION * gpu.bandwidth)) + FFT_OVERHEAD_MS
