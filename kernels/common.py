"""What every lk3d kernel family shares: the index and load helpers its kernels call
(``@triton.jit``) and the helpers of its launchers (dtypes, constexprs, allocation, grids).

Index helpers. A convolution pairs a "gathered" operand position with a produced position through
one kernel tap. Forward (and grad-weight) read the input at ``i = o * STRIDE - PAD + k * DIL``; grad-input reads the
output gradient at ``o = (i + PAD - k * DIL) / STRIDE``, which exists only when the division is exact.
Writing the two mappings once here keeps every kernel body free of copies of this arithmetic.
"""
import itertools
import math
import re
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lk3d.kernels import MAX_VOLUME


def tie_goes_last(version):
    """Whether Triton ``version`` breaks a coalescing tie toward the last dimension (3.7 on)."""
    major, minor = (int(v) for v in re.match(r"(\d+)\.(\d+)", version).groups())
    return (major, minor) >= (3, 7)


# Triton's coalescing pass spreads a load's (or store's) threads along the dimension whose
# addresses it can prove contiguous. For a gather through runtime strides it can prove none, and
# then the tie goes to dim 0 in Triton 3.6 but to the last dim from 3.7 on (read off the TTGIR of
# both). lk3d's tiles pair voxels with channels or taps, and a voxel costs a thread several
# registers (an int64 offset, its coordinates and masks): voxels must vary fastest across threads,
# so that each thread holds one or a few of them. With the wrong tie a [128, 32] tile gives each
# thread 32 voxels, and the implicit GEMM spilled 1.5 KB per thread on Triton 3.9. ``load_vox`` and
# ``store_vox`` present a tile to the compiler transposed where that makes its voxel axis win.
VOXELS_LAST = tl.constexpr(tie_goes_last(triton.__version__))


@triton.jit
def tap_coord(o, k, size, STRIDE: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr,
              TRANSPOSED: tl.constexpr):
    """Coordinate of the gathered operand for produced coordinate ``o`` and tap ``k``.

    Returns ``(coord, valid)``; ``valid`` is False where the coordinate falls in the padding, past
    ``size``, or (TRANSPOSED) between the strided output positions.
    """
    if TRANSPOSED:
        t = o + PAD - k * DIL
        c = t // STRIDE  # truncates toward zero; negative t is masked by ``t >= 0``
        valid = (t >= 0) & (t - c * STRIDE == 0) & (c < size)
    else:
        c = o * STRIDE - PAD + k * DIL
        valid = (c >= 0) & (c < size)
    return c, valid


@triton.jit
def split_flat(offs, SD, SH, SW, WIDE: tl.constexpr = False):
    """Decode a flat index over ``[batch, SD, SH, SW]`` into ``(n, d, h, w)``. A ``WIDE`` (int64)
    index takes one 64-bit division to find the sample, and the rest decodes in int32 (one
    sample's volume stays below 2**31 voxels, see ``wide``): 64-bit division is slow on GPUs."""
    if WIDE:
        per_sample = tl.cast(SD, tl.int64) * SH * SW
        n = offs // per_sample
        rest = (offs - n * per_sample).to(tl.int32)
    else:
        rest = offs
    w = rest % SW
    t = rest // SW
    h = t % SH
    t = t // SH
    d = t % SD
    if not WIDE:
        n = t // SD
    return n, d, h, w


@triton.jit
def split_tap(t, KH: tl.constexpr, KW: tl.constexpr):
    """Decode a flat tap index over ``[KD, KH, KW]`` into ``(kd, kh, kw)``."""
    kw = t % KW
    kh = (t // KW) % KH
    kd = t // (KW * KH)
    return kd, kh, kw


@triton.jit
def tap_source(o_m, kd, kh, kw, OD, OH, OW, XD, XH, XW, sx_n, sx_d, sx_h, sx_w,
               sy_n, sy_d, sy_h, sy_w, STR_D: tl.constexpr, STR_H: tl.constexpr,
               STR_W: tl.constexpr, PAD_D: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
               DIL_D: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
               WIDE: tl.constexpr):
    """What a weight-gradient reduction over output voxels reads for one forward tap
    ``(kd, kh, kw)``: for flat output indices ``o_m`` over ``[batch, OD, OH, OW]``, the int64
    offsets (less the channel term) of grad_output there and of the input voxel the tap reads,
    and whether that input voxel exists (False in the padding)."""
    n, od, oh, ow = split_flat(o_m, OD, OH, OW, WIDE)
    xd, v_d = tap_coord(od, kd, XD, STR_D, PAD_D, DIL_D, False)
    xh, v_h = tap_coord(oh, kh, XH, STR_H, PAD_H, DIL_H, False)
    xw, v_w = tap_coord(ow, kw, XW, STR_W, PAD_W, DIL_W, False)
    n64 = n.to(tl.int64)
    o_y = n64 * sy_n + od.to(tl.int64) * sy_d + oh.to(tl.int64) * sy_h + ow.to(tl.int64) * sy_w
    o_x = n64 * sx_n + xd.to(tl.int64) * sx_d + xh.to(tl.int64) * sx_h + xw.to(tl.int64) * sx_w
    return o_y, o_x, v_d & v_h & v_w


@triton.jit
def load_vox(ptrs, mask, VOX: tl.constexpr):
    """``tl.load(ptrs, mask, other=0)`` of a 2-D tile whose axis ``VOX`` runs over voxels, laid out
    with the voxels fastest across threads (see ``VOXELS_LAST``)."""
    if (VOX == 1) != VOXELS_LAST:
        return tl.trans(tl.load(tl.trans(ptrs), mask=tl.trans(mask), other=0.0))
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def store_vox(ptrs, vals, mask, VOX: tl.constexpr):
    """``tl.store(ptrs, vals, mask)`` of a 2-D tile whose axis ``VOX`` runs over voxels."""
    if (VOX == 1) != VOXELS_LAST:
        tl.store(tl.trans(ptrs), tl.trans(vals), mask=tl.trans(mask))
    else:
        tl.store(ptrs, vals, mask=mask)


@triton.jit
def program_ids(N0, N1):
    """``(i0, i1, i2)`` of a launch whose three grid axes are flattened onto axis 0, ``i0``
    fastest (``flat_grid`` makes the grid): CUDA allows 2**31 - 1 programs along x but only 65,535
    along y and z, and a batch × channels axis passes that."""
    pid = tl.program_id(0)
    rest = pid // N0
    return pid % N0, rest % N1, rest // N1


@triton.jit
def widen(i, WIDE: tl.constexpr):
    """``i`` as int64 when ``WIDE`` (see ``wide``): the start of a flat voxel range that can pass 2**31, which
    int32 arithmetic would wrap before any int64 offset is computed from it."""
    if WIDE:
        j = tl.cast(i, tl.int64)  # also for an argument the JIT specialised to a constexpr 1
    else:
        j = i
    return j


def flat_grid(n0, n1=1, n2=1):
    """The one-axis grid of ``program_ids``."""
    programs = n0 * n1 * n2
    if programs >= 2 ** 31:
        raise ValueError(f"launch: {n0} x {n1} x {n2} programs exceed CUDA's 2**31 - 1")
    return (programs,)


def wide(*extents, volume=0):
    """The ``WIDE`` of a launch: whether a flat index up to any of ``extents`` (the voxels its
    programs reach, a tensor's ``reach``) needs int64. One sample's ``volume`` must fit int32."""
    if volume > MAX_VOLUME:
        raise ValueError(f"input: lk3d's Triton kernels take at most {MAX_VOLUME} voxels per "
                         f"sample and channel, got {volume}")
    return max(extents) > 2 ** 31 - 1


# ----------------------------------------------------------------------------------------------
# Launcher helpers: what every family's launchers check, allocate and pass. The choice of config
# lives in lk3d.autotune; every launcher takes one explicit config.
# ----------------------------------------------------------------------------------------------

def acc_dtype(t):
    """The accumulator of a kernel reading ``t``: fp64 for float64 tensors, else fp32."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def partial_dtype(t):
    """The dtype of the partial sums a launcher allocates for ``t``: float64 or float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def precision(t, allow_tf32):
    """``tl.dot``'s input precision for ``t``: "tf32" where allowed for fp32, else "ieee"."""
    return "tf32" if (t.dtype == torch.float32 and allow_tf32) else "ieee"


def geometry(stride, padding, dilation, kernel):
    """The geometry constexprs of a launch; ``padding`` six ints, of which the kernels take the
    left side (the right side only sets the output size)."""
    (sd, sh, sw), (pd, ph, pw), (dd, dh, dw), (kd, kh, kw) = stride, padding[:3], dilation, kernel
    return dict(KD=kd, KH=kh, KW=kw, STR_D=sd, STR_H=sh, STR_W=sw, PAD_D=pd, PAD_H=ph, PAD_W=pw,
                DIL_D=dd, DIL_H=dh, DIL_W=dw)


def flipped_geometry(kernel, padding, dilation):
    """The geometry of a stride-1 grad-input run as a forward over grad_output with the taps
    flipped: left padding ``(k - 1)·dil - pad`` per axis."""
    flipped = tuple((k - 1) * d - p for k, d, p in zip(kernel, dilation, padding[:3]))
    return geometry((1, 1, 1), flipped + flipped, dilation, kernel)


class AxisPhase(NamedTuple):
    """One stride phase of one axis of a grad-input (``grad_input_phases``)."""
    first: int  # the phase's first input index r: the strided view dx[..., r::stride]
    tap: int    # the first tap t0 reaching it
    step: int   # the taps reaching it: t0, t0 + step, ... (step = stride / gcd(dil, stride))
    taps: int   # how many (0: no tap reaches the phase, which gets zeros)
    dil: int    # their spacing over grad_output: dil / gcd(dil, stride)
    pad: int    # left padding of the stride-1 correlation over grad_output


def axis_phases(k, stride, pad, dil, size):
    """The stride phases of one axis of a grad-input: kernel extent ``k``, ``stride``, left
    padding ``pad``, dilation ``dil``, input extent ``size``.

    The forward reads input ``i = o·stride - pad + t·dil``. Input voxels ``i = q·stride + r``
    (phase r) receive from tap t only where ``r + pad - t·dil ≡ 0 (mod stride)``: the taps
    ``t0 + step·j`` (``step = stride / gcd(dil, stride)``), through grad_output
    ``o = q + c - j·dil'`` (``c = (r + pad - t0·dil) / stride``, ``dil' = dil / gcd``). Flipping
    the sub-kernel (``u = taps - 1 - j``) makes this a stride-1 correlation over grad_output at
    dilation ``dil'`` and left padding ``(taps - 1)·dil' - c``; at stride 1 that is the single
    phase ``(k - 1)·dil - pad`` of ``flipped_geometry``."""
    g = math.gcd(dil, stride)
    step, spacing = stride // g, dil // g
    phases = []
    for r in range(min(stride, size)):
        t0 = next((t for t in range(step) if (t * dil - r - pad) % stride == 0), None)
        taps = 0 if t0 is None else len(range(t0, k, step))
        if taps == 0:
            phases.append(AxisPhase(r, 0, step, 0, spacing, 0))
            continue
        c = (r + pad - t0 * dil) // stride
        phases.append(AxisPhase(r, t0, step, taps, spacing, (taps - 1) * spacing - c))
    return phases


def grad_input_phases(kernel, stride, padding, dilation, size):
    """Every stride phase of a grad-input over the input's spatial ``size``: triples of
    ``AxisPhase`` (D, H, W), one per strided view ``dx[..., rd::sd, rh::sh, rw::sw]``, which
    together cover the input once. A phase with taps along every axis is a stride-1 forward over
    grad_output with the flipped sub-kernel ``w[..., t0::step]``; the others get zeros."""
    axes = [axis_phases(*a) for a in zip(kernel, stride, padding[:3], dilation, size)]
    return list(itertools.product(*axes))


def launch_opts(config):
    """Compile options of a launch: the config's warps and stages, and floating-point contraction
    (a*b+c as one FMA) on, explicitly: Triton 3.9 warns when it is left to the default, which
    3.10 turns off."""
    return {"enable_fp_fusion": True,
            **{k: config[k] for k in ("num_warps", "num_stages") if k in config}}


def check_config(config, keys):
    """A ValueError unless ``config`` (a dict) names every one of ``keys``."""
    missing = [k for k in keys if k not in config]
    if missing:
        raise ValueError(f"config: expected keys {keys}, missing {missing} in {config}")


# Tests set this to True: every buffer a launcher allocates starts as NaN, so an element that a
# kernel fails to write shows up instead of passing as leftover memory.
POISON = False


def new(shape, dtype, device, memory_format=torch.contiguous_format):
    """An uninitialised buffer (NaN-filled under ``POISON``)."""
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    return t.fill_(float("nan")) if POISON else t


def alloc(shape, like, out, memory_format):
    """``out`` when given (checked against ``shape`` and ``like``'s dtype and device), else a new
    buffer like ``like``."""
    if out is None:
        return new(shape, like.dtype, like.device, memory_format)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"out: expected {tuple(shape)} {like.dtype} on {like.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    return out


def split_len(M, split, block):
    """Reduction length per split program, a multiple of ``block``; and the split actually used
    (at least one program, which reduces nothing when ``M`` is 0)."""
    per = max(1, triton.cdiv(triton.cdiv(M, max(1, split)), block)) * block
    return per, max(1, triton.cdiv(M, per))


def reach(t):
    """One past the largest element offset ``t``'s strides reach."""
    return 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
