"""Dense and grouped conv3d as an implicit GEMM over tensor descriptors: forward, grad-input
and grad-weight on channels-innermost (NDHWC) activations.

GEMM mapping (forward): M = N·OD·OH·OW (output voxels), N = Cout/g, K = kd·kh·kw·Cin/g. A program
owns one output brick: batch n, depth od, BLOCK_H × BLOCK_W voxels of (OH, OW) (BLOCK_M =
BLOCK_H·BLOCK_W rows), and BLOCK_N output channels of group g. Its reduction is one flattened loop
over taps × channel blocks: each step reads, through a host-side tensor descriptor
(``triton.tools.tensor_descriptor.TensorDescriptor``), the input box
``[1, 1, BLOCK_H, BLOCK_W, BLOCK_K]`` at the tap's shifted corner and the packed weight box
``[1, 1, BLOCK_K, BLOCK_N]``, and feeds ``tl.dot``. A box that reaches past a border comes back
zero-filled, so padding costs nothing and needs no mask; on sm_90 the loads are TMA copies
(UTMALDG) into a ``num_stages``-deep shared-memory ring that wgmma (HGMMA) reads. No per-element
offset or mask is computed in the loop: one tap's coordinates are a few scalar ops.

Before sm_90 there is no TMA, and Triton lowers a descriptor load to masked per-element loads
(~1,070 instructions a step for 64 HMMA at 64 -> 64 channels on sm_80). There the same kernel
(``TMA=False``, ``use_tma``) reads the same boxes through pointers: a row's channels are
contiguous and its mask (the tap inside the volume) is one per row, so each thread's 16 bytes are
one ``cp.async`` (LDGSTS) into the ``num_stages`` ring, and mma.sync (HMMA) reads it (~300
instructions a step).

Layouts:
    input       dense NDHWC [N, D, H, W, C] (``channels_last_3d``), 16-byte aligned; the
                launchers convert any other layout once per call (one copy of the input)
    weight      packed as [G, kd·kh·kw, Cin/g, Cout/g] (``pack``), the row stride padded to 16
                bytes; the packed copy is the weight's size, kept per weight version
                (``packed_weight``, ``lk3d.kernels.weight_cache``) for the next calls
    output      written through its strides: the layout ``lk3d.kernels.memory_format`` gives
                for the caller's input (NCDHW in, NCDHW out)

Grad-input at stride 1 is the forward over grad_output with the flipped, transposed weight
(``pack(w, transpose=True)``: reduction over Cout/g, producing Cin/g) and the left padding
``(k - 1)·dil - pad``. At stride s > 1 it is split by stride phases (``grad_input_phases``): the
input voxels ``i ≡ r (mod s)`` of each axis receive only from the taps ``t`` with
``r + pad - t·dil ≡ 0 (mod s)``, every ``s / gcd(dil, s)``-th tap, ``dil / gcd(dil, s)`` apart
over grad_output; each phase is one stride-1 launch of that sub-kernel written into the strided
view ``dx[..., r::s]`` (at most s³ launches, each computing only taps that contribute; a phase no
tap reaches is zero-filled). So no launch computes masked-off taps.

What the descriptors need, checked by ``fits``: reduction channels per group (Cin/g forward,
Cout/g grad-input) a multiple of 16 (TMA's 16-byte strides, and whole channel blocks:
BLOCK_K divides them, so a box never reads the next group's channels), a forward at stride 1
along H and W (a box is a dense brick; stride along D is a scalar), fp16 / bf16 / fp32 (fp32
through TF32 where torch allows it, else IEEE). The routing (``lk3d._algos.descriptor_gemm``)
sends other problems to the gather kernel.

Grad-weight (``conv3d_desc_wgrad_kernel``): dW[g, co, ci, tap] = Σ over grad-output voxels of
dy[v, co]·x[v·stride - pad + tap·dil, ci], a GEMM with M = Cout/g, N = taps × Cin/g, K = voxels.
A program owns a [BLOCK_CO, BLOCK_CI] channel tile of a strip of TAPS W taps of one (kd, kh),
each tap its own fp32 accumulator (a tuple of tiles carried through the loop). Its loop walks
BLOCK_H × BLOCK_W grad-output bricks: each step reads the grad_output box
``[1, 1, BLOCK_H, BLOCK_W, BLOCK_CO]`` once and, for each tap of the strip, the input box
``[1, 1, BLOCK_H, BLOCK_W, BLOCK_CI]`` at the tap's shifted corner (zero-filled past a border:
the padding), and adds ``dyᵀ · x`` to the tap's accumulator. The bricks are split over SPLIT
programs writing fp32 partials that the launcher sums (deterministic, no atomics). It takes
Cin/g and Cout/g multiples of 16 and stride 1 along H and W; a padded tap adds dy·0, so
operands that are not all finite go to aten (``lk3d._algos.tiled_grad_weight``).

Stride, padding (left side), dilation, kernel extent and channels per group are compile-time
constants; batch and spatial sizes are runtime ints. Output offsets are int64; operand offsets
through pointers int64 where the operand passes 2**31 elements (``WIDE``), descriptor coordinates
int32. Accumulation fp32.
"""
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from lk3d.kernels import memory_format, out_size, weight_cache
from lk3d.kernels.common import (acc_dtype, alloc, check_config, flat_grid, geometry,
                                 grad_input_phases, launch_opts, new, partial_dtype,
                                 precision, program_ids, reach, split_tap, wide)
from lk3d.kernels.implicit_gemm_configs import CHANNEL_MULTIPLE, DTYPES, fits, tap_strip


@triton.jit
def _operand_box(x, n, idd, ih0, iw0, c, oh, ow, XD, XH, XW, C: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr,
                 WIDE: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] operand box at voxel corner (n, idd, ih0, iw0), channel c: through
    the descriptor (TMA), or through pointers with the padding as a row mask (rows (oh, ow) of
    the brick; channels contiguous, so a thread's 16 bytes are one vector load)."""
    if TMA:
        box = x.load([n, idd, ih0, iw0, c]).reshape(BLOCK_M, BLOCK_K)
    else:
        ih = ih0 + oh
        iw = iw0 + ow
        m_row = tl.where((idd >= 0) & (idd < XD), (ih >= 0) & (ih < XH) & (iw >= 0) & (iw < XW),
                         False)
        vox = (n * XD + idd) * XH
        if WIDE:
            vox = vox.to(tl.int64)
        o_x = ((vox + ih) * XW + iw) * C + c
        box = tl.load(x + o_x[:, None] + tl.arange(0, BLOCK_K)[None, :], mask=m_row[:, None],
                      other=0.0)
    return box


@triton.jit
def _weight_box(w, g, tap, c, n0, T: tl.constexpr, KC: tl.constexpr, NC: tl.constexpr,
                W_ROW: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                TMA: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] box of the packed weight at (group g, tap, channel c, column n0)."""
    if TMA:
        box = w.load([g, tap, c, n0]).reshape(BLOCK_K, BLOCK_N)
    else:
        o_n = n0 + tl.arange(0, BLOCK_N)
        p_w = (w + ((g * T + tap) * KC + c) * W_ROW + tl.arange(0, BLOCK_K)[:, None] * W_ROW
               + o_n[None, :])
        if NC % BLOCK_N == 0:
            box = tl.load(p_w)
        else:
            box = tl.load(p_w, mask=(o_n < NC)[None, :], other=0.0)
    return box


@triton.jit
def conv3d_desc_kernel(
    # Operands: tensor descriptors (TMA) or pointers to the same tensors
    x,         # operand (input; grad_output for grad-input), dense NDHWC [N, XD, XH, XW, G*KC];
               # TMA: box [1, 1, BLOCK_H, BLOCK_W, BLOCK_K]
    w,         # packed weight [G, KD*KH*KW, KC, NC], rows W_ROW apart; TMA: box [1, 1, BLOCK_K,
               # BLOCK_N]
    bias_ptr,  # [G*NC]; read only when HAS_BIAS
    y_ptr,     # produced [N, G*NC, YD, YH, YW], any strides
    # Sizes
    XD, XH, XW, YD, YH, YW,
    NUM_M,         # programs along the output voxels: N * YD * NUM_H * NUM_W
    NUM_H, NUM_W,  # programs along OH and OW: cdiv(YH, BLOCK_H), cdiv(YW, BLOCK_W)
    # Strides
    sb,        # bias
    sy_n, sy_c, sy_d, sy_h, sy_w,
    # Meta-parameters
    KC: tl.constexpr,     # reduction channels per group (a multiple of BLOCK_K)
    NC: tl.constexpr,     # produced channels per group
    G: tl.constexpr,      # groups: G * KC channels make an operand voxel
    W_ROW: tl.constexpr,  # packed weight row stride (NC padded to 16 bytes)
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    STR_D: tl.constexpr, STR_H: tl.constexpr, STR_W: tl.constexpr,  # H and W: 1 (dense boxes)
    PAD_D: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,  # left; negative allowed
    DIL_D: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,  # "tf32" where torch allows it for fp32, else "ieee"
    TMA: tl.constexpr,    # operands are tensor descriptors (sm_90: TMA); else pointers
                          # (sm_80: cp.async, pipelined by num_stages)
    WIDE: tl.constexpr,   # pointers: int64 operand offsets (the operand passes 2**31 elements)
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,  # output brick: BLOCK_M = BLOCK_H * BLOCK_W
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # produced channels, reduction channels a step
):
    tl.static_assert(STR_H == 1 and STR_W == 1, "a box is a dense brick: stride 1 along H, W")
    tl.static_assert(KC % BLOCK_K == 0, "a box must not reach into the next group's channels")
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    NUM_N: tl.constexpr = (NC + BLOCK_N - 1) // BLOCK_N
    NUM_CB: tl.constexpr = KC // BLOCK_K
    T: tl.constexpr = KD * KH * KW
    i_m, i_n, i_g = program_ids(NUM_M, NUM_N)
    i_nd = i_m // (NUM_H * NUM_W)
    i_hw = i_m % (NUM_H * NUM_W)
    n = i_nd // YD
    od = i_nd % YD
    oh0 = (i_hw // NUM_W) * BLOCK_H
    ow0 = (i_hw % NUM_W) * BLOCK_W
    n0 = i_n * BLOCK_N
    id0 = od * STR_D - PAD_D
    c_g = i_g * KC
    o_m = tl.arange(0, BLOCK_M)
    oh = oh0 + o_m // BLOCK_W
    ow = ow0 + o_m % BLOCK_W

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for kk in range(T * NUM_CB):
        tap = kk // NUM_CB
        c0 = (kk % NUM_CB) * BLOCK_K
        kd, kh, kw = split_tap(tap, KH, KW)
        b_x = _operand_box(x, n, id0 + kd * DIL_D, oh0 - PAD_H + kh * DIL_H,
                           ow0 - PAD_W + kw * DIL_W, c_g + c0, oh - oh0, ow - ow0, XD, XH, XW,
                           G * KC, BLOCK_M, BLOCK_K, TMA, WIDE)
        b_w = _weight_box(w, i_g, tap, c0, n0, T, KC, NC, W_ROW, BLOCK_K, BLOCK_N, TMA)
        # A tap past a border reads zeros and adds 0·w, as F.conv3d's explicit zero padding does.
        acc = tl.dot(b_x, b_w, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)

    o_n = n0 + tl.arange(0, BLOCK_N)
    m_n = o_n < NC
    if HAS_BIAS:
        acc += tl.load(bias_ptr + (i_g * NC + o_n) * sb, mask=m_n, other=0.0).to(ACC_DTYPE)[None, :]
    o_y = (n.to(tl.int64) * sy_n + od.to(tl.int64) * sy_d + oh.to(tl.int64) * sy_h
           + ow.to(tl.int64) * sy_w)
    p_y = y_ptr + o_y[:, None] + (i_g * NC + o_n).to(tl.int64)[None, :] * sy_c
    tl.store(p_y, acc.to(y_ptr.dtype.element_ty),
             mask=((oh < YH) & (ow < YW))[:, None] & m_n[None, :])


@triton.jit
def conv3d_desc_wgrad_kernel(
    # Operands: tensor descriptors (TMA) or pointers to the same tensors
    x,         # input, dense NDHWC [N, XD, XH, XW, G*CIG]; TMA: box [1, 1, BLOCK_H, BLOCK_W,
               # BLOCK_CI]
    dy,        # grad_output, dense NDHWC [N, YD, YH, YW, G*COG]; TMA: box [1, 1, BLOCK_H,
               # BLOCK_W, BLOCK_CO]
    dw_ptr,    # fp32 partials [SPLIT, KD*KH*KW, G*COG, CIG], contiguous
    # Sizes
    XD, XH, XW, YD, YH, YW,
    NUM_H, NUM_W,  # bricks along OH and OW: cdiv(YH, BLOCK_H), cdiv(YW, BLOCK_W)
    BRICKS,        # N * YD * NUM_H * NUM_W
    PER,           # bricks per split program
    # Meta-parameters
    CIG: tl.constexpr, COG: tl.constexpr,  # channels per group (multiples of the blocks)
    G: tl.constexpr,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    STR_D: tl.constexpr, STR_H: tl.constexpr, STR_W: tl.constexpr,  # H and W: 1 (dense boxes)
    PAD_D: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,  # left; negative allowed
    DIL_D: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,    # operands are tensor descriptors (sm_90: TMA); else pointers
    WIDE: tl.constexpr,   # pointers: int64 operand offsets
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,   # voxel brick: the reduction of one step
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,  # the [BLOCK_CO, BLOCK_CI] tile of a tap
    TAPS: tl.constexpr,   # W taps per program, each its own accumulator
):
    tl.static_assert(STR_H == 1 and STR_W == 1, "a box is a dense brick: stride 1 along H, W")
    tl.static_assert(CIG % BLOCK_CI == 0 and COG % BLOCK_CO == 0,
                     "a box must not reach into the next group's channels")
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    NUM_CO: tl.constexpr = COG // BLOCK_CO
    NUM_CI: tl.constexpr = CIG // BLOCK_CI
    NUM_KT: tl.constexpr = (KW + TAPS - 1) // TAPS
    i_p, i_g, i_s = program_ids(NUM_CO * NUM_CI * KD * KH * NUM_KT, G)
    i_ci = i_p % NUM_CI
    i_co = (i_p // NUM_CI) % NUM_CO
    i_t = i_p // (NUM_CI * NUM_CO)
    kw0 = (i_t % NUM_KT) * TAPS
    kh = (i_t // NUM_KT) % KH
    kd = i_t // (NUM_KT * KH)
    c_y = i_g * COG + i_co * BLOCK_CO
    c_x = i_g * CIG + i_ci * BLOCK_CI
    o_m = tl.arange(0, BLOCK_M)
    dh = o_m // BLOCK_W
    dw = o_m % BLOCK_W
    lo = i_s * PER
    hi = tl.minimum(lo + PER, BRICKS)

    acc = ()
    for t in tl.static_range(TAPS):
        acc = acc + (tl.zeros((BLOCK_CO, BLOCK_CI), dtype=ACC_DTYPE),)
    for it in range(lo, hi):
        i_hw = it % (NUM_H * NUM_W)
        i_nd = it // (NUM_H * NUM_W)
        n = i_nd // YD
        od = i_nd % YD
        oh0 = (i_hw // NUM_W) * BLOCK_H
        ow0 = (i_hw % NUM_W) * BLOCK_W
        # the grad-output brick, read once for the strip's taps; rows past the border are zeros
        b_dy = _operand_box(dy, n, od, oh0, ow0, c_y, dh, dw, YD, YH, YW, G * COG, BLOCK_M,
                            BLOCK_CO, TMA, WIDE)
        b_dy = tl.trans(b_dy)
        xd = od * STR_D - PAD_D + kd * DIL_D
        xh = oh0 - PAD_H + kh * DIL_H
        xw = ow0 - PAD_W + kw0 * DIL_W
        nxt = ()
        for t in tl.static_range(TAPS):
            # a tap past a border reads zeros and adds dy·0, as F.conv3d's zero padding does
            b_x = _operand_box(x, n, xd, xh, xw + t * DIL_W, c_x, dh, dw, XD, XH, XW, G * CIG,
                               BLOCK_M, BLOCK_CI, TMA, WIDE)
            nxt = nxt + (tl.dot(b_dy, b_x, acc[t], input_precision=PRECISION,
                                out_dtype=ACC_DTYPE),)
        acc = nxt

    T: tl.constexpr = KD * KH * KW
    o_co = c_y + tl.arange(0, BLOCK_CO)
    o_ci = i_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    tap0 = (kd * KH + kh) * KW + kw0
    p_dw = (dw_ptr + (i_s.to(tl.int64) * T + tap0) * (G * COG * CIG)
            + (o_co * CIG)[:, None] + o_ci[None, :])
    for t in tl.static_range(TAPS):
        # the strip's taps past KW (its last strip is as short as covers KW) are not stored
        tl.store(p_dw + t * (G * COG * CIG), acc[t].to(dw_ptr.dtype.element_ty),
                 mask=(kw0 + t + tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.int32)) < KW)


# ----------------------------------------------------------------------------------------------
# Launchers: check what the kernel needs, convert and pack once, launch one explicit config
# (the space is lk3d.kernels.implicit_gemm_configs).
# ----------------------------------------------------------------------------------------------

_KEYS = ("BLOCK_H", "BLOCK_W", "BLOCK_N", "BLOCK_K")


def ndhwc(t):
    """``t`` as a dense NDHWC tensor whose storage starts 16-byte aligned: ``t`` itself when it is
    one, else one copy."""
    cl = torch.channels_last_3d
    if t.is_contiguous(memory_format=cl) and (t.device.type == "meta" or t.data_ptr() % 16 == 0):
        return t
    return torch.empty_like(t, memory_format=cl).copy_(t)


def ndhwc_desc(t, bh, bw, bc):
    """The descriptor of the dense NDHWC tensor ``t`` (logically NCDHW, ``ndhwc``) with box
    [1, 1, bh, bw, bc]: the dense strides, whatever torch keeps for axes of extent 1."""
    N, C, D, H, W = t.shape
    return TensorDescriptor(t, [N, D, H, W, C], [D * H * W * C, H * W * C, W * C, C, 1],
                            [1, 1, bh, bw, bc])


def pack(w, groups, transpose=False):
    """The weight [Cout, Cin/g, kd, kh, kw] as [G, kd·kh·kw, KC, NC] (forward: KC = Cin/g,
    NC = Cout/g), or for grad-input flipped along every tap axis and transposed (KC = Cout/g,
    NC = Cin/g); the last axis padded so that a row is a multiple of 16 bytes (a view of the
    padded buffer, so its strides are what a descriptor needs)."""
    cout, cig, *kernel = w.shape
    taps = kernel[0] * kernel[1] * kernel[2]
    g = w.reshape(groups, cout // groups, cig, taps)  # [G, COG, CIG, T]
    if transpose:
        g = g.flip(3).permute(0, 3, 1, 2)  # [G, T, COG, CIG]
    else:
        g = g.permute(0, 3, 2, 1)          # [G, T, CIG, COG]
    nc = g.shape[3]
    step = 16 // w.element_size()
    buf = torch.empty((*g.shape[:3], -(-nc // step) * step), dtype=w.dtype, device=w.device)
    packed = buf[..., :nc]
    packed.copy_(g)
    return packed


def packed_weight(w, groups, transpose=False, taps=None):
    """``pack`` of ``w``, or of its sub-kernel ``w[..., t0::step]`` per axis (``taps``: three
    ``(t0, step)``), from the weight cache (``lk3d.kernels.weight_cache``) while ``w`` is
    unchanged."""
    def make():  # detached: a kept copy must not hold the weight's autograd graph
        sub = w.detach()
        sub = sub if taps is None else sub[(..., *(slice(t, None, st) for t, st in taps))]
        return pack(sub, groups, transpose)
    return weight_cache.get(w, ("implicit_gemm", groups, transpose, taps), make)


def _check(name, a, kc, config, stride):
    check_config(config, _KEYS)
    if not fits(kc, a.dtype, stride):
        raise ValueError(f"{name}: expected a multiple of {CHANNEL_MULTIPLE} reduction channels "
                         f"per group, of {[str(d) for d in DTYPES]}, at stride 1 along H and W; "
                         f"got {kc} channels of {a.dtype} at stride {tuple(stride)}")
    if kc % config["BLOCK_K"]:
        raise ValueError(f"config: expected BLOCK_K dividing the {kc} reduction channels per "
                         f"group, got {config['BLOCK_K']}")


def use_tma(t):
    """Whether the operands go through tensor descriptors for tensors like ``t``: on a GPU with
    TMA (sm_90 and later) and under the interpreter; on earlier GPUs through pointers, which
    Triton's pipeliner turns into cp.async copies (its lowering of a descriptor there is a
    masked per-element load)."""
    if t.device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(t.device)[0] >= 9


def _launch(a, packed, bias, y, geo, groups, config, allow_tf32, tma):
    """One launch producing ``y`` from the NDHWC operand ``a`` and the packed weight."""
    kc, nc = packed.shape[2], packed.shape[3]
    bh, bw, bn, bk = (config[k] for k in _KEYS)
    tma = use_tma(a) if tma is None else tma
    if tma:
        x = ndhwc_desc(a, bh, bw, bk)
        w = TensorDescriptor(packed, list(packed.shape), list(packed.stride()), [1, 1, bk, bn])
    else:
        x, w = a, packed
    N, _, YD, YH, YW = y.shape
    num_h, num_w = triton.cdiv(YH, bh), triton.cdiv(YW, bw)
    num_m = N * YD * num_h * num_w
    conv3d_desc_kernel[flat_grid(num_m, triton.cdiv(nc, bn), groups)](
        x, w, bias if bias is not None else packed, y,
        *a.shape[2:], YD, YH, YW, num_m, num_h, num_w,
        bias.stride(0) if bias is not None else 0, *y.stride(),
        KC=kc, NC=nc, G=groups, W_ROW=packed.stride(2), **geo, HAS_BIAS=bias is not None,
        ACC_DTYPE=acc_dtype(y), PRECISION=precision(y, allow_tf32), TMA=tma,
        WIDE=not tma and wide(reach(a)), BLOCK_H=bh, BLOCK_W=bw, BLOCK_N=bn, BLOCK_K=bk,
        **launch_opts(config))
    return y


def conv3d_desc_fwd(x, w, bias, stride, padding, dilation, groups, config, *, allow_tf32=False,
                    out=None, tma=None):
    """Dense/grouped forward (``fits``). Config keys: BLOCK_H, BLOCK_W, BLOCK_N, BLOCK_K. The
    result has ``x``'s layout (``lk3d.kernels.memory_format``)."""
    _check("input", x, w.shape[1], config, stride)
    size = out_size(x.shape[2:], w.shape[2:], stride, padding, dilation)
    y = alloc((x.shape[0], w.shape[0], *size), x, out, memory_format(x))
    if y.numel() == 0:
        return y
    geo = geometry(stride, padding, dilation, w.shape[2:])
    return _launch(ndhwc(x), packed_weight(w, groups), bias, y, geo, groups, config, allow_tf32,
                   tma)


def conv3d_desc_bwd_input(dy, w, input_shape, stride, padding, dilation, groups, config, *,
                          allow_tf32=False, out=None, tma=None):
    """Dense/grouped grad-input at any stride, one stride-1 launch per stride phase
    (``lk3d.kernels.common.grad_input_phases``): the forward over ``dy`` with the flipped,
    transposed sub-kernel of the taps that reach the phase, written into the strided view
    ``dx[..., rd::sd, rh::sh, rw::sw]``; a phase no tap reaches is zero-filled. At stride 1 that
    is one launch with the whole kernel and the left padding ``(k - 1)·dil - pad``. Config keys
    as the forward's."""
    _check("grad_output", dy, w.shape[0] // groups, config, (1, 1, 1))
    dx = alloc(tuple(input_shape), dy, out, memory_format(dy))
    if dx.numel() == 0:
        return dx
    a = ndhwc(dy)
    for pd, ph, pw in grad_input_phases(w.shape[2:], stride, padding, dilation, dx.shape[2:]):
        view = dx[:, :, pd.first::stride[0], ph.first::stride[1], pw.first::stride[2]]
        if not (pd.taps and ph.taps and pw.taps):
            view.zero_()
            continue
        pads = (pd.pad, ph.pad, pw.pad)
        geo = geometry((1, 1, 1), pads + pads, (pd.dil, ph.dil, pw.dil),
                       (pd.taps, ph.taps, pw.taps))
        taps = tuple((p.tap, p.step) for p in (pd, ph, pw))
        _launch(a, packed_weight(w, groups, True, taps), None, view, geo, groups, config,
                allow_tf32, tma)
    return dx


_WGRAD_KEYS = ("BLOCK_H", "BLOCK_W", "BLOCK_CO", "BLOCK_CI", "TAPS", "SPLIT")


def conv3d_desc_bwd_weight(x, dy, weight_shape, stride, padding, dilation, groups, config, *,
                           allow_tf32=False, tma=None):
    """Dense/grouped grad-weight: dW[co, ci, tap] = Σ over grad-output voxels of
    dy[v, co]·x[v·stride - pad + tap·dil, ci], a GEMM (M = Cout/g, N = taps × Cin/g, K = voxels)
    on the NDHWC operands' boxes. Cin/g and Cout/g multiples of 16, stride 1 along H and W.
    Config keys: BLOCK_H, BLOCK_W (the voxel brick of a step), BLOCK_CO, BLOCK_CI (dividing
    Cout/g and Cin/g), TAPS (the most W taps per program, each its own accumulator, sharing each
    grad-output box; ``tap_strip`` fits it), SPLIT (programs sharing a reduction; their fp32
    partials are summed here). The result is contiguous, in ``x``'s dtype."""
    check_config(config, _WGRAD_KEYS)
    cout, cig, *kernel = (int(s) for s in weight_shape)
    cog = cout // groups
    for name, t, kc in (("input", x, cig), ("grad_output", dy, cog)):
        if not fits(kc, t.dtype, stride):
            raise ValueError(f"{name}: expected a multiple of {CHANNEL_MULTIPLE} channels per "
                             f"group, of {[str(d) for d in DTYPES]}, at stride 1 along H and W; "
                             f"got {kc} channels of {t.dtype} at stride {tuple(stride)}")
    if dy.dtype != x.dtype:
        raise TypeError(f"grad_output: expected {x.dtype} as the input, got {dy.dtype}")
    for key, kc in (("BLOCK_CO", cog), ("BLOCK_CI", cig)):
        if kc % config[key]:
            raise ValueError(f"config: expected {key} dividing the {kc} channels per group, got "
                             f"{config[key]}")
    if x.shape[1] != cig * groups or dy.shape[1] != cout:
        raise ValueError(f"grad_output: expected {cout} channels and an input of "
                         f"{cig * groups}, got {dy.shape[1]} and {x.shape[1]}")
    if dy.numel() == 0 or x.numel() == 0:
        return torch.zeros(weight_shape, dtype=x.dtype, device=x.device)
    bh, bw, bco, bci = (config[k] for k in _WGRAD_KEYS[:4])
    num_kt, taps = tap_strip(kernel[2], config["TAPS"])
    N, _, YD, YH, YW = dy.shape
    num_h, num_w = triton.cdiv(YH, bh), triton.cdiv(YW, bw)
    bricks = N * YD * num_h * num_w
    split = max(1, min(int(config["SPLIT"]), bricks))
    per = triton.cdiv(bricks, split)
    split = triton.cdiv(bricks, per)
    T = kernel[0] * kernel[1] * kernel[2]
    part = new((split, T, cout, cig), partial_dtype(x), x.device)
    a, b = ndhwc(x), ndhwc(dy)
    tma = use_tma(a) if tma is None else tma
    big = not tma and wide(reach(a), reach(b))
    if tma:
        a, b = ndhwc_desc(a, bh, bw, bci), ndhwc_desc(b, bh, bw, bco)
    tiles = (cog // bco) * (cig // bci) * kernel[0] * kernel[1] * num_kt
    conv3d_desc_wgrad_kernel[flat_grid(tiles, groups, split)](
        a, b, part, *x.shape[2:], YD, YH, YW, num_h, num_w, bricks, per,
        CIG=cig, COG=cog, G=groups, **geometry(stride, padding, dilation, kernel),
        ACC_DTYPE=acc_dtype(x), PRECISION=precision(x, allow_tf32), TMA=tma,
        WIDE=big, BLOCK_H=bh, BLOCK_W=bw, BLOCK_CO=bco,
        BLOCK_CI=bci, TAPS=taps, **launch_opts(config))
    dw = torch.empty(weight_shape, dtype=x.dtype, device=x.device)
    return dw.copy_(part.sum(0).permute(1, 2, 0).reshape(weight_shape))
