"""Block-sparse conv3d on the tensor-descriptor loader: forward and (stride 1) grad-input of channel
blocks (Cin/g > 1) on channels-innermost (NDHWC) activations, with work proportional to the
stored blocks.

Weight layout: ``lk3d.kernels.block_sparse`` (values [nnz, bo, bi, bd, bh, bw], CSR ``row_ptr``
over output-channel block rows, ``col`` = ((ci·ND + db)·NH + hb)·NW + wb).

Entry lists. On the host, once per call (O(nnz·bd·bh·bw) int and copy work on the weight's
device, no device sync), the stored blocks become a list of *entries*, grouped by the produced
channel block they feed: forward, per block row; grad-input, per input-channel block column
(``block_sparse.transpose_index``). An entry is one tap of one stored block: its tap coordinates
and the reduction channel block of the operand, packed in one int32 word, and its
[K, N] value slice (forward [bi, bo]; grad-input [bo, bi] at the flipped tap), packed contiguously
in the order the kernel reads them.

GEMM mapping: M = N·OD·OH·OW output voxels, N = the produced block's channels (bo forward, bi
grad-input), K = entries × reduction channels of a block. A program owns one output brick (batch
n, depth od, BLOCK_H × BLOCK_W voxels of (OH, OW), as ``lk3d.kernels.implicit_gemm``) and one
produced block; its loop walks the block's entries, one a step: each reads the
operand box ``[1, 1, BLOCK_H, BLOCK_W, BK]`` at its tap's shifted corner and its value slice
``[1, BK, BN]`` through tensor descriptors (TMA on sm_90, zero fill past the borders: padding is
free), and feeds one ``tl.dot``. Before sm_90 the boxes are read through pointers (``TMA=False``,
16-byte ``cp.async`` rows). An entry's word is loaded one step ahead (loop-carried): the box
coordinates of a step never wait on a load issued in the same step, and the load's latency
overlaps the previous step's products.

Grad-input at stride 1 is the same kernel over grad_output with the transposed lists, flipped
taps and the left padding ``(k - 1)·dil - pad``.

What the kernel needs, checked by ``fits``: bi and bo powers of two in [16, 128] (whole
tl.dot tiles, no channel padding), kernel extents < 128 and at most 1024 reduction channel blocks
(the word's fields), stride 1 along H and W (a box is a dense brick; grad-input: stride 1),
fp16 / bf16 / fp32. Everything else takes ``lk3d.kernels.block_sparse``.

Stride along D, padding (left side), dilation, kernel extent and block channels are compile-time
constants; batch and spatial sizes and the entry counts are runtime ints. Output offsets are int64;
operand offsets through pointers int64 where the operand passes 2**31 elements (``WIDE``),
descriptor coordinates int32. Accumulation fp32.
"""
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from lk3d.kernels import memory_format, out_size
from lk3d.kernels.block_sparse import block_rows, transpose_index
from lk3d.kernels.block_sparse_configs import DESC_MAX_TAP
from lk3d.kernels.block_sparse_configs import descriptor_fits as fits
from lk3d.kernels.common import (acc_dtype, alloc, check_config, flat_grid, flipped_geometry,
                                 geometry, launch_opts, precision, program_ids, reach, wide)
from lk3d.kernels.implicit_gemm import _operand_box, ndhwc, ndhwc_desc, use_tma

# The entry word: (((kd << 7 | kh) << 7 | kw) << 10) | channel block, 31 bits: kernel extents
# below DESC_MAX_TAP, at most DESC_MAX_CHANNEL_BLOCKS reduction channel blocks (``fits``).


@triton.jit
def _entry(word, id0, ih0, iw0, BK: tl.constexpr, DIL_D: tl.constexpr, DIL_H: tl.constexpr,
           DIL_W: tl.constexpr):
    """The operand box corner (n, depth, row, column, channel) of an entry word."""
    kd = word >> 24
    kh = (word >> 17) & 127
    kw = (word >> 10) & 127
    return id0 + kd * DIL_D, ih0 + kh * DIL_H, iw0 + kw * DIL_W, (word & 1023) * BK


@triton.jit
def _value_box(v, e, BK: tl.constexpr, BN: tl.constexpr, TMA: tl.constexpr):
    """The [BK, BN] value slice of entry ``e`` of the packed values [entries, BK, BN]."""
    if TMA:
        box = v.load([e, 0, 0]).reshape(BK, BN)
    else:
        o = tl.arange(0, BK)[:, None] * BN + tl.arange(0, BN)[None, :]
        box = tl.load(v + tl.cast(e, tl.int64) * (BK * BN) + o)
    return box


@triton.jit
def bs_conv3d_desc_kernel(
    # Operands: tensor descriptors (TMA) or pointers to the same tensors
    x,          # operand (input; grad_output for grad-input), dense NDHWC [N, XD, XH, XW, C];
                # TMA: box [1, 1, BLOCK_H, BLOCK_W, BK]
    v,          # packed values [entries, BK, BN], contiguous; TMA: box [1, BK, BN]
    word_ptr,   # int32 [entries + 1]: entry words (one more: the loop reads one ahead)
    ptr_ptr,    # int32 [P + 1]: produced block p's entries are ptr[p]·TB .. ptr[p+1]·TB - 1
    bias_ptr,   # [P * BN]; read only when HAS_BIAS
    y_ptr,      # produced [N, P * BN, YD, YH, YW], any strides
    # Sizes
    XD, XH, XW, YD, YH, YW,
    NUM_M,          # programs along the output voxels: N * YD * NUM_H * NUM_W
    NUM_H, NUM_W,   # cdiv(YH, BLOCK_H (2·BLOCK_H: PAIR)), cdiv(YW, BLOCK_W)
    # Strides
    sb,         # bias
    sy_n, sy_c, sy_d, sy_h, sy_w,
    # Meta-parameters
    C: tl.constexpr,    # operand channels (pointer path: the voxel stride)
    BK: tl.constexpr, BN: tl.constexpr,  # reduction and produced channels of a block
    TB: tl.constexpr,   # taps of a block's brick: entries per stored block
    STR_D: tl.constexpr,  # H and W: 1
    PAD_D: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,  # left; negative allowed
    DIL_D: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,  # "tf32" where torch allows it for fp32, else "ieee"
    TMA: tl.constexpr,    # operands are tensor descriptors (sm_90: TMA); else pointers
    WIDE: tl.constexpr,   # pointers: int64 operand offsets (the operand passes 2**31 elements)
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,  # output brick: BLOCK_M = BLOCK_H * BLOCK_W
    PAIR: tl.constexpr,   # two bricks stacked along H per program: one box of 2·BLOCK_H rows a
                          # step (TMA: box [1, 1, 2·BLOCK_H, BLOCK_W, BK]), stored as two bricks
):
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    ROWS: tl.constexpr = BLOCK_M * (2 if PAIR else 1)  # operand rows a step
    i_m, _, i_p = program_ids(NUM_M, 1)
    i_nd = i_m // (NUM_H * NUM_W)
    i_hw = i_m % (NUM_H * NUM_W)
    n = i_nd // YD
    od = i_nd % YD
    oh0 = (i_hw // NUM_W) * (BLOCK_H * (2 if PAIR else 1))
    ow0 = (i_hw % NUM_W) * BLOCK_W
    id0 = od * STR_D - PAD_D
    ih0 = oh0 - PAD_H
    iw0 = ow0 - PAD_W
    r_h = tl.arange(0, ROWS) // BLOCK_W  # the pointer path's rows of the box
    r_w = tl.arange(0, ROWS) % BLOCK_W

    lo = tl.load(ptr_ptr + i_p) * TB
    hi = tl.load(ptr_ptr + i_p + 1) * TB
    acc = tl.zeros((ROWS, BN), dtype=ACC_DTYPE)
    word = tl.load(word_ptr + lo)
    for e in range(lo, hi):
        # the next entry's word: in flight while this entry's boxes load and multiply
        nxt = tl.load(word_ptr + e + 1)
        idd, ih, iw, c = _entry(word, id0, ih0, iw0, BK, DIL_D, DIL_H, DIL_W)
        b_v = _value_box(v, e, BK, BN, TMA)
        b_x = _operand_box(x, n, idd, ih, iw, c, r_h, r_w, XD, XH, XW, C, ROWS, BK, TMA, WIDE)
        # A tap past a border reads zeros and adds 0·v, as F.conv3d's zero padding does.
        acc = tl.dot(b_x, b_v, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        word = nxt

    if PAIR:
        acc, acc2 = acc.reshape(2, BLOCK_M, BN).permute(1, 2, 0).split()
        _store_brick(acc2, bias_ptr, y_ptr, n, od, oh0 + BLOCK_H, ow0, i_p, YH, YW, sb, sy_n,
                     sy_c, sy_d, sy_h, sy_w, BN, HAS_BIAS, ACC_DTYPE, BLOCK_H, BLOCK_W)
    _store_brick(acc, bias_ptr, y_ptr, n, od, oh0, ow0, i_p, YH, YW, sb, sy_n, sy_c, sy_d, sy_h,
                 sy_w, BN, HAS_BIAS, ACC_DTYPE, BLOCK_H, BLOCK_W)


@triton.jit
def _store_brick(acc, bias_ptr, y_ptr, n, od, oh0, ow0, i_p, YH, YW, sb, sy_n, sy_c, sy_d, sy_h,
                 sy_w, BN: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Store the [BLOCK_H·BLOCK_W, BN] brick at (n, od, oh0, ow0), channels of block i_p (plus the
    bias); the output rows are computed here, not held in registers through the loop."""
    oh = oh0 + tl.arange(0, BLOCK_H * BLOCK_W) // BLOCK_W
    ow = ow0 + tl.arange(0, BLOCK_H * BLOCK_W) % BLOCK_W
    o_n = i_p * BN + tl.arange(0, BN)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o_n * sb).to(ACC_DTYPE)[None, :]
    o_y = (n.to(tl.int64) * sy_n + od.to(tl.int64) * sy_d + oh.to(tl.int64) * sy_h
           + ow.to(tl.int64) * sy_w)
    p_y = y_ptr + o_y[:, None] + o_n.to(tl.int64)[None, :] * sy_c
    tl.store(p_y, acc.to(y_ptr.dtype.element_ty), mask=((oh < YH) & (ow < YW))[:, None])


@triton.jit
def _x_box_t(x, word, n, od, oh0, ow0, r_h, r_w, XD, XH, XW, CX: tl.constexpr, BI: tl.constexpr,
             STR_D: tl.constexpr, PAD_D: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
             DIL_D: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
             BLOCK_M: tl.constexpr, TMA: tl.constexpr, WIDE: tl.constexpr):
    """The input box [BLOCK_M, BI] an entry word reads for the output brick at (n, od, oh0,
    ow0)."""
    idd, ih, iw, c = _entry(word, od * STR_D - PAD_D, oh0 - PAD_H, ow0 - PAD_W, BI, DIL_D, DIL_H,
                            DIL_W)
    return _operand_box(x, n, idd, ih, iw, c, r_h, r_w, XD, XH, XW, CX, BLOCK_M, BI, TMA, WIDE)


@triton.jit
def _stack(a, b, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[a; b]: two [ROWS, COLS] tensors stacked along the rows."""
    return tl.join(a, b).permute(2, 0, 1).reshape(2 * ROWS, COLS)


@triton.jit
def bs_conv3d_desc_wgrad_kernel(
    # Operands: tensor descriptors (TMA) or pointers to the same tensors
    x,          # input, dense NDHWC [N, XD, XH, XW, CX]; TMA: box [1, 1, BLOCK_H, BLOCK_W, BI]
    dy,         # grad_output, dense NDHWC [N, YD, YH, YW, CY]; TMA: box [1, 1, BLOCK_H, BLOCK_W,
                # BO]
    word_ptr,   # int32 [GROUPS * GROUP]: entry words, GROUP consecutive ones of one block row
    grow_ptr,   # int32 [GROUPS]: each group's block row
    dv_ptr,     # fp32 partials [SPLIT, GROUPS * GROUP, BI, BO], contiguous
    # Sizes
    GROUPS,
    XD, XH, XW, YD, YH, YW,
    NUM_M,          # output bricks: N * YD * NUM_H * NUM_W
    NUM_H, NUM_W,   # cdiv(YH, BLOCK_H), cdiv(YW, BLOCK_W)
    M_PER_SPLIT,    # bricks per split program
    # Meta-parameters
    CX: tl.constexpr, CY: tl.constexpr,  # channels of x and dy (pointer path: voxel strides)
    BI: tl.constexpr, BO: tl.constexpr,  # block channels
    STR_D: tl.constexpr,  # H and W: 1
    PAD_D: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_D: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    WIDE: tl.constexpr,
    GROUP: tl.constexpr,  # entries a program (1, 2 or 4): their x boxes stacked, GROUP * BI rows
                          # of one tl.dot with the grad_output box read once a brick
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,  # output brick of a reduction step
):
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    i_g, _, i_s = program_ids(GROUPS, 1)
    p_w = word_ptr + i_g * GROUP
    w0 = tl.load(p_w)
    if GROUP >= 2:
        w1 = tl.load(p_w + 1)
    if GROUP == 4:
        w2 = tl.load(p_w + 2)
        w3 = tl.load(p_w + 3)
    c_o = tl.load(grow_ptr + i_g) * BO
    r_h = tl.arange(0, BLOCK_M) // BLOCK_W  # the pointer path's rows of the brick
    r_w = tl.arange(0, BLOCK_M) % BLOCK_W
    acc = tl.zeros((GROUP * BI, BO), dtype=ACC_DTYPE)
    lo = i_s * M_PER_SPLIT
    hi = tl.minimum(lo + M_PER_SPLIT, NUM_M)
    for j in range(lo, hi):
        i_nd = j // (NUM_H * NUM_W)
        i_hw = j % (NUM_H * NUM_W)
        n = i_nd // YD
        od = i_nd % YD
        oh0 = (i_hw // NUM_W) * BLOCK_H
        ow0 = (i_hw % NUM_W) * BLOCK_W
        # rows past the output's border read zeros from dy and add nothing
        b_dy = _operand_box(dy, n, od, oh0, ow0, c_o, r_h, r_w, YD, YH, YW, CY, BLOCK_M, BO, TMA,
                            WIDE)
        b_x = _x_box_t(x, w0, n, od, oh0, ow0, r_h, r_w, XD, XH, XW, CX, BI, STR_D, PAD_D, PAD_H,
                       PAD_W, DIL_D, DIL_H, DIL_W, BLOCK_M, TMA, WIDE)
        if GROUP >= 2:
            b_x1 = _x_box_t(x, w1, n, od, oh0, ow0, r_h, r_w, XD, XH, XW, CX, BI, STR_D, PAD_D,
                            PAD_H, PAD_W, DIL_D, DIL_H, DIL_W, BLOCK_M, TMA, WIDE)
            b_x = _stack(b_x, b_x1, BLOCK_M, BI)
        if GROUP == 4:
            b_x2 = _x_box_t(x, w2, n, od, oh0, ow0, r_h, r_w, XD, XH, XW, CX, BI, STR_D, PAD_D,
                            PAD_H, PAD_W, DIL_D, DIL_H, DIL_W, BLOCK_M, TMA, WIDE)
            b_x3 = _x_box_t(x, w3, n, od, oh0, ow0, r_h, r_w, XD, XH, XW, CX, BI, STR_D, PAD_D,
                            PAD_H, PAD_W, DIL_D, DIL_H, DIL_W, BLOCK_M, TMA, WIDE)
            b_x = _stack(b_x, _stack(b_x2, b_x3, BLOCK_M, BI), 2 * BLOCK_M, BI)
        # [GROUP * BLOCK_M, BI] -> each entry's box transposed: [GROUP * BI, BLOCK_M]
        b_xt = tl.trans(b_x.reshape(GROUP, BLOCK_M, BI), (0, 2, 1)).reshape(GROUP * BI, BLOCK_M)
        acc = tl.dot(b_xt, b_dy, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    o = (tl.arange(0, GROUP * BI)[:, None] * BO + tl.arange(0, BO)[None, :]).to(tl.int64)
    tl.store(dv_ptr + (i_s.to(tl.int64) * GROUPS + i_g) * (GROUP * BI * BO) + o, acc)


# ----------------------------------------------------------------------------------------------
# Host side: which problems the kernel takes, the entry lists, launchers.
# ----------------------------------------------------------------------------------------------

_KEYS = ("BLOCK_H", "BLOCK_W", "PAIR")


def entry_lists(values, row_ptr, col, weight_shape, block_shape, groups, transposed=False,
                pack=True):
    """The entry lists of the stored blocks (module docstring): ``(words int32 [L + 1],
    packed [L, BK, BN] in values' dtype, ptr int32 [P + 1])`` with L = nnz·taps; produced block
    p's entries are ``ptr[p]·taps .. ptr[p+1]·taps - 1``; ``pack`` False: packed is None."""
    cout, cig, kd, kh, kw = weight_shape
    bo, bi, bd, bh, bw = block_shape
    nnz = values.shape[0]
    nd, nh, nw, ni = kd // bd, kh // bh, kw // bw, cig // bi
    taps = bd * bh * bw
    dev = values.device
    if transposed:
        ptr, blk, rows = transpose_index(row_ptr, col, weight_shape, block_shape, groups)
        blk, rows = blk.long(), rows.long()
        produced = ptr.numel() - 1
        cblock = rows                        # dy channel block: the block row
    else:
        ptr = row_ptr.to(torch.int32)
        blk = torch.arange(nnz, device=dev)
        produced = ptr.numel() - 1
        group = block_rows(ptr, nnz).long() * bo // (cout // groups)
        cblock = group * ni + col.long() // (nd * nh * nw)  # input channel block, absolute
    c = col.long()[blk]
    t = torch.arange(taps, device=dev)
    td, th, tw = t // (bh * bw), (t // bw) % bh, t % bw
    tap_d = ((c // (nw * nh)) % nd)[:, None] * bd + td[None, :]
    tap_h = ((c // nw) % nh)[:, None] * bh + th[None, :]
    tap_w = (c % nw)[:, None] * bw + tw[None, :]
    if transposed:
        tap_d, tap_h, tap_w = kd - 1 - tap_d, kh - 1 - tap_h, kw - 1 - tap_w
    words = ((((tap_d << 7) | tap_h) << 7 | tap_w) << 10) | cblock[:, None]
    out = torch.zeros(nnz * taps + 1, dtype=torch.int32, device=dev)
    out[:-1] = words.reshape(-1)
    packed = None
    if pack:
        blocks = values[blk].reshape(nnz, bo, bi, taps)
        blocks = blocks.permute(0, 3, 1, 2) if transposed else blocks.permute(0, 3, 2, 1)
        bk, bn = (bo, bi) if transposed else (bi, bo)
        packed = blocks.reshape(nnz * taps, bk, bn).contiguous()
        if nnz == 0:  # a descriptor needs one row; no program reads it
            packed = values.new_zeros((1, bk, bn))
    return out, packed, ptr.to(torch.int32).contiguous()


def _launch(a, words, packed, ptr, bias, y, geo, config, allow_tf32, tma):
    """One launch producing ``y`` from the NDHWC operand ``a`` and the entry lists."""
    check_config(config, _KEYS)
    bh, bw, pair = (config[k] for k in _KEYS)
    _, bk, bn = packed.shape
    tma = use_tma(a) if tma is None else tma
    if tma:
        x = ndhwc_desc(a, bh * (2 if pair else 1), bw, bk)
        v = TensorDescriptor(packed, list(packed.shape), list(packed.stride()), [1, bk, bn])
    else:
        x, v = a, packed
    N, _, YD, YH, YW = y.shape
    num_h, num_w = triton.cdiv(YH, bh * (2 if pair else 1)), triton.cdiv(YW, bw)
    num_m = N * YD * num_h * num_w
    bs_conv3d_desc_kernel[flat_grid(num_m, 1, ptr.numel() - 1)](
        x, v, words, ptr, bias if bias is not None else packed, y,
        *a.shape[2:], YD, YH, YW, num_m, num_h, num_w,
        bias.stride(0) if bias is not None else 0, *y.stride(),
        C=a.shape[1], BK=bk, BN=bn, TB=geo.pop("TB"), STR_D=geo["STR_D"],
        **{k: geo[k] for k in ("PAD_D", "PAD_H", "PAD_W", "DIL_D", "DIL_H", "DIL_W")},
        HAS_BIAS=bias is not None, ACC_DTYPE=acc_dtype(y), PRECISION=precision(y, allow_tf32),
        TMA=tma, WIDE=not tma and wide(reach(a)), BLOCK_H=bh, BLOCK_W=bw, PAIR=pair,
        **launch_opts(config))
    return y


def block_sparse_desc_bwd_values(grad, x, values, row_ptr, col, weight_shape, block_shape,
                                 stride, padding, dilation, groups, config, *, allow_tf32=False,
                                 tma=None):
    """Gradient of the stored blocks, [nnz, bo, bi, bd, bh, bw] in values' dtype: per forward
    entry (one tap of a stored block), the reduction over the output voxels of the input box at
    the entry's tap by the grad_output box of its block row, ``tl.dot(x_box^T, dy_box)``, SPLIT
    programs writing fp32 partials the launcher sums (deterministic). Config keys: BLOCK_H,
    BLOCK_W, SPLIT (num_warps, num_stages optional)."""
    _checked(x.dtype, weight_shape, block_shape, stride, groups, False, wgrad=True)
    check_config(config, ("BLOCK_H", "BLOCK_W", "SPLIT"))
    nnz = values.shape[0]
    bo, bi, bd, bh_, bw_ = block_shape
    taps = bd * bh_ * bw_
    if nnz == 0 or grad.numel() == 0 or x.numel() == 0:
        return torch.zeros_like(values)
    words, _, _ = entry_lists(values, row_ptr, col, weight_shape, block_shape, groups,
                              pack=False)
    group = wgrad_group(bi)
    words, grows, pos = entry_groups(words[:-1], row_ptr, taps, group)
    groups_n = grows.numel()
    bh, bw, split = config["BLOCK_H"], config["BLOCK_W"], config["SPLIT"]
    N, _, YD, YH, YW = grad.shape
    num_h, num_w = triton.cdiv(YH, bh), triton.cdiv(YW, bw)
    num_m = N * YD * num_h * num_w
    per = triton.cdiv(num_m, max(1, split))
    split = triton.cdiv(num_m, per)
    part = torch.empty((split, groups_n * group, bi, bo), dtype=torch.float32, device=x.device)
    a, g = ndhwc(x), ndhwc(grad)
    tma = use_tma(a) if tma is None else tma
    if tma:
        xd, yd = ndhwc_desc(a, bh, bw, bi), ndhwc_desc(g, bh, bw, bo)
    else:
        xd, yd = a, g
    geo = geometry(stride, padding, dilation, weight_shape[2:])
    bs_conv3d_desc_wgrad_kernel[flat_grid(groups_n, 1, split)](
        xd, yd, words, grows, part, groups_n, *a.shape[2:], YD, YH, YW, num_m, num_h, num_w, per,
        CX=a.shape[1], CY=g.shape[1], BI=bi, BO=bo, STR_D=geo["STR_D"],
        **{k: geo[k] for k in ("PAD_D", "PAD_H", "PAD_W", "DIL_D", "DIL_H", "DIL_W")},
        ACC_DTYPE=tl.float32, PRECISION=precision(x, allow_tf32), TMA=tma,
        WIDE=not tma and wide(reach(a), reach(g)), GROUP=group, BLOCK_H=bh, BLOCK_W=bw,
        **launch_opts(config))
    dv = part.sum(0)[pos].view(nnz, taps, bi, bo).permute(0, 3, 2, 1)
    return dv.reshape(values.shape).to(values.dtype)


def wgrad_group(bi):
    """Entries a grad-values program stacks: 64 rows of its tl.dot (wgmma's least) where bi < 64."""
    return max(1, min(4, 64 // bi))


def entry_groups(words, row_ptr, taps, group):
    """The forward entry words regrouped for grad-values: each block row's entries padded to a
    multiple of ``group`` (word 0 reads a valid box; its partial is never read back). Returns
    ``(words int32 [Q·group], rows int32 [Q], pos int64 [nnz·taps])``: group q's block row and
    entry i's position; Q = cdiv(nnz·taps, group) + block rows bounds the groups without a
    device sync (the spare groups at the end compute partials nobody reads)."""
    counts = (row_ptr[1:] - row_ptr[:-1]).long() * taps
    per_row = (counts + group - 1) // group
    start = torch.zeros_like(per_row)
    start[1:] = per_row.cumsum(0)[:-1]
    n = words.numel()
    q = -(-n // group) + counts.numel()
    rows = block_rows(row_ptr, n // taps).long()
    rows = torch.repeat_interleave(rows, taps, output_size=n)
    pos = start[rows] * group + torch.arange(n, device=words.device) - row_ptr.long()[rows] * taps
    out = torch.zeros(q * group, dtype=torch.int32, device=words.device)
    out[pos] = words
    grows = torch.searchsorted(start, torch.arange(q, device=words.device), right=True) - 1
    return out, grows.clamp_min(0).to(torch.int32), pos


def _checked(dtype, weight_shape, block_shape, stride, groups, transposed, wgrad=False):
    if not fits(dtype, weight_shape, block_shape, stride, weight_shape[1] * groups, transposed,
                wgrad):
        raise ValueError(f"block_shape: expected channel blocks of 16..{64 if wgrad else 128} "
                         f"(powers of two), "
                         f"kernel extents < {DESC_MAX_TAP}, stride 1 along H and W "
                         f"{'and D ' if transposed else ''}and fp16, bf16 or fp32; got blocks "
                         f"{tuple(block_shape)} of {tuple(weight_shape)}, stride "
                         f"{tuple(stride)}, {dtype}")


def block_sparse_desc_fwd(x, values, row_ptr, col, weight_shape, block_shape, bias, stride,
                          padding, dilation, groups, config, *, allow_tf32=False, tma=None):
    """Block-sparse forward (``fits``). Config keys: BLOCK_H, BLOCK_W, PAIR (num_warps,
    num_stages optional). The result has
    ``x``'s layout (``lk3d.kernels.memory_format``)."""
    _checked(x.dtype, weight_shape, block_shape, stride, groups, False)
    size = out_size(x.shape[2:], weight_shape[2:], stride, padding, dilation)
    y = alloc((x.shape[0], weight_shape[0], *size), x, None, memory_format(x))
    if y.numel() == 0:
        return y
    words, packed, ptr = entry_lists(values, row_ptr, col, weight_shape, block_shape, groups)
    geo = geometry(stride, padding, dilation, weight_shape[2:])
    geo["TB"] = block_shape[2] * block_shape[3] * block_shape[4]
    return _launch(ndhwc(x), words, packed, ptr, bias, y, geo, config, allow_tf32, tma)


def block_sparse_desc_bwd_input(grad, values, row_ptr, col, weight_shape, block_shape,
                                input_shape, stride, padding, dilation, groups, config, *,
                                allow_tf32=False, tma=None):
    """Block-sparse grad-input at stride 1: the forward over ``grad`` with the transposed entry
    lists and the left padding ``(k - 1)·dil - pad``. Config keys as the forward's."""
    _checked(grad.dtype, weight_shape, block_shape, stride, groups, True)
    dx = alloc(tuple(input_shape), grad, None, memory_format(grad))
    if dx.numel() == 0 or grad.numel() == 0:
        return dx.zero_()
    words, packed, ptr = entry_lists(values, row_ptr, col, weight_shape, block_shape, groups,
                                     transposed=True)
    geo = flipped_geometry(weight_shape[2:], padding, dilation)
    geo["TB"] = block_shape[2] * block_shape[3] * block_shape[4]
    return _launch(ndhwc(grad), words, packed, ptr, None, dx, geo, config, allow_tf32, tma)
