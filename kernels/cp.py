"""Rank-R CP conv3d in Triton: the fused forward / grad-input kernel and the factor-gradient kernel.

A rank-R CP kernel is ``W[o, i, a, b, c] = sum_r Uo[o, r] w[r] Ui[i, r] A[a, r] B[b, r] C[c, r]``
(see ``lk3d.cp``). Layout: any strides; tensors are NCDHW logically, and NCDHW-contiguous,
channels_last_3d and strided views are all read through their strides, never copied. Factors are
``[rows, R]`` matrices of any strides; ``w`` (the component weights) is optional.

``cp_conv_kernel`` (forward, and grad-input with ``TRANSPOSED``): one program per tile of BLOCK_M
produced voxels (flattened over n, d, h, w)::

    z[m, r] = sum_{tap, k} a[m @ tap, k] * P[k, r] * A[a, r] B[b, r] C[c, r]    (fp32 accumulator)
    y[m, n] = sum_r (z[m, r] * w[r]) * Q[n, r]  (+ bias[n])

    forward     a = input x,        P = Ui (Cin -> R), Q = Uo (R -> Cout), forward tap map
    grad-input  a = grad_output,    P = Uo (Cout -> R), Q = Ui (R -> Cin), transposed tap map
                                    (``o = (i + pad - k·dil) / stride``, exact division only)

The reduction is one flattened loop of steps over taps x channel blocks, like the implicit GEMM of
``lk3d.kernels.tiled``: each step gathers a [BLOCK_M, BLOCK_K] tile of ``a`` through the shifted
coordinates (padding, stride and dilation are masks) and ``tl.dot``s it with the projection block
``P[k, :] * A[a, :] B[b, :] C[c, :]`` ([BLOCK_K, R_PAD]). The tap's coefficient row is folded into
that small block rather than applied to the [BLOCK_M, R_PAD] product: the same sum, BLOCK_M times
fewer multiplies, and the dot accumulates in place. The epilogue loops over the produced channels
in BLOCK_N blocks *inside* the program (z costs k³ gathers; a grid axis over N blocks would
recompute it per block), so the gathered operand is read once from HBM (halo re-reads hit the
caches), the result is written once, and no ``[N, R, D, H, W]`` tensor exists anywhere.

Two step shapes (``SPAN``, constexpr, chosen by the launcher): one tap per step with BLOCK_K
channels (channels >= BLOCK_K), or a step spanning BLOCK_K consecutive (tap, channel) pairs of the
flattened ``K = taps · channels`` axis (few channels: no mostly-masked tiles, and k³ taps collapse
into few steps; this is also what keeps the Triton interpreter quick). The launcher also passes
the number of steps (``STEPS``, see ``steps``).

FLOPs per produced voxel: ``2·k³·Cin·R + 2·R·Cout`` (forward). That is not the separable cost
``2·R·(Cin + kd + kh + kw + Cout)`` of running U_in, then A, B, C one axis at a time, then U_out:
the per-axis passes need each intermediate staged on chip and re-read along one axis, and Triton
has no addressable on-chip staging (shared memory is the compiler's) in which to do that for a
halo'd 3-D tile. The staged separable variant is ``cp_sep_kernel`` below. Against a dense kernel the fused form
still saves ``Cout / R`` of the FLOPs and never builds the dense weight.

Grad-input can also emit (``EMIT_GQ``) per-program partials of ``grad Ui = x^T @ gu`` ([Cin, R];
``gu`` is z·w at the input voxels, before the Ui projection) that the launcher sums.

``cp_grad_kernel`` (factors): per tile of output voxels, ``gz = grad_y @ Uo · w`` ([BLOCK_M, R]);
the same step loop gathers ``x`` and accumulates both ``z`` (as the forward) and the per-tap sums
``D[tap, r] = sum_m gz[m, r] u_tap[m, r]``, computed as ``Ui[k, r] · (x_tap^T gz)[k, r]`` summed
over the tap's channels; the epilogue gives ``G[o, r] = sum_m grad_y[m, o] z[m, r]``. The
launcher sums their partials; ``lk3d.cp`` turns D into grad A, B, C and G into grad Uo and w.

Partial sums (grad Ui, D, G) are per program, fp32 (fp64 for float64 tensors) and summed by the
launcher: deterministic, no atomics. A program may serve TILES consecutive voxel tiles (the
launcher bounds the number of programs, hence the partials' memory); it then adds into its own
partial rows, after a barrier, so no other program ever touches them.

Kernel extents, channel counts, rank, stride, padding (left side; the right side only sets the
output size) and dilation are compile-time constants; batch and spatial sizes are runtime ints.
Offsets are int64 wherever a tensor can pass 2**31 elements. Rank is padded to ``R_PAD`` (a power
of two >= 16, what ``tl.dot`` takes) with masked loads. Accumulation is fp32, fp64 for float64
tensors (which the interpreter runs for gradcheck).
"""
import math

import torch

import triton
import triton.language as tl

from lk3d.kernels import memory_format, out_size
from lk3d.kernels.common import (acc_dtype, alloc, check_config, geometry, launch_opts, load_vox,
                                 new, partial_dtype, precision, split_flat, split_len, split_tap,
                                 store_vox, tap_coord, wide, widen)
from lk3d.kernels.cp_configs import r_pad


# ----------------------------------------------------------------------------------------------
# Helpers shared by the two kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _step(kk, KC: tl.constexpr, KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
          SPAN: tl.constexpr, BLOCK_K: tl.constexpr):
    """Channels, taps and partial-sum column of reduction step ``kk``, and whether it starts its
    column: SPAN steps cover BLOCK_K (tap, channel) pairs (vectors), else one tap (a scalar)."""
    o_k = tl.arange(0, BLOCK_K)
    if SPAN:
        o_kk = kk * BLOCK_K + o_k
        c = o_kk % KC
        tap = o_kk // KC
        m_c = o_kk < KD * KH * KW * KC
        col = o_kk
        first = kk >= 0
    else:
        NUM_CB: tl.constexpr = (KC + BLOCK_K - 1) // BLOCK_K
        tap = kk // NUM_CB
        c = (kk % NUM_CB) * BLOCK_K + o_k
        m_c = c < KC
        col = tap
        first = (kk % NUM_CB) == 0
    kd, kh, kw = split_tap(tap, KH, KW)
    return c, m_c, kd, kh, kw, col, first


@triton.jit
def _gather(kk, a_ptr, o_a0, yd, yh, yw, m_m, AD, AH, AW, sa_c, sa_d, sa_h, sa_w,
            KC: tl.constexpr, KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
            STR_D: tl.constexpr, STR_H: tl.constexpr, STR_W: tl.constexpr,
            PAD_D: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
            DIL_D: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
            TRANSPOSED: tl.constexpr, SPAN: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] tile of the gathered operand for step ``kk`` (zeros where
    masked), and the step as ``_step`` decodes it (a tuple), for the caller's other uses."""
    step = _step(kk, KC, KD, KH, KW, SPAN, BLOCK_K)
    c, m_c, kd, kh, kw, _, _ = step
    if SPAN:  # a tap per column
        ad, v_d = tap_coord(yd[:, None], kd[None, :], AD, STR_D, PAD_D, DIL_D, TRANSPOSED)
        ah, v_h = tap_coord(yh[:, None], kh[None, :], AH, STR_H, PAD_H, DIL_H, TRANSPOSED)
        aw, v_w = tap_coord(yw[:, None], kw[None, :], AW, STR_W, PAD_W, DIL_W, TRANSPOSED)
        o_a = (o_a0[:, None] + ad.to(tl.int64) * sa_d + ah.to(tl.int64) * sa_h
               + aw.to(tl.int64) * sa_w + c.to(tl.int64)[None, :] * sa_c)
        m_a = m_m[:, None] & m_c[None, :] & v_d & v_h & v_w
    else:  # one tap for the step
        ad, v_d = tap_coord(yd, kd, AD, STR_D, PAD_D, DIL_D, TRANSPOSED)
        ah, v_h = tap_coord(yh, kh, AH, STR_H, PAD_H, DIL_H, TRANSPOSED)
        aw, v_w = tap_coord(yw, kw, AW, STR_W, PAD_W, DIL_W, TRANSPOSED)
        o_v = o_a0 + ad.to(tl.int64) * sa_d + ah.to(tl.int64) * sa_h + aw.to(tl.int64) * sa_w
        o_a = o_v[:, None] + c.to(tl.int64)[None, :] * sa_c
        m_a = (m_m & v_d & v_h & v_w)[:, None] & m_c[None, :]
    return load_vox(a_ptr + o_a, m_a, VOX=0), step


@triton.jit
def _rows(f_ptr, rows, m_rows, o_r, m_r, s_k, s_r, ACC_DTYPE: tl.constexpr):
    """Rows ``rows`` of a factor matrix ``[*, R]``: a [len(rows), R_PAD] block, zero-padded."""
    p = f_ptr + rows[:, None] * s_k + o_r[None, :] * s_r
    return tl.load(p, mask=m_rows[:, None] & m_r[None, :], other=0.0).to(ACC_DTYPE)


@triton.jit
def _tap_coefs(fa_ptr, fb_ptr, fc_ptr, kd, kh, kw, m_c, o_r, m_r,
               sfa_k, sfa_r, sfb_k, sfb_r, sfc_k, sfc_r,
               ACC_DTYPE: tl.constexpr, SPAN: tl.constexpr):
    """``A[a, r] B[b, r] C[c, r]`` of the step's taps: [BLOCK_K, R_PAD] (SPAN) or [1, R_PAD]."""
    if SPAN:
        coef = (_rows(fa_ptr, kd, m_c, o_r, m_r, sfa_k, sfa_r, ACC_DTYPE)
                * _rows(fb_ptr, kh, m_c, o_r, m_r, sfb_k, sfb_r, ACC_DTYPE)
                * _rows(fc_ptr, kw, m_c, o_r, m_r, sfc_k, sfc_r, ACC_DTYPE))
    else:
        coef = (tl.load(fa_ptr + kd * sfa_k + o_r * sfa_r, mask=m_r, other=0.0).to(ACC_DTYPE)
                * tl.load(fb_ptr + kh * sfb_k + o_r * sfb_r, mask=m_r, other=0.0).to(ACC_DTYPE)
                * tl.load(fc_ptr + kw * sfc_k + o_r * sfc_r, mask=m_r, other=0.0).to(ACC_DTYPE))
        coef = coef[None, :]
    return coef


@triton.jit
def _projection(step, p_ptr, fa_ptr, fb_ptr, fc_ptr, o_r, m_r, sp_k, sp_r,
                sfa_k, sfa_r, sfb_k, sfb_r, sfc_k, sfc_r,
                ACC_DTYPE: tl.constexpr, SPAN: tl.constexpr):
    """The projection block ``P[k, :] * A[a, :] B[b, :] C[c, :]`` ([BLOCK_K, R_PAD]) of a step
    (``_step``'s tuple), by which its gathered tile is multiplied."""
    c, m_c, kd, kh, kw, _, _ = step
    return _rows(p_ptr, c, m_c, o_r, m_r, sp_k, sp_r, ACC_DTYPE) * _tap_coefs(
        fa_ptr, fb_ptr, fc_ptr, kd, kh, kw, m_c, o_r, m_r,
        sfa_k, sfa_r, sfb_k, sfb_r, sfc_k, sfc_r, ACC_DTYPE, SPAN)


@triton.jit
def _add_partial(p_ptr, vals, mask, fresh):
    """Write ``vals`` to this program's own partial-sum elements, adding what an earlier tile of
    the same program left there unless ``fresh``. The barrier orders that earlier store (possibly
    from another thread of the program) before the load."""
    tl.debug_barrier()
    prev = tl.load(p_ptr, mask=tl.where(fresh, False, mask), other=0.0)
    tl.store(p_ptr, (vals + prev).to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _voxels(i_tile, M, YD, YH, YW, BLOCK_M: tl.constexpr, WIDE: tl.constexpr):
    """Produced voxels of tile ``i_tile``: flat index mask and (n, d, h, w); the flat index in
    int64 when ``WIDE``."""
    o_m = widen(i_tile, WIDE) * BLOCK_M + tl.arange(0, BLOCK_M)
    n, yd, yh, yw = split_flat(o_m, YD, YH, YW, WIDE)
    return o_m < M, n, yd, yh, yw


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def cp_conv_kernel(
    # Pointers
    a_ptr,     # gathered [N, KC, AD, AH, AW]: input (forward) or grad_output (grad-input)
    p_ptr,     # first projection [KC, R]: U_in (forward) or U_out (grad-input)
    q_ptr,     # second projection [NC, R]: U_out (forward) or U_in (grad-input)
    fa_ptr, fb_ptr, fc_ptr,  # per-axis factors A [KD, R], B [KH, R], C [KW, R]
    w_ptr,     # component weights [R]; read only when HAS_WEIGHTS
    bias_ptr,  # [NC]; read only when HAS_BIAS
    y_ptr,     # produced [N, NC, YD, YH, YW]: output or grad_input; written when WRITE_Y
    x_ptr,     # EMIT_GQ: the layer input [N, NC, YD, YH, YW] (grad-input only)
    gq_ptr,    # EMIT_GQ: partials [programs, NC, R] of grad U_in, contiguous
    # Sizes
    M,         # N * YD * YH * YW
    TILES,     # voxel tiles per program
    AD, AH, AW, YD, YH, YW,
    # Strides
    sa_n, sa_c, sa_d, sa_h, sa_w,
    sp_k, sp_r, sq_n, sq_r,
    sfa_k, sfa_r, sfb_k, sfb_r, sfc_k, sfc_r, sw_r,
    sb,        # bias
    sy_n, sy_c, sy_d, sy_h, sy_w,
    sx_n, sx_c, sx_d, sx_h, sx_w,
    # Meta-parameters
    KC: tl.constexpr,  # gathered channels: Cin (forward), Cout (grad-input)
    NC: tl.constexpr,  # produced channels: Cout (forward), Cin (grad-input)
    R: tl.constexpr,   # rank
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,  # kernel extent, fixed per layer
    STR_D: tl.constexpr, STR_H: tl.constexpr, STR_W: tl.constexpr,  # constexpr: divisions fold
    PAD_D: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,  # left padding
    DIL_D: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    TRANSPOSED: tl.constexpr,   # False: forward; True: grad-input through the transposed tap map
    SPAN: tl.constexpr,         # steps span (tap, channel) pairs (few channels) or one tap each
    STEPS: tl.constexpr,        # reduction steps per tile (``steps``)
    HAS_WEIGHTS: tl.constexpr,  # explicit flags, never a ones/zeros tensor standing in
    HAS_BIAS: tl.constexpr,
    WRITE_Y: tl.constexpr,      # grad-input may be wanted only for its grad U_in partials
    EMIT_GQ: tl.constexpr,      # grad-input: also emit grad U_in partials
    ACC_DTYPE: tl.constexpr,    # fp32; fp64 for float64 tensors
    PRECISION: tl.constexpr,    # "tf32" where torch allows it for fp32, else "ieee"
    WIDE: tl.constexpr,         # int64 flat voxel index: the volume can pass 2**31 voxels
    R_PAD: tl.constexpr,        # rank padded to a power of two >= 16 (tl.dot's minimum)
    BLOCK_M: tl.constexpr,      # produced voxels per tile
    BLOCK_N: tl.constexpr,      # produced channels per epilogue step
    BLOCK_K: tl.constexpr,      # reduction elements per step
):
    i_p = tl.program_id(0)
    o_r = tl.arange(0, R_PAD)
    m_r = o_r < R
    dt = a_ptr.dtype.element_ty
    for t in range(TILES):
        m_m, n, yd, yh, yw = _voxels(i_p * TILES + t, M, YD, YH, YW, BLOCK_M, WIDE)
        o_a0 = n.to(tl.int64) * sa_n
        z = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
        for kk in range(STEPS):
            b_a, step = _gather(kk, a_ptr, o_a0, yd, yh, yw, m_m, AD, AH, AW, sa_c, sa_d, sa_h,
                                sa_w, KC, KD, KH, KW, STR_D, STR_H, STR_W, PAD_D, PAD_H, PAD_W,
                                DIL_D, DIL_H, DIL_W, TRANSPOSED, SPAN, BLOCK_K)
            b_p = _projection(step, p_ptr, fa_ptr, fb_ptr, fc_ptr, o_r, m_r, sp_k, sp_r,
                              sfa_k, sfa_r, sfb_k, sfb_r, sfc_k, sfc_r, ACC_DTYPE, SPAN)
            z = tl.dot(b_a, b_p.to(dt), z, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        if HAS_WEIGHTS:
            z *= tl.load(w_ptr + o_r * sw_r, mask=m_r, other=0.0).to(ACC_DTYPE)[None, :]
        b_z = z.to(dt)

        n64 = n.to(tl.int64)
        o_y = n64 * sy_n + yd.to(tl.int64) * sy_d + yh.to(tl.int64) * sy_h + yw.to(tl.int64) * sy_w
        o_x = n64 * sx_n + yd.to(tl.int64) * sx_d + yh.to(tl.int64) * sx_h + yw.to(tl.int64) * sx_w
        for n0 in range(0, NC, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m_n = o_n < NC
            if WRITE_Y:
                b_q = tl.trans(_rows(q_ptr, o_n, m_n, o_r, m_r, sq_n, sq_r, ACC_DTYPE).to(dt))
                acc = tl.dot(b_z, b_q, input_precision=PRECISION, out_dtype=ACC_DTYPE)
                if HAS_BIAS:
                    acc += tl.load(bias_ptr + o_n * sb, mask=m_n, other=0.0).to(ACC_DTYPE)[None, :]
                p_y = y_ptr + o_y[:, None] + o_n.to(tl.int64)[None, :] * sy_c
                store_vox(p_y, acc.to(y_ptr.dtype.element_ty), m_m[:, None] & m_n[None, :], VOX=0)
            if EMIT_GQ:
                b_x = load_vox(x_ptr + o_x[:, None] + o_n.to(tl.int64)[None, :] * sx_c,
                               m_m[:, None] & m_n[None, :], VOX=0)
                g = tl.dot(tl.trans(b_x), b_z, input_precision=PRECISION, out_dtype=ACC_DTYPE)
                p_g = gq_ptr + i_p.to(tl.int64) * (NC * R) + o_n[:, None] * R + o_r[None, :]
                _add_partial(p_g, g, m_n[:, None] & m_r[None, :], t == 0)


@triton.jit
def cp_grad_kernel(
    # Pointers
    x_ptr,     # input [N, KC, XD, XH, XW]
    dy_ptr,    # grad_output [N, NC, YD, YH, YW]
    p_ptr,     # U_in [KC, R]
    q_ptr,     # U_out [NC, R]
    fa_ptr, fb_ptr, fc_ptr,  # A [KD, R], B [KH, R], C [KW, R]
    w_ptr,     # component weights [R]; read only when HAS_WEIGHTS
    gt_ptr,    # NEED_TAPS: partials [programs, KD*KH*KW*(KC if SPAN else 1), R] of D, contiguous
    go_ptr,    # NEED_OUT: partials [programs, NC, R] of G, contiguous
    # Sizes
    M,         # N * YD * YH * YW (output voxels)
    TILES,     # voxel tiles per program
    XD, XH, XW, YD, YH, YW,
    # Strides
    sx_n, sx_c, sx_d, sx_h, sx_w,
    sy_n, sy_c, sy_d, sy_h, sy_w,
    sp_k, sp_r, sq_n, sq_r,
    sfa_k, sfa_r, sfb_k, sfb_r, sfc_k, sfc_r, sw_r,
    # Meta-parameters
    KC: tl.constexpr,  # Cin
    NC: tl.constexpr,  # Cout
    R: tl.constexpr,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    STR_D: tl.constexpr, STR_H: tl.constexpr, STR_W: tl.constexpr,
    PAD_D: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_D: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    SPAN: tl.constexpr,
    STEPS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    NEED_TAPS: tl.constexpr,  # D, for grad A, B, C
    NEED_OUT: tl.constexpr,   # G, for grad U_out and grad w
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDE: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i_p = tl.program_id(0)
    o_r = tl.arange(0, R_PAD)
    m_r = o_r < R
    COLS: tl.constexpr = KD * KH * KW * (KC if SPAN else 1)
    dt = x_ptr.dtype.element_ty
    for t in range(TILES):
        m_m, n, yd, yh, yw = _voxels(i_p * TILES + t, M, YD, YH, YW, BLOCK_M, WIDE)
        n64 = n.to(tl.int64)
        o_y = n64 * sy_n + yd.to(tl.int64) * sy_d + yh.to(tl.int64) * sy_h + yw.to(tl.int64) * sy_w
        o_a0 = n64 * sx_n
        if NEED_TAPS:
            gz = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
            for n0 in range(0, NC, BLOCK_N):
                o_n = n0 + tl.arange(0, BLOCK_N)
                m_n = o_n < NC
                b_dy = load_vox(dy_ptr + o_y[:, None] + o_n.to(tl.int64)[None, :] * sy_c,
                                m_m[:, None] & m_n[None, :], VOX=0)
                b_q = _rows(q_ptr, o_n, m_n, o_r, m_r, sq_n, sq_r, ACC_DTYPE).to(dt)
                gz = tl.dot(b_dy, b_q, gz, input_precision=PRECISION, out_dtype=ACC_DTYPE)
            if HAS_WEIGHTS:
                gz *= tl.load(w_ptr + o_r * sw_r, mask=m_r, other=0.0).to(ACC_DTYPE)[None, :]
            b_gz = gz.to(dt)
        z = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
        for kk in range(STEPS):
            b_a, step = _gather(kk, x_ptr, o_a0, yd, yh, yw, m_m, XD, XH, XW, sx_c, sx_d, sx_h,
                                sx_w, KC, KD, KH, KW, STR_D, STR_H, STR_W, PAD_D, PAD_H, PAD_W,
                                DIL_D, DIL_H, DIL_W, False, SPAN, BLOCK_K)
            c, m_c, kd, kh, kw, col, first = step
            b_p = _rows(p_ptr, c, m_c, o_r, m_r, sp_k, sp_r, ACC_DTYPE)
            if NEED_OUT:
                b_pc = b_p * _tap_coefs(fa_ptr, fb_ptr, fc_ptr, kd, kh, kw, m_c, o_r, m_r,
                                        sfa_k, sfa_r, sfb_k, sfb_r, sfc_k, sfc_r, ACC_DTYPE, SPAN)
                z = tl.dot(b_a, b_pc.to(dt), z, input_precision=PRECISION, out_dtype=ACC_DTYPE)
            if NEED_TAPS:
                # sum_m gz[m, r] u_tap[m, r] = sum_k Ui[k, r] (a^T gz)[k, r]: [BLOCK_K, R_PAD]
                e = tl.dot(tl.trans(b_a), b_gz, input_precision=PRECISION, out_dtype=ACC_DTYPE)
                e *= b_p
                p_t = gt_ptr + i_p.to(tl.int64) * (COLS * R)
                if SPAN:
                    _add_partial(p_t + col[:, None] * R + o_r[None, :], e,
                                 m_c[:, None] & m_r[None, :], t == 0)
                else:
                    _add_partial(p_t + col * R + o_r, tl.sum(e, axis=0), m_r,
                                 (t == 0) & first)
        if NEED_OUT:
            b_z = z.to(dt)
            for n0 in range(0, NC, BLOCK_N):
                o_n = n0 + tl.arange(0, BLOCK_N)
                m_n = o_n < NC
                b_dy = load_vox(dy_ptr + o_y[:, None] + o_n.to(tl.int64)[None, :] * sy_c,
                                m_m[:, None] & m_n[None, :], VOX=0)
                g = tl.dot(tl.trans(b_dy), b_z, input_precision=PRECISION, out_dtype=ACC_DTYPE)
                p_g = go_ptr + i_p.to(tl.int64) * (NC * R) + o_n[:, None] * R + o_r[None, :]
                _add_partial(p_g, g, m_n[:, None] & m_r[None, :], t == 0)


# ----------------------------------------------------------------------------------------------
# Launchers: check what the kernel needs, allocate, launch. Every launcher takes one explicit
# config (the space is lk3d.kernels.cp_configs; the choice is lk3d.autotune's) with keys BLOCK_M,
# BLOCK_N, BLOCK_K; SPLIT, the number of programs, where partial sums are emitted; SPAN optional,
# else taken when the gathered channels are fewer than BLOCK_K. Padding is six ints.
# ----------------------------------------------------------------------------------------------

_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")


def span(channels, config):
    """Whether steps span (tap, channel) pairs for ``channels`` gathered channels."""
    return bool(config.get("SPAN", channels < config["BLOCK_K"]))


def steps(taps, channels, block_k, spans):
    """Reduction steps per voxel tile (the kernels' STEPS): over ``taps * channels`` (tap,
    channel) pairs ``block_k`` at a time when ``spans``, else ``block_k`` channels of one tap."""
    if spans:
        return triton.cdiv(taps * channels, block_k)
    return taps * triton.cdiv(channels, block_k)


def _factor_args(first, second, A, B, C, weights):
    ptrs = (first, second, A, B, C, weights if weights is not None else first)
    strides = (*first.stride(), *second.stride(), *A.stride(), *B.stride(), *C.stride(),
               weights.stride(0) if weights is not None else 0)
    return ptrs, strides


def _tiles(M, config, split):
    """(tiles per program, programs) for M voxels: ``split`` programs at most (None: one per
    tile)."""
    tiles = triton.cdiv(M, config["BLOCK_M"])
    if split is None:
        return 1, tiles
    return split_len(tiles, split, 1)


def _meta(t, config, kernel, channels, stride, padding, dilation, rank, allow_tf32, tiles,
          volume):
    """The constexprs and options of a launch gathering ``channels`` channels whose programs
    cover ``tiles`` voxel tiles of a grid of ``volume`` voxels per sample."""
    spans = span(channels, config)
    return dict(**geometry(stride, padding, dilation, kernel), KC=channels, SPAN=spans,
                STEPS=steps(math.prod(kernel), channels, config["BLOCK_K"], spans),
                R=rank, R_PAD=r_pad(rank),
                ACC_DTYPE=acc_dtype(t), PRECISION=precision(t, allow_tf32),
                WIDE=wide(tiles * config["BLOCK_M"], volume=volume),
                BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
                **launch_opts(config))


def cp_conv3d_fwd(x, U_out, U_in, A, B, C, weights, bias, stride, padding, dilation, config, *,
                  allow_tf32=False, out=None):
    """CP forward: ``y [N, Cout, *out_size]`` in the input's memory format."""
    check_config(config, _KEYS)
    N, cin = x.shape[:2]
    cout, rank = U_out.shape
    kernel = (A.shape[0], B.shape[0], C.shape[0])
    size = out_size(x.shape[2:], kernel, stride, padding, dilation)
    y = alloc((N, cout, *size), x, out, memory_format(x))
    M = N * math.prod(size)
    per, programs = _tiles(M, config, None)
    ptrs, strides = _factor_args(U_in, U_out, A, B, C, weights)
    cp_conv_kernel[(programs,)](
        x, *ptrs, bias if bias is not None else U_out, y, x, y,
        M, per, *x.shape[2:], *size,
        *x.stride(), *strides, bias.stride(0) if bias is not None else 0, *y.stride(), *x.stride(),
        NC=cout, TRANSPOSED=False, HAS_WEIGHTS=weights is not None, HAS_BIAS=bias is not None,
        WRITE_Y=True, EMIT_GQ=False,
        **_meta(x, config, kernel, cin, stride, padding, dilation, rank, allow_tf32,
                per * programs, math.prod(size)))
    return y


def cp_conv3d_bwd_input(dy, x, U_out, U_in, A, B, C, weights, stride, padding, dilation, config,
                        *, need_input=True, need_u_in=False, allow_tf32=False):
    """CP grad-input through the transposed tap map: ``(grad_input or None, grad U_in or None)``.
    grad U_in is summed from per-program partials (at most ``config["SPLIT"]`` programs)."""
    check_config(config, _KEYS + (("SPLIT",) if need_u_in else ()))
    N, cin = x.shape[:2]
    cout, rank = U_out.shape
    kernel = (A.shape[0], B.shape[0], C.shape[0])
    dx = new(tuple(x.shape), dy.dtype, dy.device, memory_format(x)) if need_input else None
    M = N * math.prod(x.shape[2:])
    per, programs = _tiles(M, config, config["SPLIT"] if need_u_in else None)
    gq = new((programs, cin, rank), partial_dtype(dy), dy.device) if need_u_in else None
    ptrs, strides = _factor_args(U_out, U_in, A, B, C, weights)
    y = dx if dx is not None else dy
    cp_conv_kernel[(programs,)](
        dy, *ptrs, U_out, y, x, gq if gq is not None else y,
        M, per, *dy.shape[2:], *x.shape[2:],
        *dy.stride(), *strides, 0, *y.stride(), *x.stride(),
        NC=cin, TRANSPOSED=True, HAS_WEIGHTS=weights is not None, HAS_BIAS=False,
        WRITE_Y=need_input, EMIT_GQ=need_u_in,
        **_meta(dy, config, kernel, cout, stride, padding, dilation, rank, allow_tf32,
                per * programs, math.prod(x.shape[2:])))
    return dx, (gq.sum(0) if gq is not None else None)


def cp_conv3d_bwd_factors(x, dy, U_out, U_in, A, B, C, weights, stride, padding, dilation, config,
                          *, need_taps=True, need_out=True, allow_tf32=False):
    """Per-tap sums ``D [KD, KH, KW, R]`` (for grad A, B, C) and ``G [Cout, R]`` (for grad U_out
    and grad weights), each None unless asked for; fp32 (fp64 for float64 tensors)."""
    check_config(config, _KEYS + ("SPLIT",))
    N, cin = x.shape[:2]
    cout, rank = U_out.shape
    kernel = (A.shape[0], B.shape[0], C.shape[0])
    taps = math.prod(kernel)
    spans = span(cin, config)
    M = N * math.prod(dy.shape[2:])
    per, programs = _tiles(M, config, config["SPLIT"])
    pdt = partial_dtype(x)
    cols = taps * (cin if spans else 1)
    gt = new((programs, cols, rank), pdt, x.device) if need_taps else None
    go = new((programs, cout, rank), pdt, x.device) if need_out else None
    ptrs, strides = _factor_args(U_in, U_out, A, B, C, weights)
    cp_grad_kernel[(programs,)](
        x, dy, *ptrs, gt if gt is not None else go, go if go is not None else gt,
        M, per, *x.shape[2:], *dy.shape[2:],
        *x.stride(), *dy.stride(), *strides,
        NC=cout, HAS_WEIGHTS=weights is not None, NEED_TAPS=need_taps, NEED_OUT=need_out,
        **_meta(x, config, kernel, cin, stride, padding, dilation, rank, allow_tf32,
                per * programs, math.prod(dy.shape[2:])))
    D = None
    if gt is not None:
        D = gt.sum(0).reshape(taps, cin if spans else 1, rank).sum(1).reshape(*kernel, rank)
    return D, (go.sum(0) if go is not None else None)


# ----------------------------------------------------------------------------------------------
# The separable form: one pass per factor, R-channel intermediates between them
# ----------------------------------------------------------------------------------------------
#
# ``cp_sep_kernel`` runs one pass of the separable sequence per launch, over tiles of BLOCK_M
# produced voxels (flattened over n, d, h, w), with a [BLOCK_M, R_PAD] fp32 tile z per tile:
#
#     PROJECT     z[m, :] = src[m, :] @ P            (tl.dot over the SC source channels)
#     else        z[m, :] = sum_t F[t, :] src[m @ t, :]   along one spatial AXIS (F: A, B or C;
#                 the forward tap map, or the transposed one with TRANSPOSED), src R channels
#     HAS_WEIGHTS z *= weights
#     OUT_PROJ    dst = z @ Q^T (+ bias): NC channels (tl.dot over R), else dst = z (R channels)
#
# and, for the backward, sums over the tile's voxels into per-program partials (summed by the
# launcher, no atomics):
#
#     EMIT_TAPS   T[t, r] += sum_m src[m @ t, r] h[m, r]    (h: an R-channel tensor at the
#                 produced grid): the gradient of the pass's factor, in either tap map
#     EMIT_G      G[o, r] += sum_m e[m, o] z[m, r]           (e: NC channels at the produced grid)
#
# Per produced voxel a pass costs 2·SC·R (PROJECT) or 2·K·R (an axis) FLOPs, plus 2·R·NC with
# OUT_PROJ: summed over the sequence, the separable count 2·R·(Cin + kd + kh + kw + Cout).

@triton.jit
def cp_sep_kernel(
    # Pointers
    src_ptr,   # [N, SC, SD, SH, SW] (PROJECT) or [N, R, SD, SH, SW]
    f_ptr,     # PROJECT: the projection [SC, R]; else the axis factor [K, R]
    q_ptr,     # OUT_PROJ: [NC, R]
    w_ptr,     # HAS_WEIGHTS: [R]
    bias_ptr,  # HAS_BIAS: [NC]
    dst_ptr,   # WRITE: [N, NC, YD, YH, YW] with OUT_PROJ, else [N, R, YD, YH, YW]
    h_ptr,     # EMIT_TAPS: [N, R, YD, YH, YW]
    e_ptr,     # EMIT_G: [N, NC, YD, YH, YW]
    gt_ptr,    # EMIT_TAPS: partials [programs, K, R], contiguous
    ge_ptr,    # EMIT_G: partials [programs, NC, R], contiguous
    # Sizes
    M,         # N * YD * YH * YW
    TILES,     # voxel tiles per program
    SD, SH, SW, YD, YH, YW,
    # Strides
    ss_n, ss_c, ss_d, ss_h, ss_w,
    sf_k, sf_r, sq_n, sq_r, sw_r, sb,
    sy_n, sy_c, sy_d, sy_h, sy_w,
    sh_n, sh_c, sh_d, sh_h, sh_w,
    se_n, se_c, se_d, se_h, se_w,
    # Meta-parameters
    SC: tl.constexpr,      # source channels (PROJECT)
    NC: tl.constexpr,      # produced channels (OUT_PROJ) or e's channels (EMIT_G)
    R: tl.constexpr,
    AXIS: tl.constexpr,    # 0: D, 1: H, 2: W (not PROJECT)
    K: tl.constexpr, STR: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr,  # along AXIS
    TRANSPOSED: tl.constexpr,
    PROJECT: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    OUT_PROJ: tl.constexpr,
    WRITE: tl.constexpr,
    EMIT_TAPS: tl.constexpr,
    EMIT_G: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDE: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i_p = tl.program_id(0)
    o_r = tl.arange(0, R_PAD)
    m_r = o_r < R
    dt = src_ptr.dtype.element_ty
    for t in range(TILES):
        m_m, n, yd, yh, yw = _voxels(i_p * TILES + t, M, YD, YH, YW, BLOCK_M, WIDE)
        n64 = n.to(tl.int64)
        z = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
        if PROJECT:
            o_s = (n64 * ss_n + yd.to(tl.int64) * ss_d + yh.to(tl.int64) * ss_h
                   + yw.to(tl.int64) * ss_w)
            for k0 in range(0, SC, BLOCK_K):
                o_k = k0 + tl.arange(0, BLOCK_K)
                m_k = o_k < SC
                b_s = load_vox(src_ptr + o_s[:, None] + o_k.to(tl.int64)[None, :] * ss_c,
                               m_m[:, None] & m_k[None, :], VOX=0)
                b_p = _rows(f_ptr, o_k, m_k, o_r, m_r, sf_k, sf_r, ACC_DTYPE).to(dt)
                z = tl.dot(b_s, b_p, z, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        else:
            if AXIS == 0:
                yc = yd
                size = SD
                s_ax = ss_d
                o_s = n64 * ss_n + yh.to(tl.int64) * ss_h + yw.to(tl.int64) * ss_w
            elif AXIS == 1:
                yc = yh
                size = SH
                s_ax = ss_h
                o_s = n64 * ss_n + yd.to(tl.int64) * ss_d + yw.to(tl.int64) * ss_w
            else:
                yc = yw
                size = SW
                s_ax = ss_w
                o_s = n64 * ss_n + yd.to(tl.int64) * ss_d + yh.to(tl.int64) * ss_h
            if EMIT_TAPS:
                o_h = (n64 * sh_n + yd.to(tl.int64) * sh_d + yh.to(tl.int64) * sh_h
                       + yw.to(tl.int64) * sh_w)
                b_h = tl.load(h_ptr + o_h[:, None] + o_r[None, :] * sh_c,
                              mask=m_m[:, None] & m_r[None, :], other=0.0).to(ACC_DTYPE)
            for k in range(K):
                c, v = tap_coord(yc, k, size, STR, PAD, DIL, TRANSPOSED)
                p_s = src_ptr + (o_s + c.to(tl.int64) * s_ax)[:, None] + o_r[None, :] * ss_c
                b_s = tl.load(p_s, mask=(m_m & v)[:, None] & m_r[None, :],
                              other=0.0).to(ACC_DTYPE)
                if WRITE or EMIT_G:
                    b_f = tl.load(f_ptr + k * sf_k + o_r * sf_r, mask=m_r, other=0.0)
                    z += b_s * b_f.to(ACC_DTYPE)[None, :]
                if EMIT_TAPS:
                    p_t = gt_ptr + i_p.to(tl.int64) * (K * R) + k * R + o_r
                    _add_partial(p_t, tl.sum(b_s * b_h, axis=0), m_r, t == 0)
        if HAS_WEIGHTS:
            z *= tl.load(w_ptr + o_r * sw_r, mask=m_r, other=0.0).to(ACC_DTYPE)[None, :]
        o_y = (n64 * sy_n + yd.to(tl.int64) * sy_d + yh.to(tl.int64) * sy_h
               + yw.to(tl.int64) * sy_w)
        if OUT_PROJ or EMIT_G:
            b_z = z.to(dt)
        if WRITE:
            if OUT_PROJ:
                for n0 in range(0, NC, BLOCK_N):
                    o_n = n0 + tl.arange(0, BLOCK_N)
                    m_n = o_n < NC
                    b_q = tl.trans(_rows(q_ptr, o_n, m_n, o_r, m_r, sq_n, sq_r, ACC_DTYPE).to(dt))
                    acc = tl.dot(b_z, b_q, input_precision=PRECISION, out_dtype=ACC_DTYPE)
                    if HAS_BIAS:
                        acc += tl.load(bias_ptr + o_n * sb, mask=m_n,
                                       other=0.0).to(ACC_DTYPE)[None, :]
                    p_y = dst_ptr + o_y[:, None] + o_n.to(tl.int64)[None, :] * sy_c
                    store_vox(p_y, acc.to(dst_ptr.dtype.element_ty),
                              m_m[:, None] & m_n[None, :], VOX=0)
            else:
                tl.store(dst_ptr + o_y[:, None] + o_r[None, :] * sy_c,
                         z.to(dst_ptr.dtype.element_ty), mask=m_m[:, None] & m_r[None, :])
        if EMIT_G:
            o_e = (n64 * se_n + yd.to(tl.int64) * se_d + yh.to(tl.int64) * se_h
                   + yw.to(tl.int64) * se_w)
            for n0 in range(0, NC, BLOCK_N):
                o_n = n0 + tl.arange(0, BLOCK_N)
                m_n = o_n < NC
                b_e = load_vox(e_ptr + o_e[:, None] + o_n.to(tl.int64)[None, :] * se_c,
                               m_m[:, None] & m_n[None, :], VOX=0)
                g = tl.dot(tl.trans(b_e), b_z, input_precision=PRECISION, out_dtype=ACC_DTYPE)
                p_g = ge_ptr + i_p.to(tl.int64) * (NC * R) + o_n[:, None] * R + o_r[None, :]
                _add_partial(p_g, g, m_n[:, None] & m_r[None, :], t == 0)


def _sep_pass(src, size, factor, rank, config, allow_tf32, *, axis=None, geo=(1, 0, 1),
              transposed=False, weights=None, q=None, bias=None, out=None, write=True, h=None,
              e=None):
    """One launch of ``cp_sep_kernel`` producing the grid ``size`` from ``src``: a projection
    through ``factor`` ([channels, R]) when ``axis`` is None, else the 1-D pass along ``axis``
    with ``factor`` ([K, R]) and that axis's ``geo`` (stride, left padding, dilation). Returns
    ``(dst or None, tap sums [K, R] or None, G [NC, R] or None)``; ``dst`` is ``out`` or a new
    tensor (channels innermost when it has R channels)."""
    N = src.shape[0]
    project = axis is None
    nc = q.shape[0] if q is not None else (e.shape[1] if e is not None else 1)
    dst = None
    if write:
        dst = out if out is not None else new(
            (N, rank, *size), src.dtype, src.device, torch.channels_last_3d)
    M = N * math.prod(size)
    emits = h is not None or e is not None
    per, programs = _tiles(M, config, config["SPLIT"] if emits else None)
    pdt = partial_dtype(src)
    k = 1 if project else factor.shape[0]
    gt = new((programs, k, rank), pdt, src.device) if h is not None else None
    ge = new((programs, nc, rank), pdt, src.device) if e is not None else None
    zeros5 = (0,) * 5
    ts = dict(dst=dst, h=h, e=e)
    like = {name: (t if t is not None else src) for name, t in ts.items()}
    strides = {name: (tuple(t.stride()) if t is not None else zeros5) for name, t in ts.items()}
    stride, pad, dil = geo
    cp_sep_kernel[(programs,)](
        src, factor, q if q is not None else factor, weights if weights is not None else factor,
        bias if bias is not None else factor, like["dst"], like["h"], like["e"],
        gt if gt is not None else (ge if ge is not None else src),
        ge if ge is not None else (gt if gt is not None else src),
        M, per, *src.shape[2:], *size,
        *src.stride(), *factor.stride(), *(q.stride() if q is not None else (0, 0)),
        weights.stride(0) if weights is not None else 0,
        bias.stride(0) if bias is not None else 0,
        *strides["dst"], *strides["h"], *strides["e"],
        SC=src.shape[1] if project else rank, NC=nc, R=rank, AXIS=0 if project else axis,
        K=k, STR=stride, PAD=pad, DIL=dil, TRANSPOSED=transposed, PROJECT=project,
        HAS_WEIGHTS=weights is not None, HAS_BIAS=bias is not None, OUT_PROJ=q is not None,
        WRITE=write, EMIT_TAPS=h is not None, EMIT_G=e is not None,
        ACC_DTYPE=acc_dtype(src), PRECISION=precision(src, allow_tf32),
        WIDE=wide(per * programs * config["BLOCK_M"], volume=max(math.prod(size),
                                                                  math.prod(src.shape[2:]))),
        R_PAD=r_pad(rank), BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
        BLOCK_K=config["BLOCK_K"], **launch_opts(config))
    return (dst, gt.sum(0) if gt is not None else None, ge.sum(0) if ge is not None else None)


def _sep_grids(x_size, kernel, stride, padding, dilation):
    """The grids of the separable sequence: x's, after the W pass, after the H pass, y's."""
    y_size = out_size(x_size, kernel, stride, padding, dilation)
    (d, h, _), (yd, yh, yw) = x_size, y_size
    return tuple(x_size), (d, h, yw), (d, yh, yw), tuple(y_size)


def _geo(axis, stride, padding, dilation):
    return stride[axis], padding[axis], dilation[axis]


def cp_sep_fwd(x, U_out, U_in, A, B, C, weights, bias, stride, padding, dilation, config, *,
               allow_tf32=False, out=None):
    """CP forward by the separable sequence (four launches of ``cp_sep_kernel``): ``y [N, Cout,
    *out_size]`` in the input's memory format. Intermediates: three R-channel tensors, channels
    innermost, on the grids of ``_sep_grids`` (at most two alive at once)."""
    check_config(config, _KEYS)
    N = x.shape[0]
    cout, rank = U_out.shape
    g0, g1, g2, g3 = _sep_grids(x.shape[2:], (A.shape[0], B.shape[0], C.shape[0]), stride,
                                padding, dilation)
    y = alloc((N, cout, *g3), x, out, memory_format(x))
    run = dict(rank=rank, config=config, allow_tf32=allow_tf32)
    z, _, _ = _sep_pass(x, g0, U_in, **run)
    z, _, _ = _sep_pass(z, g1, C, axis=2, geo=_geo(2, stride, padding, dilation), **run)
    z, _, _ = _sep_pass(z, g2, B, axis=1, geo=_geo(1, stride, padding, dilation), **run)
    _sep_pass(z, g3, A, axis=0, geo=_geo(0, stride, padding, dilation), weights=weights,
              q=U_out, bias=bias, out=y, **run)
    return y


def cp_sep_bwd(dy, x, U_out, U_in, A, B, C, weights, stride, padding, dilation, config,
               output_mask, *, allow_tf32=False):
    """CP backward by the separable sequence: ``(grad_input, grad U_in, T_A, T_B, T_C, G)``, each
    None unless ``output_mask`` (input, U_out, U_in, A, B, C, weights) needs it. ``T_A`` is grad
    A ([KD, R]; likewise B, C), ``G [Cout, R] = sum dy^T z3`` (grad U_out = G·weights, grad
    weights = sum_o G·U_out). The forward's intermediates z0..z2 are recomputed as far as needed;
    the gradient flows back through g3 = dy @ U_out·weights, g2, g1 (R channels each)."""
    check_config(config, _KEYS + ("SPLIT",))
    need_x, need_uo, need_ui, need_a, need_b, need_c, need_w = output_mask
    need_out = need_uo or need_w
    rank = U_out.shape[1]
    g0, g1, g2, g3 = _sep_grids(x.shape[2:], (A.shape[0], B.shape[0], C.shape[0]), stride,
                                padding, dilation)
    geo = [_geo(a, stride, padding, dilation) for a in range(3)]
    run = dict(rank=rank, config=config, allow_tf32=allow_tf32)
    z0 = z1 = z2 = None
    if need_c or need_b or need_a or need_out:
        z0, _, _ = _sep_pass(x, g0, U_in, **run)
    if need_b or need_a or need_out:
        z1, _, _ = _sep_pass(z0, g1, C, axis=2, geo=geo[2], **run)
    if need_a or need_out:
        z2, _, _ = _sep_pass(z1, g2, B, axis=1, geo=geo[1], **run)
    G = dx = gui = ta = tb = tc = None
    if need_out:
        _, _, G = _sep_pass(z2, g3, A, axis=0, geo=geo[0], write=False, e=dy, **run)
    back_b, back_c = need_b or need_c or need_x or need_ui, need_c or need_x or need_ui
    if need_a or back_b:
        g, _, _ = _sep_pass(dy, g3, U_out, weights=weights, **run)
        g, ta, _ = _sep_pass(g, g2, A, axis=0, geo=geo[0], transposed=True, write=back_b,
                             h=z2 if need_a else None, **run)
        if back_b:
            g, tb, _ = _sep_pass(g, g1, B, axis=1, geo=geo[1], transposed=True, write=back_c,
                                 h=z1 if need_b else None, **run)
        if back_c:
            dx = (new(tuple(x.shape), dy.dtype, dy.device, memory_format(x)) if need_x
                  else None)
            _, tc, gui = _sep_pass(g, g0, C, axis=2, geo=geo[2], transposed=True, q=U_in,
                                   out=dx, write=need_x, h=z0 if need_c else None,
                                   e=x if need_ui else None, **run)
    return dx, gui, ta, tb, tc, G
