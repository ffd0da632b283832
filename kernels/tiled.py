"""Tiled dense, grouped and depthwise conv3d in Triton: forward, grad-input, grad-weight, grad-bias.

Layout: any strides. Tensors are NCDHW logically; NCDHW-contiguous, channels_last_3d and
non-contiguous views are all read through their strides, never copied.

Implicit GEMM (``conv3d_igemm_kernel``, dense and grouped):
    forward     M = N·OD·OH·OW (output voxels), N = Cout/g, K = Cin/g·kd·kh·kw
    grad-input  M = N·D·H·W   (input voxels),  N = Cin/g,  K = Cout/g·kd·kh·kw
The reduction is one flattened loop over taps × channel blocks (so the software pipeliner sees one
loop); each step gathers a [BLOCK_M, BLOCK_K] tile of the activation through the tap's shifted
coordinates (padding, stride and dilation are masks, im2col is never materialised) and feeds
``tl.dot``. Grad-input is the same body with the transposed tap map
``o = (i + pad - k·dil) / stride`` (exact division only), so stride > 1 needs no zero-insertion.

Depthwise (``conv3d_dw_kernel``, Cin/g = 1, channel multiplier Cout/Cin >= 1): one program per
(batch, channel) and a block of BLOCK output voxels; taps run as kd/kh outer loops (their index
arithmetic hoisted) and a kw inner loop, so a program re-reads its haloed input tile from L1/L2
across all k³ taps instead of from HBM. Channels and batch are the parallel grid axis.

Grad-weight: a GEMM per tap (M = Cout/g, N = Cin/g, K = N·OD·OH·OW) for dense/grouped; for
depthwise a per-channel dot over space, BLOCK_T taps per program sharing each grad-output load.
Both split the spatial reduction over SPLIT programs writing fp32 partials that the launcher sums
(deterministic; no atomics), so a large volume fills the GPU even with few channels.

Stride, padding (left side; the right side only sets the output size), dilation, kernel extent
and channels per group are compile-time constants; batch and spatial sizes are runtime ints.
Offsets are int64 wherever a tensor can pass 2**31 elements.
Accumulation is fp32 (fp64 for float64 tensors, which the interpreter runs for gradcheck).

Launch configs: ``lk3d.kernels.tiled_configs`` (data); launchers take padding as six ints
``(d_l, h_l, w_l, d_r, h_r, w_r)`` and compute the output size themselves.
"""
import math

import triton
import triton.language as tl

from lk3d.kernels import memory_format, out_size
from lk3d.kernels.common import (acc_dtype, alloc, check_config, flat_grid, geometry,
                                 launch_opts, load_vox, new, partial_dtype, precision,
                                 program_ids, reach, split_flat, split_len, split_tap, store_vox,
                                 tap_coord, tap_source, wide, widen)


@triton.jit
def conv3d_igemm_kernel(
    # Pointers
    a_ptr,     # gathered operand [N, G*KC, AD, AH, AW]: input (forward) or grad_output (grad-input)
    w_ptr,     # weight [Cout, Cin/g, KD, KH, KW]
    bias_ptr,  # [G*NC]; read only when HAS_BIAS
    y_ptr,     # produced [N, G*NC, YD, YH, YW]: output (forward) or grad_input
    # Sizes
    M,         # N * YD * YH * YW
    NUM_M,     # programs along M: cdiv(M, BLOCK_M)
    AD, AH, AW, YD, YH, YW,
    # Strides
    sa_n, sa_c, sa_d, sa_h, sa_w,
    sw_g, sw_k, sw_n, sw_d, sw_h, sw_w,  # weight: per group, reduction channel, produced channel, taps
    sb,        # bias
    sy_n, sy_c, sy_d, sy_h, sy_w,
    # Meta-parameters
    KC: tl.constexpr,  # reduction channels per group: Cin/g (forward), Cout/g (grad-input)
    NC: tl.constexpr,  # produced channels per group: Cout/g (forward), Cin/g (grad-input)
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,  # kernel extent, fixed per layer
    STR_D: tl.constexpr, STR_H: tl.constexpr, STR_W: tl.constexpr,  # constexpr: divisions fold
    PAD_D: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,  # left padding
    DIL_D: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    TRANSPOSED: tl.constexpr,  # False: forward; True: grad-input through the transposed tap map
    HAS_BIAS: tl.constexpr,    # explicit flag, never a zero tensor
    ACC_DTYPE: tl.constexpr,   # fp32; fp64 for float64 tensors
    PRECISION: tl.constexpr,   # "tf32" where torch allows it for fp32, else "ieee"
    WIDE: tl.constexpr,        # int64 voxel index and weight offsets: they can pass 2**31
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # GEMM tile
):
    NUM_N: tl.constexpr = (NC + BLOCK_N - 1) // BLOCK_N
    i_m, i_n, i_g = program_ids(NUM_M, NUM_N)
    sw_k, sw_n, sw_d, sw_h, sw_w = (widen(sw_k, WIDE), widen(sw_n, WIDE), widen(sw_d, WIDE),
                                    widen(sw_h, WIDE), widen(sw_w, WIDE))
    o_m = widen(i_m, WIDE) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    n, yd, yh, yw = split_flat(o_m, YD, YH, YW, WIDE)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < NC
    o_k = tl.arange(0, BLOCK_K)

    o_a0 = n.to(tl.int64) * sa_n + (i_g * KC).to(tl.int64) * sa_c  # [BLOCK_M]
    p_w = w_ptr + i_g.to(tl.int64) * sw_g + o_n[None, :] * sw_n
    NUM_CB: tl.constexpr = (KC + BLOCK_K - 1) // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for kk in range(KD * KH * KW * NUM_CB):
        kd, kh, kw = split_tap(kk // NUM_CB, KH, KW)
        c = (kk % NUM_CB) * BLOCK_K + o_k
        m_c = c < KC
        ad, v_d = tap_coord(yd, kd, AD, STR_D, PAD_D, DIL_D, TRANSPOSED)
        ah, v_h = tap_coord(yh, kh, AH, STR_H, PAD_H, DIL_H, TRANSPOSED)
        aw, v_w = tap_coord(yw, kw, AW, STR_W, PAD_W, DIL_W, TRANSPOSED)
        m_a = m_m & v_d & v_h & v_w
        o_a = o_a0 + ad.to(tl.int64) * sa_d + ah.to(tl.int64) * sa_h + aw.to(tl.int64) * sa_w
        b_a = load_vox(a_ptr + o_a[:, None] + c.to(tl.int64)[None, :] * sa_c,
                       m_a[:, None] & m_c[None, :], VOX=0)
        b_w = tl.load(p_w + c[:, None] * sw_k + (kd * sw_d + kh * sw_h + kw * sw_w),
                      mask=m_c[:, None] & m_n[None, :], other=0.0)
        # A masked tap adds 0·w: in grad-input, NaN for an Inf weight where aten sums nothing
        # (masking the accumulator cost ~220 instructions a step on sm_90), so lk3d._algos sends
        # a grad-input with a non-finite weight to aten. The forward multiplies the zero padding,
        # as F.conv3d's explicit padding does.
        acc = tl.dot(b_a, b_w, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + (i_g * NC + o_n) * sb, mask=m_n, other=0.0).to(ACC_DTYPE)[None, :]
    o_y = (n.to(tl.int64) * sy_n + yd.to(tl.int64) * sy_d + yh.to(tl.int64) * sy_h
           + yw.to(tl.int64) * sy_w)
    p_y = y_ptr + o_y[:, None] + (i_g * NC + o_n).to(tl.int64)[None, :] * sy_c
    store_vox(p_y, acc.to(y_ptr.dtype.element_ty), m_m[:, None] & m_n[None, :], VOX=0)


@triton.jit
def conv3d_dw_kernel(
    # Pointers
    a_ptr,     # gathered operand: input [N, Cin, AD, AH, AW] (forward) or grad_output (grad-input)
    w_ptr,     # weight [Cout, 1, KD, KH, KW], Cout = Cin * MULT
    bias_ptr,  # [Cout]; read only when HAS_BIAS
    y_ptr,     # produced: output [N, Cout, ...] (forward) or grad_input [N, Cin, ...]
    # Sizes
    S,         # YD * YH * YW
    NUM_S,     # programs per (batch, channel): cdiv(S, BLOCK)
    AD, AH, AW, YD, YH, YW,
    # Strides
    sa_n, sa_c, sa_d, sa_h, sa_w,
    sw_c, sw_d, sw_h, sw_w,
    sb,        # bias
    sy_n, sy_c, sy_d, sy_h, sy_w,
    # Meta-parameters
    CY: tl.constexpr,    # produced channels
    MULT: tl.constexpr,  # channel multiplier Cout / Cin
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    STR_D: tl.constexpr, STR_H: tl.constexpr, STR_W: tl.constexpr,
    PAD_D: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_D: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    TRANSPOSED: tl.constexpr,  # False: forward; True: grad-input (sums the MULT output channels)
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    WIDE: tl.constexpr,        # int64 voxel index: a channel's volume can pass 2**31
    BLOCK: tl.constexpr,       # output voxels per program
):
    i_s, _, i_nc = program_ids(NUM_S, 1)
    n = i_nc // CY
    c = i_nc % CY
    o_s = widen(i_s, WIDE) * BLOCK + tl.arange(0, BLOCK)
    m_s = o_s < S
    _, yd, yh, yw = split_flat(o_s, YD, YH, YW, WIDE)

    NR: tl.constexpr = MULT if TRANSPOSED else 1
    acc = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    for j in range(NR):
        if TRANSPOSED:
            c_a = c * MULT + j
            c_w = c_a
        else:
            c_a = c // MULT
            c_w = c
        p_a = a_ptr + n.to(tl.int64) * sa_n + c_a.to(tl.int64) * sa_c
        p_w = w_ptr + c_w.to(tl.int64) * sw_c
        for kd in range(KD):
            ad, v_d = tap_coord(yd, kd, AD, STR_D, PAD_D, DIL_D, TRANSPOSED)
            for kh in range(KH):
                ah, v_h = tap_coord(yh, kh, AH, STR_H, PAD_H, DIL_H, TRANSPOSED)
                p_row = p_a + ad.to(tl.int64) * sa_d + ah.to(tl.int64) * sa_h
                m_row = m_s & v_d & v_h
                for kw in range(KW):
                    aw, v_w = tap_coord(yw, kw, AW, STR_W, PAD_W, DIL_W, TRANSPOSED)
                    b_a = tl.load(p_row + aw.to(tl.int64) * sa_w, mask=m_row & v_w, other=0.0)
                    b_w = tl.load(p_w + kd * sw_d + kh * sw_h + kw * sw_w)
                    acc += b_a.to(ACC_DTYPE) * b_w.to(ACC_DTYPE)  # masked taps: 0·w (as above)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c * sb).to(ACC_DTYPE)
    o_y = yd.to(tl.int64) * sy_d + yh.to(tl.int64) * sy_h + yw.to(tl.int64) * sy_w
    p_y = y_ptr + n.to(tl.int64) * sy_n + c.to(tl.int64) * sy_c + o_y
    tl.store(p_y, acc.to(y_ptr.dtype.element_ty), mask=m_s)


@triton.jit
def conv3d_wgrad_kernel(
    # Pointers
    x_ptr,     # input [N, Cin, XD, XH, XW]
    dy_ptr,    # grad_output [N, Cout, OD, OH, OW]
    dw_ptr,    # fp32 partials [SPLIT, Cout, Cin/g, KD*KH*KW], contiguous
    # Sizes
    M,         # N * OD * OH * OW
    M_PER_SPLIT,  # reduction length per split program (a multiple of BLOCK_K)
    G,         # groups
    XD, XH, XW, OD, OH, OW,
    # Strides
    sx_n, sx_c, sx_d, sx_h, sx_w,
    sy_n, sy_c, sy_d, sy_h, sy_w,
    # Meta-parameters
    CIG: tl.constexpr, COG: tl.constexpr,  # channels per group
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    STR_D: tl.constexpr, STR_H: tl.constexpr, STR_W: tl.constexpr,
    PAD_D: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_D: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDE: tl.constexpr,  # int64 voxel index: the reduction can pass 2**31 voxels
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_K: tl.constexpr,  # GEMM tile
):
    NUM_CO: tl.constexpr = (COG + BLOCK_CO - 1) // BLOCK_CO
    NUM_CI: tl.constexpr = (CIG + BLOCK_CI - 1) // BLOCK_CI
    i_p, i_g, i_s = program_ids(KD * KH * KW * NUM_CO * NUM_CI, G)
    tap = i_p // (NUM_CO * NUM_CI)
    i_co = (i_p // NUM_CI) % NUM_CO
    i_ci = i_p % NUM_CI
    kd, kh, kw = split_tap(tap, KH, KW)
    o_co = i_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    m_co = o_co < COG
    o_ci = i_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    m_ci = o_ci < CIG
    o_k = tl.arange(0, BLOCK_K)
    p_dy = dy_ptr + (i_g * COG + o_co).to(tl.int64)[:, None] * sy_c
    p_x = x_ptr + (i_g * CIG + o_ci).to(tl.int64)[None, :] * sx_c

    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=ACC_DTYPE)
    lo = widen(i_s, WIDE) * M_PER_SPLIT
    for m0 in range(0, M_PER_SPLIT, BLOCK_K):
        o_m = lo + m0 + o_k
        m_m = o_m < M
        o_y, o_x, v_x = tap_source(o_m, kd, kh, kw, OD, OH, OW, XD, XH, XW, sx_n, sx_d, sx_h, sx_w,
                                   sy_n, sy_d, sy_h, sy_w, STR_D, STR_H, STR_W, PAD_D, PAD_H, PAD_W,
                                   DIL_D, DIL_H, DIL_W, WIDE)
        b_dy = load_vox(p_dy + o_y[None, :], m_co[:, None] & m_m[None, :], VOX=1)
        b_x = load_vox(p_x + o_x[:, None], (m_m & v_x)[:, None] & m_ci[None, :], VOX=0)
        acc = tl.dot(b_dy, b_x, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)

    T: tl.constexpr = KD * KH * KW
    p_dw = (dw_ptr + i_s.to(tl.int64) * (COG * G * CIG * T)
            + (i_g * COG + o_co).to(tl.int64)[:, None] * (CIG * T) + o_ci[None, :] * T + tap)
    tl.store(p_dw, acc.to(dw_ptr.dtype.element_ty), mask=m_co[:, None] & m_ci[None, :])


@triton.jit
def conv3d_dw_wgrad_kernel(
    # Pointers
    x_ptr,     # input [N, Cin, XD, XH, XW]
    dy_ptr,    # grad_output [N, Cout, OD, OH, OW], Cout = Cin * MULT
    dw_ptr,    # fp32 partials [SPLIT, Cout, KD*KH*KW], contiguous
    # Sizes
    M, M_PER_SPLIT,  # N * OD * OH * OW; reduction length per split (a multiple of BLOCK_S)
    XD, XH, XW, OD, OH, OW,
    # Strides
    sx_n, sx_c, sx_d, sx_h, sx_w,
    sy_n, sy_c, sy_d, sy_h, sy_w,
    # Meta-parameters
    CO: tl.constexpr, MULT: tl.constexpr,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    STR_D: tl.constexpr, STR_H: tl.constexpr, STR_W: tl.constexpr,
    PAD_D: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_D: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    WIDE: tl.constexpr,     # int64 voxel index: the reduction can pass 2**31 voxels
    BLOCK_T: tl.constexpr,  # taps per program: each grad-output load serves BLOCK_T taps
    BLOCK_S: tl.constexpr,  # voxels per reduction step
):
    T: tl.constexpr = KD * KH * KW
    c, i_t, i_s = program_ids(CO, (T + BLOCK_T - 1) // BLOCK_T)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < T
    kd, kh, kw = split_tap(o_t, KH, KW)
    p_dy = dy_ptr + c.to(tl.int64) * sy_c
    p_x = x_ptr + (c // MULT).to(tl.int64) * sx_c
    acc = tl.zeros((BLOCK_T, BLOCK_S), dtype=ACC_DTYPE)
    lo = widen(i_s, WIDE) * M_PER_SPLIT
    for m0 in range(0, M_PER_SPLIT, BLOCK_S):
        o_m = lo + m0 + tl.arange(0, BLOCK_S)
        m_m = o_m < M
        n, od, oh, ow = split_flat(o_m, OD, OH, OW, WIDE)
        n64 = n.to(tl.int64)
        o_y = n64 * sy_n + od.to(tl.int64) * sy_d + oh.to(tl.int64) * sy_h + ow.to(tl.int64) * sy_w
        b_dy = tl.load(p_dy + o_y, mask=m_m, other=0.0).to(ACC_DTYPE)
        xd, v_d = tap_coord(od[None, :], kd[:, None], XD, STR_D, PAD_D, DIL_D, False)
        xh, v_h = tap_coord(oh[None, :], kh[:, None], XH, STR_H, PAD_H, DIL_H, False)
        xw, v_w = tap_coord(ow[None, :], kw[:, None], XW, STR_W, PAD_W, DIL_W, False)
        o_x = (n64[None, :] * sx_n + xd.to(tl.int64) * sx_d + xh.to(tl.int64) * sx_h
               + xw.to(tl.int64) * sx_w)
        m_x = m_t[:, None] & m_m[None, :] & v_d & v_h & v_w
        b_x = load_vox(p_x + o_x, m_x, VOX=1).to(ACC_DTYPE)
        acc += b_x * b_dy[None, :]
    p_dw = dw_ptr + (i_s * CO + c).to(tl.int64) * T + o_t
    tl.store(p_dw, tl.sum(acc, axis=1).to(dw_ptr.dtype.element_ty), mask=m_t)


@triton.jit
def bias_grad_kernel(
    dy_ptr,    # grad_output [N, C, OD, OH, OW]
    db_ptr,    # fp32 partials [SPLIT, C], contiguous
    M, M_PER_SPLIT, OD, OH, OW,  # M = N * OD * OH * OW
    sy_n, sy_c, sy_d, sy_h, sy_w,
    C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    WIDE: tl.constexpr,  # int64 voxel index: the reduction can pass 2**31 voxels
    BLOCK_S: tl.constexpr,
):
    c, _, i_s = program_ids(C, 1)
    acc = tl.zeros((BLOCK_S,), dtype=ACC_DTYPE)
    lo = widen(i_s, WIDE) * M_PER_SPLIT
    for m0 in range(0, M_PER_SPLIT, BLOCK_S):
        o_m = lo + m0 + tl.arange(0, BLOCK_S)
        n, od, oh, ow = split_flat(o_m, OD, OH, OW, WIDE)
        o_y = (n.to(tl.int64) * sy_n + od.to(tl.int64) * sy_d + oh.to(tl.int64) * sy_h
               + ow.to(tl.int64) * sy_w)
        acc += tl.load(dy_ptr + c.to(tl.int64) * sy_c + o_y, mask=o_m < M, other=0.0).to(ACC_DTYPE)
    tl.store(db_ptr + i_s * C + c, tl.sum(acc, axis=0).to(db_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------------------
# Launchers: check what the kernel needs, allocate, launch. Each takes one explicit config (the
# space is lk3d.kernels.tiled_configs; the choice is lk3d.autotune's) and padding as six ints.
# ----------------------------------------------------------------------------------------------

_GEMM_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")


def conv3d_fwd(x, w, bias, stride, padding, dilation, groups, config, *, allow_tf32=False,
               out=None):
    """Dense/grouped forward through the implicit GEMM. Config keys: BLOCK_M, BLOCK_N,
    BLOCK_K."""
    check_config(config, _GEMM_KEYS)
    N, cin, D, H, W = x.shape
    cout = w.shape[0]
    kc, nc = cin // groups, cout // groups
    size = out_size(x.shape[2:], w.shape[2:], stride, padding, dilation)
    y = alloc((N, cout, *size), x, out, memory_format(x))
    M = N * math.prod(size)
    if y.numel() == 0:
        return y
    num_m = triton.cdiv(M, config["BLOCK_M"])
    conv3d_igemm_kernel[flat_grid(num_m, triton.cdiv(nc, config["BLOCK_N"]), groups)](
        x, w, bias if bias is not None else w, y,
        M, num_m, D, H, W, *size,
        *x.stride(),
        nc * w.stride(0), w.stride(1), w.stride(0), *w.stride()[2:],
        bias.stride(0) if bias is not None else 0,
        *y.stride(),
        KC=kc, NC=nc, **geometry(stride, padding, dilation, w.shape[2:]),
        TRANSPOSED=False, HAS_BIAS=bias is not None, ACC_DTYPE=acc_dtype(x),
        PRECISION=precision(x, allow_tf32),
        WIDE=wide(num_m * config["BLOCK_M"], reach(w), volume=math.prod(size)),
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        **launch_opts(config))
    return y


def conv3d_bwd_input(dy, w, input_shape, stride, padding, dilation, groups, config, *,
                     allow_tf32=False, out=None):
    """Dense/grouped grad-input: the implicit GEMM with the transposed tap map."""
    check_config(config, _GEMM_KEYS)
    N, cin, D, H, W = input_shape
    cout = w.shape[0]
    kc, nc = cout // groups, cin // groups
    dx = alloc(tuple(input_shape), dy, out, memory_format(dy))
    M = N * D * H * W
    if dx.numel() == 0:
        return dx
    num_m = triton.cdiv(M, config["BLOCK_M"])
    conv3d_igemm_kernel[flat_grid(num_m, triton.cdiv(nc, config["BLOCK_N"]), groups)](
        dy, w, w, dx,
        M, num_m, *dy.shape[2:], D, H, W,
        *dy.stride(),
        kc * w.stride(0), w.stride(0), w.stride(1), *w.stride()[2:], 0,
        *dx.stride(),
        KC=kc, NC=nc, **geometry(stride, padding, dilation, w.shape[2:]),
        TRANSPOSED=True, HAS_BIAS=False, ACC_DTYPE=acc_dtype(dy),
        PRECISION=precision(dy, allow_tf32),
        WIDE=wide(num_m * config["BLOCK_M"], reach(w), volume=D * H * W),
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        **launch_opts(config))
    return dx


def conv3d_dw_fwd(x, w, bias, stride, padding, dilation, config, *, out=None):
    """Depthwise forward (groups = Cin, Cout = Cin * multiplier). Config keys: BLOCK."""
    check_config(config, ("BLOCK",))
    N, cin, D, H, W = x.shape
    cout = w.shape[0]
    size = out_size(x.shape[2:], w.shape[2:], stride, padding, dilation)
    y = alloc((N, cout, *size), x, out, memory_format(x))
    S = math.prod(size)
    if y.numel() == 0:
        return y
    num_s = triton.cdiv(S, config["BLOCK"])
    conv3d_dw_kernel[flat_grid(num_s, N * cout)](
        x, w, bias if bias is not None else w, y,
        S, num_s, D, H, W, *size,
        *x.stride(), w.stride(0), *w.stride()[2:], bias.stride(0) if bias is not None else 0,
        *y.stride(),
        CY=cout, MULT=cout // cin, **geometry(stride, padding, dilation, w.shape[2:]),
        TRANSPOSED=False, HAS_BIAS=bias is not None, ACC_DTYPE=acc_dtype(x),
        WIDE=wide(num_s * config["BLOCK"], volume=S), BLOCK=config["BLOCK"], **launch_opts(config))
    return y


def conv3d_dw_bwd_input(dy, w, input_shape, stride, padding, dilation, config, *, out=None):
    """Depthwise grad-input: the depthwise body with the transposed tap map."""
    check_config(config, ("BLOCK",))
    N, cin, D, H, W = input_shape
    dx = alloc(tuple(input_shape), dy, out, memory_format(dy))
    S = D * H * W
    if dx.numel() == 0:
        return dx
    num_s = triton.cdiv(S, config["BLOCK"])
    conv3d_dw_kernel[flat_grid(num_s, N * cin)](
        dy, w, w, dx,
        S, num_s, *dy.shape[2:], D, H, W,
        *dy.stride(), w.stride(0), *w.stride()[2:], 0, *dx.stride(),
        CY=cin, MULT=w.shape[0] // cin, **geometry(stride, padding, dilation, w.shape[2:]),
        TRANSPOSED=True, HAS_BIAS=False, ACC_DTYPE=acc_dtype(dy),
        WIDE=wide(num_s * config["BLOCK"], volume=S), BLOCK=config["BLOCK"], **launch_opts(config))
    return dx


def conv3d_bwd_weight(x, dy, weight_shape, stride, padding, dilation, groups, config, *,
                      allow_tf32=False):
    """Dense/grouped grad-weight. Config keys: BLOCK_CO, BLOCK_CI, BLOCK_K, SPLIT."""
    check_config(config, ("BLOCK_CO", "BLOCK_CI", "BLOCK_K", "SPLIT"))
    cout, cig = weight_shape[0], weight_shape[1]
    cog = cout // groups
    M = dy.shape[0] * math.prod(dy.shape[2:])
    per, split = split_len(M, config["SPLIT"], config["BLOCK_K"])
    T = math.prod(weight_shape[2:])
    part = new((split, cout, cig, T), partial_dtype(x), x.device)
    tiles = T * triton.cdiv(cog, config["BLOCK_CO"]) * triton.cdiv(cig, config["BLOCK_CI"])
    conv3d_wgrad_kernel[flat_grid(tiles, groups, split)](
        x, dy, part, M, per, groups, *x.shape[2:], *dy.shape[2:], *x.stride(), *dy.stride(),
        CIG=cig, COG=cog, **geometry(stride, padding, dilation, weight_shape[2:]),
        ACC_DTYPE=acc_dtype(x), PRECISION=precision(x, allow_tf32),
        WIDE=wide(split * per, volume=math.prod(dy.shape[2:])),
        BLOCK_CO=config["BLOCK_CO"], BLOCK_CI=config["BLOCK_CI"], BLOCK_K=config["BLOCK_K"],
        **launch_opts(config))
    return part.sum(0).reshape(weight_shape).to(x.dtype)


def conv3d_dw_bwd_weight(x, dy, weight_shape, stride, padding, dilation, config):
    """Depthwise grad-weight. Config keys: BLOCK_T, BLOCK_S, SPLIT."""
    check_config(config, ("BLOCK_T", "BLOCK_S", "SPLIT"))
    cout = weight_shape[0]
    M = dy.shape[0] * math.prod(dy.shape[2:])
    per, split = split_len(M, config["SPLIT"], config["BLOCK_S"])
    T = math.prod(weight_shape[2:])
    part = new((split, cout, T), partial_dtype(x), x.device)
    conv3d_dw_wgrad_kernel[flat_grid(cout, triton.cdiv(T, config["BLOCK_T"]), split)](
        x, dy, part, M, per, *x.shape[2:], *dy.shape[2:], *x.stride(), *dy.stride(),
        CO=cout, MULT=cout // x.shape[1], **geometry(stride, padding, dilation, weight_shape[2:]),
        ACC_DTYPE=acc_dtype(x), WIDE=wide(split * per, volume=math.prod(dy.shape[2:])),
        BLOCK_T=config["BLOCK_T"], BLOCK_S=config["BLOCK_S"],
        **launch_opts(config))
    return part.sum(0).reshape(weight_shape).to(x.dtype)


def bias_grad(dy, config):
    """Sum of grad_output over batch and space, per channel. Config keys: BLOCK_S, SPLIT."""
    check_config(config, ("BLOCK_S", "SPLIT"))
    C = dy.shape[1]
    M = dy.shape[0] * math.prod(dy.shape[2:])
    per, split = split_len(M, config["SPLIT"], config["BLOCK_S"])
    part = new((split, C), partial_dtype(dy), dy.device)
    bias_grad_kernel[flat_grid(C, 1, split)](
        dy, part, M, per, *dy.shape[2:], *dy.stride(),
        C=C, ACC_DTYPE=acc_dtype(dy), WIDE=wide(split * per, volume=math.prod(dy.shape[2:])),
        BLOCK_S=config["BLOCK_S"], **launch_opts(config))
    return part.sum(0).to(dy.dtype)
