"""Index helpers shared by every lk3d convolution kernel.

A convolution pairs a "gathered" operand position with a produced position through one kernel tap.
Forward (and grad-weight) read the input at ``i = o * STRIDE - PAD + k * DIL``; grad-input reads the
output gradient at ``o = (i + PAD - k * DIL) / STRIDE``, which exists only when the division is exact.
Writing the two mappings once here keeps every kernel body free of copies of this arithmetic.
"""
import triton
import triton.language as tl


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
def split_flat(offs, SD, SH, SW):
    """Decode a flat index over ``[batch, SD, SH, SW]`` into ``(n, d, h, w)``."""
    w = offs % SW
    t = offs // SW
    h = t % SH
    t = t // SH
    d = t % SD
    n = t // SD
    return n, d, h, w


@triton.jit
def split_tap(t, KH: tl.constexpr, KW: tl.constexpr):
    """Decode a flat tap index over ``[KD, KH, KW]`` into ``(kd, kh, kw)``."""
    kw = t % KW
    kh = (t // KW) % KH
    kd = t // (KW * KH)
    return kd, kh, kw
