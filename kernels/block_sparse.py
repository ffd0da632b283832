"""Block-sparse conv3d in Triton: forward, grad-input and grad-values, with work proportional to
the stored blocks.

Weight layout (BSR over output-channel block rows; ``lk3d.BlockSparseWeight`` holds it):

    weight_shape = (Cout, Cin/g, kd, kh, kw)   the dense weight it stands for
    block_shape  = (bo, bi, bd, bh, bw)        each divides the matching dim
    values  [nnz, bo, bi, bd, bh, bw]          stored blocks, contiguous
    row_ptr int32 [NO + 1], NO = Cout // bo    row r's blocks are values[row_ptr[r]:row_ptr[r+1]]
    col     int32 [nnz]                        ((ci*ND + db)*NH + hb)*NW + wb, ascending per row,
                                               (NI, ND, NH, NW) = (Cin/g/bi, kd/bd, kh/bh, kw/bw)

Groups: with Cin/g > 1 a block row lies in one group ((Cout/g) % bo == 0); depthwise (Cin/g == 1)
allows any bo dividing Cout, output channel o reading input channel o // (Cout/g).

Layout of activations: any strides (NCDHW, channels_last_3d, views); results come out in the
memory format of the tensor they are made from (``lk3d.kernels.memory_format``).

Channel-block path (Cin/g > 1), ``bs_conv3d_kernel`` with DEPTHWISE=False: an implicit GEMM whose
reduction walks only stored blocks. A program owns BLOCK_M produced voxels and one produced channel
block; its flattened loop runs over (stored block, tap of the block's brick): decode ``col`` into
(ci, db, hb, wb), gather the [BLOCK_M, bi] activation tile at the tap's shifted coordinates
(padding, stride and dilation are masks) and ``tl.dot`` it with the block's [bi, bo] tap slice
(channel extents padded to >= 16 with masks). Forward: M = N·OD·OH·OW, produced = block row.
Grad-input: the same body with the transposed tap map ``o = (i + pad - k·dil) / stride`` (exact
division) and a transposed index (per input-channel block column: its stored blocks and their
rows), built on the host by ``transpose_index`` from row_ptr/col with a few int tensor ops
(O(nnz + NI·g) memory and time, no device sync; rebuilt per call).

Depthwise path (Cin/g == 1), the same kernel with DEPTHWISE=True: each output channel of a block
row reads its own input channel, so a tap is an elementwise multiply-accumulate of the gathered
[BLOCK_M, bo] tile with the [bo] tap values. Grad-input walks row_ptr itself and produces one
channel per output channel; with a channel multiplier > 1 these land in an [N, Cout, D, H, W]
fp32 scratch that the launcher sums per input channel (multiplier × the input in memory).

Grad-values (``bs_conv3d_wgrad_kernel``): one program per (stored block, tap) and split of the
voxel reduction; [bi, BLOCK_S]·[BLOCK_S, bo] ``tl.dot`` products of the shifted input and the
output gradient (depthwise: elementwise products summed over voxels). SPLIT programs write fp32
partials that the launcher sums: deterministic, no atomics.

Stride, left padding, dilation, kernel extent, block shape and channels per group are
compile-time constants; batch and spatial sizes and nnz are runtime ints. Offsets are int64 where
a tensor can pass 2**31 elements. Accumulation is fp32 (fp64 for float64 tensors, which the
interpreter runs for gradcheck); fp32 ``tl.dot`` uses tf32 only when asked (``allow_tf32``).
"""
import math

import torch
import triton
import triton.language as tl

from lk3d.kernels import memory_format, out_size, pow2
from lk3d.kernels.common import (acc_dtype, check_config, flat_grid, geometry, launch_opts,
                                 load_vox, new, partial_dtype, precision, program_ids, split_flat,
                                 split_len, split_tap, store_vox, tap_coord, tap_source, wide,
                                 widen)


@triton.jit
def bs_conv3d_kernel(
    # Pointers
    a_ptr,     # gathered operand [N, CA, AD, AH, AW]: input (forward) or grad_output (grad-input)
    v_ptr,     # stored blocks [nnz, BO, BI, BD, BH, BW], contiguous
    ent_ptr,   # int32 [P + 1]: produced channel block p walks entries ent[p] .. ent[p+1]-1
    blk_ptr,   # int32 [nnz]: entry -> stored block (CSC: TRANSPOSED and not DEPTHWISE only)
    brow_ptr,  # int32 [nnz]: entry -> its block row (CSC only)
    col_ptr,   # int32 [nnz]: stored block -> flat block index over (NI, ND, NH, NW)
    bias_ptr,  # [Cout]; read only when HAS_BIAS
    y_ptr,     # produced [N, CY, YD, YH, YW]: output, grad_input, or (depthwise) per-Cout scratch
    # Sizes
    M,         # N * YD * YH * YW
    NUM_M,     # programs along M: cdiv(M, BLOCK_M)
    AD, AH, AW, YD, YH, YW,
    # Strides
    sa_n, sa_c, sa_d, sa_h, sa_w,
    sb,        # bias
    sy_n, sy_c, sy_d, sy_h, sy_w,
    # Meta-parameters
    BO: tl.constexpr, BI: tl.constexpr,  # channel extents of a block
    BD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,  # tap brick of a block
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,  # kernel extent: block grid (ND, NH, NW)
    CIG: tl.constexpr, COG: tl.constexpr,  # channels per group: a block row's input channel base
    MULT: tl.constexpr,  # depthwise forward: output channel o reads input channel o // MULT
    STR_D: tl.constexpr, STR_H: tl.constexpr, STR_W: tl.constexpr,  # constexpr: divisions fold
    PAD_D: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,  # left padding
    DIL_D: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    TRANSPOSED: tl.constexpr,  # False: forward; True: grad-input through the transposed tap map
    DEPTHWISE: tl.constexpr,   # Cin/g == 1: elementwise per channel instead of tl.dot
    HAS_BIAS: tl.constexpr,    # explicit flag, never a zero tensor
    ACC_DTYPE: tl.constexpr,   # fp32; fp64 for float64 tensors
    PRECISION: tl.constexpr,   # "tf32" where allowed for fp32, else "ieee"
    WIDE: tl.constexpr,        # int64 flat voxel index: the volume can pass 2**31 voxels
    BLOCK_M: tl.constexpr,     # produced voxels per program
    BLOCK_K: tl.constexpr,     # reduction channels of a block, padded (>= 16 for tl.dot)
    BLOCK_N: tl.constexpr,     # produced channels of a block, padded (depthwise: == BLOCK_K)
):
    # i_p: the produced channel block (a block row, or an input-channel block column)
    i_m, _, i_p = program_ids(NUM_M, 1)
    TB: tl.constexpr = BD * BH * BW
    NW: tl.constexpr = KW // BW
    NH: tl.constexpr = KH // BH
    ND: tl.constexpr = KD // BD
    VB: tl.constexpr = BO * BI * TB  # elements of one stored block
    # Reduction / produced extents and the [K, N] strides of a tap slice inside a block.
    if DEPTHWISE:
        KB: tl.constexpr = BO
        NB: tl.constexpr = BO
    elif TRANSPOSED:
        KB: tl.constexpr = BO
        NB: tl.constexpr = BI
    else:
        KB: tl.constexpr = BI
        NB: tl.constexpr = BO
    if TRANSPOSED:
        SV_K: tl.constexpr = BI * TB
        SV_N: tl.constexpr = TB
    else:
        SV_K: tl.constexpr = TB
        SV_N: tl.constexpr = BI * TB

    o_m = widen(i_m, WIDE) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    n, yd, yh, yw = split_flat(o_m, YD, YH, YW, WIDE)
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < KB
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < NB
    o_a0 = n.to(tl.int64) * sa_n
    if DEPTHWISE:  # the gathered channels are fixed for the program
        if TRANSPOSED:
            c_a = i_p * BO + o_k
        else:
            c_a = (i_p * BO + o_k) // MULT
        o_ac = c_a.to(tl.int64) * sa_c
    else:
        c_a0 = (i_p * BO // COG) * CIG  # forward: first input channel of the row's group

    lo = tl.load(ent_ptr + i_p)
    hi = tl.load(ent_ptr + i_p + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for e_t in range(lo * TB, hi * TB):  # (stored block, tap) flattened: one pipelined loop
        e = e_t // TB
        t = e_t % TB
        if DEPTHWISE:
            k = e
        elif TRANSPOSED:
            k = tl.load(blk_ptr + e)
            r = tl.load(brow_ptr + e)
        else:
            k = e
        c = tl.load(col_ptr + k)
        td, th, tw = split_tap(t, BH, BW)
        kd = ((c // (NW * NH)) % ND) * BD + td
        kh = ((c // NW) % NH) * BH + th
        kw = (c % NW) * BW + tw
        ad, v_d = tap_coord(yd, kd, AD, STR_D, PAD_D, DIL_D, TRANSPOSED)
        ah, v_h = tap_coord(yh, kh, AH, STR_H, PAD_H, DIL_H, TRANSPOSED)
        aw, v_w = tap_coord(yw, kw, AW, STR_W, PAD_W, DIL_W, TRANSPOSED)
        m_a = m_m & v_d & v_h & v_w
        o_a = o_a0 + ad.to(tl.int64) * sa_d + ah.to(tl.int64) * sa_h + aw.to(tl.int64) * sa_w
        if DEPTHWISE:
            o_c = o_ac
        elif TRANSPOSED:
            o_c = (r * BO + o_k).to(tl.int64) * sa_c
        else:
            o_c = (c_a0 + (c // (NW * NH * ND)) * BI + o_k).to(tl.int64) * sa_c
        b_a = load_vox(a_ptr + o_a[:, None] + o_c[None, :], m_a[:, None] & m_k[None, :], VOX=0)
        p_v = v_ptr + k.to(tl.int64) * VB + t
        if DEPTHWISE:
            b_v = tl.load(p_v + o_n * TB, mask=m_n, other=0.0)
            prod = b_a.to(ACC_DTYPE) * b_v.to(ACC_DTYPE)[None, :]
            if TRANSPOSED:  # a tap off the stride grid or the border adds nothing (not 0·v)
                prod = tl.where(m_a[:, None], prod, 0.0)
            acc += prod
        else:
            b_v = tl.load(p_v + o_k[:, None] * SV_K + o_n[None, :] * SV_N,
                          mask=m_k[:, None] & m_n[None, :], other=0.0)
            # Here a masked tap does add 0·v (NaN for a non-finite v): masking the accumulator
            # spilled registers on sm_80, and lk3d.block_sparse sends non-finite operands to the
            # dense convolution instead of these kernels.
            acc = tl.dot(b_a, b_v, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)

    o_yc = i_p * NB + o_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o_yc * sb, mask=m_n, other=0.0).to(ACC_DTYPE)[None, :]
    o_y = (n.to(tl.int64) * sy_n + yd.to(tl.int64) * sy_d + yh.to(tl.int64) * sy_h
           + yw.to(tl.int64) * sy_w)
    p_y = y_ptr + o_y[:, None] + o_yc.to(tl.int64)[None, :] * sy_c
    store_vox(p_y, acc.to(y_ptr.dtype.element_ty), m_m[:, None] & m_n[None, :], VOX=0)


@triton.jit
def bs_conv3d_wgrad_kernel(
    # Pointers
    x_ptr,     # input [N, Cin, XD, XH, XW]
    dy_ptr,    # grad_output [N, Cout, OD, OH, OW]
    brow_ptr,  # int32 [nnz]: block row of each stored block
    col_ptr,   # int32 [nnz]: flat block index over (NI, ND, NH, NW)
    dw_ptr,    # fp32 partials [SPLIT, nnz, BO, BI, BD*BH*BW], contiguous
    # Sizes
    NNZ,       # stored blocks
    M,         # N * OD * OH * OW
    M_PER_SPLIT,  # reduction length per split program (a multiple of BLOCK_S)
    XD, XH, XW, OD, OH, OW,
    # Strides
    sx_n, sx_c, sx_d, sx_h, sx_w,
    sy_n, sy_c, sy_d, sy_h, sy_w,
    # Meta-parameters
    BO: tl.constexpr, BI: tl.constexpr,
    BD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    CIG: tl.constexpr, COG: tl.constexpr,
    MULT: tl.constexpr,  # depthwise: output channel o reads input channel o // MULT
    STR_D: tl.constexpr, STR_H: tl.constexpr, STR_W: tl.constexpr,
    PAD_D: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_D: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    DEPTHWISE: tl.constexpr,   # Cin/g == 1: elementwise products summed over voxels
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDE: tl.constexpr,        # int64 voxel index: the reduction can pass 2**31 voxels
    BLOCK_I: tl.constexpr,     # bi padded (>= 16 for tl.dot; 1 for depthwise)
    BLOCK_O: tl.constexpr,     # bo padded (>= 16 for tl.dot)
    BLOCK_S: tl.constexpr,     # voxels per reduction step
):
    TB: tl.constexpr = BD * BH * BW
    i_kt, _, i_s = program_ids(NNZ * TB, 1)
    NW: tl.constexpr = KW // BW
    NH: tl.constexpr = KH // BH
    ND: tl.constexpr = KD // BD
    k = i_kt // TB
    t = i_kt % TB
    r = tl.load(brow_ptr + k)
    c = tl.load(col_ptr + k)
    td, th, tw = split_tap(t, BH, BW)
    kd = ((c // (NW * NH)) % ND) * BD + td
    kh = ((c // NW) % NH) * BH + th
    kw = (c % NW) * BW + tw
    o_o = tl.arange(0, BLOCK_O)
    m_o = o_o < BO
    o_i = tl.arange(0, BLOCK_I)
    m_i = o_i < BI
    p_dy = dy_ptr + (r * BO + o_o).to(tl.int64) * sy_c
    if DEPTHWISE:
        p_x = x_ptr + ((r * BO + o_o) // MULT).to(tl.int64) * sx_c
        acc = tl.zeros((BLOCK_S, BLOCK_O), dtype=ACC_DTYPE)
    else:
        c_x = (r * BO // COG) * CIG + (c // (NW * NH * ND)) * BI + o_i
        p_x = x_ptr + c_x.to(tl.int64) * sx_c
        acc = tl.zeros((BLOCK_I, BLOCK_O), dtype=ACC_DTYPE)

    lo = widen(i_s, WIDE) * M_PER_SPLIT
    for m0 in range(0, M_PER_SPLIT, BLOCK_S):
        o_m = lo + m0 + tl.arange(0, BLOCK_S)
        m_m = o_m < M
        o_y, o_x, v_x = tap_source(o_m, kd, kh, kw, OD, OH, OW, XD, XH, XW, sx_n, sx_d, sx_h, sx_w,
                                   sy_n, sy_d, sy_h, sy_w, STR_D, STR_H, STR_W, PAD_D, PAD_H, PAD_W,
                                   DIL_D, DIL_H, DIL_W, WIDE)
        m_x = m_m & v_x
        b_dy = load_vox(p_dy[None, :] + o_y[:, None], m_m[:, None] & m_o[None, :], VOX=0)
        if DEPTHWISE:
            b_x = load_vox(p_x[None, :] + o_x[:, None], m_x[:, None] & m_o[None, :], VOX=0)
            acc += b_x.to(ACC_DTYPE) * b_dy.to(ACC_DTYPE)
        else:
            b_x = load_vox(p_x[:, None] + o_x[None, :], m_i[:, None] & m_x[None, :], VOX=1)
            acc = tl.dot(b_x, b_dy, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)

    p_dw = dw_ptr + (i_s.to(tl.int64) * NNZ + k) * (BO * BI * TB) + t
    if DEPTHWISE:
        tl.store(p_dw + o_o * TB, tl.sum(acc, axis=0).to(dw_ptr.dtype.element_ty), mask=m_o)
    else:
        tl.store(p_dw + o_o[None, :] * (BI * TB) + o_i[:, None] * TB,
                 acc.to(dw_ptr.dtype.element_ty), mask=m_i[:, None] & m_o[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers: allocate, build the cheap int index a launch needs, launch. Arguments are validated
# by the ops layer. Each takes one explicit config (the space is
# lk3d.kernels.block_sparse_configs; the choice is lk3d.autotune's) and padding as six ints.
# ----------------------------------------------------------------------------------------------

def _pad(n, lo):
    return pow2(n, lo, 1 << 30)


def tile_channels(block_shape, depthwise, transposed=False):
    """(BLOCK_K, BLOCK_N) of ``bs_conv3d_kernel``: the block's reduction and produced channel
    extents, padded to a power of two (>= 16 where they feed ``tl.dot``)."""
    bo, bi = block_shape[:2]
    if depthwise:
        return _pad(bo, 1), _pad(bo, 1)
    kb, nb = (bo, bi) if transposed else (bi, bo)
    return _pad(kb, 16), _pad(nb, 16)


def wgrad_channels(block_shape, depthwise):
    """(BLOCK_I, BLOCK_O) of ``bs_conv3d_wgrad_kernel``: bi and bo padded (>= 16 for tl.dot)."""
    bo, bi = block_shape[:2]
    return (1, _pad(bo, 1)) if depthwise else (_pad(bi, 16), _pad(bo, 16))


def block_rows(row_ptr, nnz):
    """int32 [nnz]: the block row of each stored block (from the CSR row pointers)."""
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    rows = torch.arange(counts.numel(), device=row_ptr.device)
    return torch.repeat_interleave(rows, counts, output_size=nnz).to(torch.int32)


def transpose_index(row_ptr, col, weight_shape, block_shape, groups):
    """The CSC view of the block index, for grad-input: per global input-channel block column
    j = g·NI + ci, its entries ``ptr[j] .. ptr[j+1]-1``, each with its stored block and block row.

    A stable sort of nnz int keys and a scatter-add over NI·groups counters, on row_ptr's device,
    without a host sync: O(nnz + NI·groups), cheap next to any convolution, so rebuilt per call.
    Returns ``(ptr int32 [NI·groups + 1], blk int32 [nnz], row int32 [nnz])``."""
    cout, cig, kd, kh, kw = weight_shape
    bo, bi, bd, bh, bw = block_shape
    ni, taps = cig // bi, (kd // bd) * (kh // bh) * (kw // bw)
    nnz = col.numel()
    rows = block_rows(row_ptr, nnz).long()
    gcol = (rows * bo // (cout // groups)) * ni + col.long() // taps
    order = torch.sort(gcol, stable=True).indices
    counts = torch.zeros(ni * groups, dtype=torch.long, device=col.device)
    counts.index_add_(0, gcol, torch.ones_like(gcol))
    ptr = torch.zeros(ni * groups + 1, dtype=torch.int32, device=col.device)
    ptr[1:] = counts.cumsum(0)
    return ptr, order.to(torch.int32), rows[order].to(torch.int32)


def _common(weight_shape, block_shape, stride, padding, dilation, groups):
    cout, cig = weight_shape[:2]
    bo, bi, bd, bh, bw = block_shape
    return dict(BO=bo, BI=bi, BD=bd, BH=bh, BW=bw, CIG=cig, COG=cout // groups,
                **geometry(stride, padding, dilation, weight_shape[2:]))


def block_sparse_fwd(x, values, row_ptr, col, weight_shape, block_shape, bias, stride, padding,
                     dilation, groups, config, *, allow_tf32=False):
    """Block-sparse forward. Config keys: BLOCK_M (num_warps, num_stages optional)."""
    check_config(config, ("BLOCK_M",))
    N = x.shape[0]
    cout, cig = weight_shape[:2]
    depthwise = cig == 1
    size = out_size(x.shape[2:], weight_shape[2:], stride, padding, dilation)
    M = N * math.prod(size)
    y = new((N, cout, *size), x.dtype, x.device, memory_format(x))
    block_k, block_n = tile_channels(block_shape, depthwise)
    if y.numel() == 0:
        return y
    num_m = triton.cdiv(M, config["BLOCK_M"])
    row_ptr, col = row_ptr.contiguous(), col.contiguous()  # the kernel reads them unit-strided
    bs_conv3d_kernel[flat_grid(num_m, 1, cout // block_shape[0])](
        x, values.contiguous(), row_ptr, row_ptr, row_ptr, col,
        bias if bias is not None else values, y,
        M, num_m, *x.shape[2:], *size, *x.stride(),
        bias.stride(0) if bias is not None else 0, *y.stride(),
        **_common(weight_shape, block_shape, stride, padding, dilation, groups),
        MULT=cout // x.shape[1] if depthwise else 1, TRANSPOSED=False, DEPTHWISE=depthwise,
        HAS_BIAS=bias is not None,
        ACC_DTYPE=acc_dtype(x), PRECISION=precision(x, allow_tf32),
        WIDE=wide(num_m * config["BLOCK_M"], volume=math.prod(size)),
        BLOCK_M=config["BLOCK_M"], BLOCK_K=block_k, BLOCK_N=block_n, **launch_opts(config))
    return y


def block_sparse_bwd_input(grad, values, row_ptr, col, weight_shape, block_shape, input_shape,
                           stride, padding, dilation, groups, config, *, allow_tf32=False):
    """Block-sparse grad-input: the forward body with the transposed tap map. Config keys:
    BLOCK_M."""
    check_config(config, ("BLOCK_M",))
    N, cin, D, H, W = input_shape
    cout, cig = weight_shape[:2]
    depthwise = cig == 1
    M = N * D * H * W
    mult = cout // cin
    if grad.numel() == 0 or math.prod(input_shape) == 0:
        return torch.zeros(tuple(input_shape), dtype=grad.dtype, device=grad.device).contiguous(
            memory_format=memory_format(grad))
    row_ptr, col = row_ptr.contiguous(), col.contiguous()  # the kernel reads them unit-strided
    if depthwise:
        ent, blk, brow = row_ptr, row_ptr, row_ptr
        produced = cout // block_shape[0]
        if mult == 1:
            dx = new(tuple(input_shape), grad.dtype, grad.device, memory_format(grad))
            y = dx
        else:  # one channel per output channel, summed per input channel below
            y = new((N, cout, D, H, W), partial_dtype(grad), grad.device)
    else:
        ent, blk, brow = transpose_index(row_ptr, col, weight_shape, block_shape, groups)
        produced = cin // block_shape[1]
        dx = y = new(tuple(input_shape), grad.dtype, grad.device, memory_format(grad))
    block_k, block_n = tile_channels(block_shape, depthwise, transposed=True)
    num_m = triton.cdiv(M, config["BLOCK_M"])
    bs_conv3d_kernel[flat_grid(num_m, 1, produced)](
        grad, values.contiguous(), ent, blk, brow, col, values, y,
        M, num_m, *grad.shape[2:], D, H, W, *grad.stride(), 0, *y.stride(),
        **_common(weight_shape, block_shape, stride, padding, dilation, groups),
        MULT=mult if depthwise else 1, TRANSPOSED=True, DEPTHWISE=depthwise, HAS_BIAS=False,
        ACC_DTYPE=acc_dtype(grad), PRECISION=precision(grad, allow_tf32),
        WIDE=wide(num_m * config["BLOCK_M"], volume=D * H * W),
        BLOCK_M=config["BLOCK_M"], BLOCK_K=block_k, BLOCK_N=block_n, **launch_opts(config))
    if depthwise and mult > 1:
        dx = y.view(N, cin, mult, D, H, W).sum(2).to(grad.dtype)
        dx = dx.contiguous(memory_format=memory_format(grad))
    return dx


def block_sparse_bwd_values(grad, x, values, row_ptr, col, weight_shape, block_shape, stride,
                            padding, dilation, groups, config, *, allow_tf32=False):
    """Gradient of the stored blocks, [nnz, bo, bi, bd, bh, bw] in values' dtype. Config keys:
    BLOCK_S, SPLIT."""
    check_config(config, ("BLOCK_S", "SPLIT"))
    nnz = values.shape[0]
    cout, cig = weight_shape[:2]
    depthwise = cig == 1
    bo, bi, bd, bh, bw = block_shape
    taps = bd * bh * bw
    M = grad.shape[0] * math.prod(grad.shape[2:])
    if nnz == 0:
        return torch.zeros_like(values)
    per, split = split_len(M, config["SPLIT"], config["BLOCK_S"])
    part = new((split, nnz, bo, bi, taps), partial_dtype(x), x.device)
    bs_conv3d_wgrad_kernel[flat_grid(nnz * taps, 1, split)](
        x, grad, block_rows(row_ptr, nnz), col.contiguous(), part,
        nnz, M, per, *x.shape[2:], *grad.shape[2:], *x.stride(), *grad.stride(),
        **_common(weight_shape, block_shape, stride, padding, dilation, groups),
        MULT=cout // x.shape[1] if depthwise else 1, DEPTHWISE=depthwise, ACC_DTYPE=acc_dtype(x),
        PRECISION=precision(x, allow_tf32),
        WIDE=wide(split * per, volume=math.prod(grad.shape[2:])),
        **dict(zip(("BLOCK_I", "BLOCK_O"), wgrad_channels(block_shape, depthwise))),
        BLOCK_S=config["BLOCK_S"], **launch_opts(config))
    return part.sum(0).reshape(values.shape).to(values.dtype)
