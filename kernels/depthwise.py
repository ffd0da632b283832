"""Direct depthwise conv3d on channels-innermost (NDHWC) tensors, with every loaded input reused
across the W taps from registers: forward and (stride 1) grad-input.

Layout: the gathered operand (input, or grad_output for grad-input) is read as a dense NDHWC
tensor (``channels_last_3d`` contiguous; the launchers convert other layouts once per call), so a
voxel's channels are contiguous and a thread loads VEC = 16 bytes of them (8 bf16/fp16, 4 fp32,
2 fp64 channels) per voxel whatever the tap's shift; this needs C·element size to be a multiple of
16 bytes: C % 8 == 0 for every dtype (``depthwise_configs.CHANNEL_MULTIPLE``).
The produced tensor is written through its strides, in the caller's layout.

Forward (``conv3d_dw_cl_kernel``, channel multiplier 1): a program owns one output row
(n, od, oh), BLOCK_V strips of R consecutive output voxels along W, and BLOCK_C channels. For each
of the KD·KH input rows the taps read, it walks the (R - 1)·STR_W + (KW - 1)·DIL_W + 1 input
positions of its strips once: each position is loaded once (one 16-byte load per thread), converted
once, and multiplied into every output of the strip it reaches, by the tap vector it needs; a tap's
weight vector is loaded once per row and serves the R outputs. The strip's R accumulators are a
tuple of tiles unrolled at compile time (R, KW, STR_W, DIL_W constexpr), so an input row costs
R + KW - 1 loads for R·KW FMAs per channel. Out-of-range positions (padding, row past the
border) are masked loads of zeros: a padded tap multiplies 0·w, as F.conv3d's explicit zero padding
does, so an Inf weight gives NaN at the borders just as there. bf16 is read as int32 pairs of
channels (``PAIRS``) and widened with one shift or mask per channel (Triton's conversion took two
instructions for the odd ones), into an even and an odd accumulator tile; its taps come as fp32
in the same even/odd split, so they need no conversion at all.

Grad-input for stride 1 is the forward with the taps flipped and the left padding
``(K - 1)·DIL - PAD`` (the launcher flips the weight); strided grad-input stays on
``lk3d.kernels.tiled.conv3d_dw_kernel``.

Grad-weight (``conv3d_dw_cl_wgrad_kernel``, any stride and dilation) is a reduction over the
grad-output voxels: dw[kd, kh, kw, c] = sum of x[n, od·S - P + kd·D, .., ow·S - P + kw·D, c] ·
dy[n, od, oh, ow, c]. A program owns BLOCK_C channels, one (kd, kh) tap row and a strip of KT of
its W taps, and a share (1 / SPLIT) of the grad-output rows (n, od, oh) whose input row (xd, xh)
is inside the input (the others add nothing and are not visited). Each step takes BLOCK_V strips
of R consecutive grad-output voxels along a row: it loads the R grad-output vectors once, then
walks the (R - 1)·STR_W + (KT - 1)·DIL_W + 1 input positions the strip's taps reach once, each
multiplied into the accumulator of every tap that meets it (for a given position and tap, at
most one output of the strip). So a step costs R + NP loads for R·KT FMAs per channel, and the
KT accumulator tiles stay in registers over the whole share; they are summed over the BLOCK_V
strips once at the end and written as fp32 partials [SPLIT, KD, KH, KW, C], which the launcher
sums. Positions past the row (padding) and voxels past the row's end are masked loads of zeros.

Stride, padding (left side), dilation, kernel extent and C are compile-time constants; batch and
spatial sizes are runtime ints. Row offsets are int64 (a tensor can pass 2**31 elements), offsets
within a row int32. Accumulation is fp32 (fp64 for float64 tensors).
"""
import torch
import triton
import triton.language as tl

from lk3d.kernels import out_size
from lk3d.kernels.common import (acc_dtype, alloc, check_config, flat_grid, flipped_geometry,
                                 geometry, launch_opts, new, partial_dtype, program_ids)
from lk3d.kernels.depthwise_configs import CHANNEL_MULTIPLE, tap_strip


@triton.jit
def _widen_pair(v, PAIRS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """The channels of a loaded tile in ACC_DTYPE: ``(even, odd)`` of an int32 tile of bf16 pairs
    (a bf16 is the upper half of its fp32: one shift or mask each), else ``(v,)``."""
    if PAIRS:
        out = ((v << 16).to(tl.float32, bitcast=True), (v & -65536).to(tl.float32, bitcast=True))
    else:
        out = (v.to(ACC_DTYPE),)
    return out


@triton.jit
def conv3d_dw_cl_kernel(
    # Pointers
    x_ptr,     # gathered operand, dense NDHWC [N, XD, XH, XW, C]; PAIRS: int32 [.., C / 2]
    w_ptr,     # taps [KD, KH, KW, C] in x's dtype, contiguous (flipped for grad-input);
               # PAIRS: fp32 [KD, KH, KW, 2, C / 2] (even channels, then odd)
    bias_ptr,  # [C]; read only when HAS_BIAS
    y_ptr,     # produced [N, C, YD, YH, YW], any strides
    # Sizes
    NUM_W,     # programs along W: cdiv(YW, BLOCK_V * R)
    XD, XH, XW, YD, YH, YW,
    # Strides
    sb,        # bias
    sy_n, sy_c, sy_d, sy_h, sy_w,
    # Meta-parameters
    C: tl.constexpr,  # channels: constexpr, so every voxel offset is a provable multiple of VEC
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    STR_D: tl.constexpr, STR_H: tl.constexpr, STR_W: tl.constexpr,
    PAD_D: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,  # left; negative allowed
    DIL_D: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PAIRS: tl.constexpr,    # bf16 read as int32 pairs: one instruction per widened channel
    BLOCK_V: tl.constexpr,  # strips per program (along W)
    BLOCK_C: tl.constexpr,  # channels per program
    R: tl.constexpr,        # outputs per strip: each loaded input serves up to R outputs
):
    NH: tl.constexpr = 2 if PAIRS else 1  # channel tiles a load widens into
    BLOCK_K: tl.constexpr = BLOCK_C // NH  # loaded elements per voxel
    CK: tl.constexpr = C // NH             # elements per voxel in memory
    NUM_C: tl.constexpr = (C + BLOCK_C - 1) // BLOCK_C
    i_c, i_w, i_row = program_ids(NUM_C, NUM_W)
    oh = i_row % YH
    t = i_row // YH
    od = t % YD
    n = t // YD
    o_k = i_c * BLOCK_K + tl.arange(0, BLOCK_K)
    m_k = o_k < CK
    ow0 = (i_w * BLOCK_V + tl.arange(0, BLOCK_V)) * R  # first output of each strip
    iw0 = ow0 * STR_W - PAD_W                           # its input position at tap 0
    o_lane = iw0[:, None] * CK + o_k[None, :]           # within an input row: int32
    row_len = XW * CK

    acc = ()
    for r in tl.static_range(R * NH):
        acc = acc + (tl.zeros((BLOCK_V, BLOCK_K), dtype=ACC_DTYPE),)
    NP: tl.constexpr = (R - 1) * STR_W + (KW - 1) * DIL_W + 1  # input positions of a strip
    for kd in range(KD):
        xd = od * STR_D - PAD_D + kd * DIL_D
        for kh in range(KH):
            xh = oh * STR_H - PAD_H + kh * DIL_H
            # A row outside the input reads nothing: its positions' bound becomes 0.
            lim = tl.where((xd >= 0) & (xd < XD) & (xh >= 0) & (xh < XH), XW, 0).to(tl.uint32)
            p_row = x_ptr + ((n * XD + xd).to(tl.int64) * XH + xh) * row_len + o_lane
            p_w = w_ptr + (kd * KH + kh) * (KW * C) + o_k[None, :]
            taps = ()
            for p in tl.static_range(NP):
                if p % DIL_W == 0 and p // DIL_W < KW:  # tap p / DIL_W first serves here (r = 0)
                    for j in tl.static_range(NH):
                        taps = taps + (tl.load(p_w + (p // DIL_W) * C + j * CK, mask=m_k[None, :],
                                               other=0.0).to(ACC_DTYPE),)
                m_p = ((iw0 + p).to(tl.uint32) < lim)[:, None] & m_k[None, :]
                b_x = _widen_pair(tl.load(p_row + p * CK, mask=m_p, other=0), PAIRS, ACC_DTYPE)
                nxt = ()
                for r in tl.static_range(R):
                    # p - r·STR_W: this position's tap offset for output r of the strip (written
                    # out, not named: a constexpr name cannot be reassigned in a static loop)
                    for j in tl.static_range(NH):
                        a = acc[r * NH + j]
                        if (p - r * STR_W >= 0 and (p - r * STR_W) % DIL_W == 0
                                and (p - r * STR_W) // DIL_W < KW):
                            a = a + b_x[j] * taps[(p - r * STR_W) // DIL_W * NH + j]
                        nxt = nxt + (a,)
                acc = nxt

    if HAS_BIAS:  # in the accumulators' layout: channel NH·k + j of tile j
        b_b = ()
        for j in tl.static_range(NH):
            b_b = b_b + (tl.load(bias_ptr + (o_k * NH + j) * sb, mask=m_k, other=0.0)
                         .to(ACC_DTYPE)[None, :],)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    p_y = (y_ptr + n.to(tl.int64) * sy_n + od.to(tl.int64) * sy_d + oh.to(tl.int64) * sy_h
           + o_c.to(tl.int64)[None, :] * sy_c)
    for r in tl.static_range(R):
        ow = ow0 + r
        out = ()
        for j in tl.static_range(NH):
            a = acc[r * NH + j]
            if HAS_BIAS:
                a = a + b_b[j]
            out = out + (a,)
        if PAIRS:  # interleave the even and odd channels back
            b_y = tl.reshape(tl.join(out[0], out[1]), (BLOCK_V, BLOCK_C))
        else:
            b_y = out[0]
        tl.store(p_y + ow.to(tl.int64)[:, None] * sy_w, b_y.to(y_ptr.dtype.element_ty),
                 mask=(ow < YW)[:, None] & m_c[None, :])


@triton.jit
def _rows(k, YN, XN, STR: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr):
    """(first, count) of the outputs o along one axis whose input o·STR - PAD + k·DIL, for tap
    ``k``, is inside ``[0, XN)``."""
    a = PAD - k * DIL  # o·STR >= a
    lo = tl.maximum(a + STR - 1, 0) // STR
    b = XN - 1 + PAD - k * DIL  # o·STR <= b
    hi = tl.where(b >= 0, tl.minimum(tl.maximum(b, 0) // STR + 1, YN), 0)
    return lo, tl.maximum(hi - lo, 0)


@triton.jit
def conv3d_dw_cl_wgrad_kernel(
    # Pointers
    x_ptr,     # input, dense NDHWC [N, XD, XH, XW, C]; PAIRS: int32 [.., C / 2]
    dy_ptr,    # grad_output, dense NDHWC [N, YD, YH, YW, C]; PAIRS: int32 [.., C / 2]
    dw_ptr,    # fp32 (fp64) partials [SPLIT, KD, KH, KW, C], contiguous
    # Sizes
    NUM_W,     # steps along a grad-output row: cdiv(YW, BLOCK_V * R)
    SPLIT,     # programs sharing one tap strip's reduction
    N, XD, XH, XW, YD, YH, YW,
    # Meta-parameters
    C: tl.constexpr,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    STR_D: tl.constexpr, STR_H: tl.constexpr, STR_W: tl.constexpr,
    PAD_D: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,  # left; negative allowed
    DIL_D: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PAIRS: tl.constexpr,    # bf16 read as int32 pairs of channels
    BLOCK_V: tl.constexpr,  # strips per step (along W)
    BLOCK_C: tl.constexpr,  # channels per program
    R: tl.constexpr,        # grad-output voxels per strip
    KT: tl.constexpr,       # W taps per program (a strip of the KW taps of one (kd, kh))
):
    NH: tl.constexpr = 2 if PAIRS else 1
    BLOCK_K: tl.constexpr = BLOCK_C // NH
    CK: tl.constexpr = C // NH
    NUM_C: tl.constexpr = (C + BLOCK_C - 1) // BLOCK_C
    NUM_KT: tl.constexpr = (KW + KT - 1) // KT
    i_c, i_t, i_s = program_ids(NUM_C, KD * KH * NUM_KT)
    kw0 = (i_t % NUM_KT) * KT
    kh = (i_t // NUM_KT) % KH
    kd = i_t // (NUM_KT * KH)
    o_k = i_c * BLOCK_K + tl.arange(0, BLOCK_K)
    m_k = o_k < CK
    od0, nd = _rows(kd, YD, XD, STR_D, PAD_D, DIL_D)
    oh0, nh = _rows(kh, YH, XH, STR_H, PAD_H, DIL_H)
    steps = N * nd * nh * NUM_W
    per = tl.cdiv(steps, SPLIT)
    lo = i_s * per
    hi = tl.minimum(lo + per, steps)
    lanes = tl.arange(0, BLOCK_V) * R
    lim = tl.cast(XW, tl.uint32)

    acc = ()
    for k in tl.static_range(KT * NH):
        acc = acc + (tl.zeros((BLOCK_V, BLOCK_K), dtype=ACC_DTYPE),)
    NP: tl.constexpr = (R - 1) * STR_W + (KT - 1) * DIL_W + 1  # input positions of a strip
    for it in range(lo, hi):
        row = it // NUM_W
        oh = oh0 + row % nh
        t = row // nh
        od = od0 + t % nd
        n = t // nd
        xd = od * STR_D - PAD_D + kd * DIL_D
        xh = oh * STR_H - PAD_H + kh * DIL_H
        ow0 = (it % NUM_W) * (BLOCK_V * R) + lanes  # first grad-output voxel of each strip
        iw0 = ow0 * STR_W - PAD_W + kw0 * DIL_W     # its input position at the strip's tap 0
        p_y = (dy_ptr + ((n * YD + od).to(tl.int64) * YH + oh) * (YW * CK)
               + (ow0[:, None] * CK + o_k[None, :]))
        p_x = (x_ptr + ((n * XD + xd).to(tl.int64) * XH + xh) * (XW * CK)
               + (iw0[:, None] * CK + o_k[None, :]))
        b_dy = ()
        for r in tl.static_range(R):
            m_r = ((ow0 + r) < YW)[:, None] & m_k[None, :]
            b_dy = b_dy + _widen_pair(tl.load(p_y + r * CK, mask=m_r, other=0), PAIRS, ACC_DTYPE)
        for p in tl.static_range(NP):
            m_p = ((iw0 + p).to(tl.uint32) < lim)[:, None] & m_k[None, :]
            b_x = _widen_pair(tl.load(p_x + p * CK, mask=m_p, other=0), PAIRS, ACC_DTYPE)
            nxt = ()
            for k in tl.static_range(KT):
                # p - k·DIL_W: this position's offset for tap k, met by output
                # (p - k·DIL_W) / STR_W of the strip where that is a whole number below R
                for j in tl.static_range(NH):
                    a = acc[k * NH + j]
                    if (p - k * DIL_W >= 0 and (p - k * DIL_W) % STR_W == 0
                            and (p - k * DIL_W) // STR_W < R):
                        a = a + b_x[j] * b_dy[(p - k * DIL_W) // STR_W * NH + j]
                    nxt = nxt + (a,)
            acc = nxt

    # The partials' offsets, from the program id again (rather than kept through the loop):
    # row i_s·KD·KH + kd·KH + kh of [SPLIT·KD·KH, KW·C] is the id's quotient by NUM_C·NUM_KT
    pid = tl.program_id(0)
    o_k = (pid % NUM_C) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_k = o_k < CK
    kw0 = (pid // NUM_C % NUM_KT) * KT
    p_dw = dw_ptr + (pid // (NUM_C * NUM_KT)).to(tl.int64) * (KW * C)
    for k in tl.static_range(KT):
        for j in tl.static_range(NH):
            # channel NH·o_k + j of tile j
            tl.store(p_dw + (kw0 + k) * C + o_k * NH + j, tl.sum(acc[k * NH + j], axis=0),
                     mask=m_k & (kw0 + k + tl.zeros_like(o_k) < KW))


# ----------------------------------------------------------------------------------------------
# Launchers: check what the kernel needs, allocate, launch. Each takes one explicit config (the
# space is lk3d.kernels.depthwise_configs) and padding as six ints.
# ----------------------------------------------------------------------------------------------

def channels_last(t):
    """``t`` as a dense NDHWC tensor whose storage starts 16-byte aligned: ``t`` itself when it is
    one, else a copy (one per call for an NCDHW caller)."""
    cl = torch.channels_last_3d
    if not t.is_contiguous(memory_format=cl) or (t.device.type != "meta"
                                                 and t.data_ptr() % 16):
        t = t.clone(memory_format=cl) if t.is_contiguous(memory_format=cl) else t.contiguous(
            memory_format=cl)
    if t.device.type != "meta" and t.data_ptr() % 16:
        t = torch.empty_like(t, memory_format=cl).copy_(t)
    return t


def _pairs(t):
    """Whether the kernels read ``t`` as int32 pairs of bf16 channels (``PAIRS``)."""
    return t.dtype == torch.bfloat16


def _operand(t):
    """The gathered operand as the kernels read it: dense NDHWC (``channels_last``), and for bf16
    its channel pairs as int32 ([N, D, H, W, C / 2])."""
    t = channels_last(t)
    if _pairs(t):
        return t.permute(0, 2, 3, 4, 1).view(torch.int32)
    return t


def _taps(w, flip):
    """The depthwise weight [C, 1, KD, KH, KW] as taps [KD, KH, KW, C], contiguous (flipped along
    every tap axis for grad-input); for bf16, fp32 [KD, KH, KW, 2, C / 2] (even channels, then
    odd: the halves of the int32 pairs ``_operand`` gives)."""
    taps = w[:, 0].permute(1, 2, 3, 0)
    taps = taps.flip(0, 1, 2) if flip else taps
    if _pairs(w):
        return taps.float().unflatten(3, (-1, 2)).transpose(3, 4).contiguous()
    return taps.contiguous()


def strip(yw, block_v, r_max):
    """(programs along W, outputs per strip R): the fewest programs of BLOCK_V strips of at most
    ``r_max`` outputs that cover a row of ``yw``, with R as small as still covers it (the least
    work past the row's end)."""
    num_w = triton.cdiv(yw, block_v * r_max)
    return num_w, triton.cdiv(yw, block_v * num_w)


def _check(x_shape, w_shape, stride):
    """A ValueError unless the kernel serves this depthwise problem: multiplier 1, C a multiple
    of ``CHANNEL_MULTIPLE``, stride 1 where given (grad-input)."""
    cin, cout, cig = x_shape[1], w_shape[0], w_shape[1]
    if cig != 1 or cout != cin or cin % CHANNEL_MULTIPLE or stride not in (None, (1, 1, 1)):
        raise ValueError(f"weight: expected a depthwise weight of multiplier 1 over a multiple of "
                         f"{CHANNEL_MULTIPLE} channels (stride 1 for grad-input), got "
                         f"{tuple(w_shape)} for input {tuple(x_shape)}, stride {stride}")


def _launch_fwd(a, taps, bias, y, geo, config):
    C = y.shape[1]
    num_w, r = strip(y.shape[4], config["BLOCK_V"], config["R"])
    num_c = triton.cdiv(C, config["BLOCK_C"])
    conv3d_dw_cl_kernel[flat_grid(num_c, num_w, y.shape[0] * y.shape[2] * y.shape[3])](
        a, taps, bias if bias is not None else taps, y,
        num_w, *(a.shape[1:4] if _pairs(y) else a.shape[2:]), *y.shape[2:],
        bias.stride(0) if bias is not None else 0, *y.stride(),
        C=C, **geo, HAS_BIAS=bias is not None, ACC_DTYPE=acc_dtype(y), PAIRS=_pairs(y),
        BLOCK_V=config["BLOCK_V"], BLOCK_C=config["BLOCK_C"], R=r, **launch_opts(config))
    return y


def conv3d_dw_cl_fwd(x, w, bias, stride, padding, dilation, config, *, out=None):
    """Depthwise forward, channel multiplier 1 over a multiple of 8 channels. Config keys:
    BLOCK_V, BLOCK_C, R (the most outputs per strip; ``strip`` fits it to the row). The result has ``x``'s layout
    (``lk3d.kernels.memory_format``)."""
    from lk3d.kernels import memory_format

    check_config(config, ("BLOCK_V", "BLOCK_C", "R"))
    _check(x.shape, w.shape, None)
    size = out_size(x.shape[2:], w.shape[2:], stride, padding, dilation)
    y = alloc((x.shape[0], w.shape[0], *size), x, out, memory_format(x))
    if y.numel() == 0:
        return y
    geo = geometry(stride, padding, dilation, w.shape[2:])
    return _launch_fwd(_operand(x), _taps(w, False), bias, y, geo, config)


def conv3d_dw_cl_bwd_input(dy, w, input_shape, stride, padding, dilation, config, *, out=None):
    """Depthwise grad-input, stride 1, multiplier 1, a multiple of 8 channels: the forward over
    ``dy`` with the flipped taps. Config keys: BLOCK_V, BLOCK_C, R."""
    from lk3d.kernels import memory_format

    check_config(config, ("BLOCK_V", "BLOCK_C", "R"))
    _check(input_shape, w.shape, tuple(stride))
    dx = alloc(tuple(input_shape), dy, out, memory_format(dy))
    if dx.numel() == 0:
        return dx
    geo = flipped_geometry(w.shape[2:], padding, dilation)
    return _launch_fwd(_operand(dy), _taps(w, True), None, dx, geo, config)


def conv3d_dw_cl_bwd_weight(x, dy, weight_shape, stride, padding, dilation, config):
    """Depthwise grad-weight, multiplier 1, a multiple of 8 channels, any stride and dilation.
    Config keys: BLOCK_V, BLOCK_C, R (the most voxels per strip; ``strip`` fits it to the row),
    KT (the most W taps per program; ``tap_strip`` fits it), SPLIT (programs sharing a tap
    strip's reduction; their fp32 partials are summed here)."""
    check_config(config, ("BLOCK_V", "BLOCK_C", "R", "KT", "SPLIT"))
    _check(x.shape, weight_shape, None)
    C, kernel = x.shape[1], tuple(weight_shape[2:])
    if dy.numel() == 0 or C == 0:
        return torch.zeros(tuple(weight_shape), dtype=x.dtype, device=x.device)
    num_w, r = strip(dy.shape[4], config["BLOCK_V"], config["R"])
    num_kt, kt = tap_strip(kernel[2], config["KT"])
    split = max(1, int(config["SPLIT"]))
    part = new((split, *kernel, C), partial_dtype(x), x.device)
    a, b = _operand(x), _operand(dy)
    sizes = a.shape[1:4] if _pairs(x) else a.shape[2:]
    dsizes = b.shape[1:4] if _pairs(x) else b.shape[2:]
    num_c = triton.cdiv(C, config["BLOCK_C"])
    conv3d_dw_cl_wgrad_kernel[flat_grid(num_c, kernel[0] * kernel[1] * num_kt, split)](
        a, b, part, num_w, split, x.shape[0], *sizes, *dsizes,
        C=C, **geometry(stride, padding, dilation, kernel), ACC_DTYPE=acc_dtype(x),
        PAIRS=_pairs(x), BLOCK_V=config["BLOCK_V"], BLOCK_C=config["BLOCK_C"], R=r, KT=kt,
        **launch_opts(config))
    return part.sum(0).permute(3, 0, 1, 2).unsqueeze(1).to(x.dtype)
