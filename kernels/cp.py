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
halo'd 3-D tile. A staged separable variant is future work. Against a dense kernel the fused form
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
