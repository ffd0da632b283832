"""FFT convolution: the dense-form algorithm whose cost does not grow with the kernel volume.

All three passes are one primitive, a grouped cross-correlation evaluated by overlap-save::

    out[n, o, p] = sum_{c in group(o)} sum_a  x[n, c, p + a * dil] * w[o, c, a],   p < Q

* forward      x = the padded input, then every ``stride``-th output is kept, plus bias;
* grad-input   x = grad_output spread onto the stride-1 grid and padded by the dilated kernel
               extent minus one, w = the flipped kernel with in/out channels swapped per group;
* grad-weight  a correlation of the padded input with grad_output summed over the batch, by one
               transform per axis (no tiling; it is a global reduction).

Overlap-save: the output is cut into tiles of B voxels per axis; each tile reads an input window
of L = B + E - 1 (E = dil·(k-1)+1, the dilated extent) and is one length-L transform, so circular
wrap-around never reaches a kept output. L is picked per axis from fast sizes (2^a 3^b 5^c 7^d) by a
cost model of this file's own steps: small L = many small transforms and a small kernel spectrum,
large L = few big transforms and a kernel spectrum of L³ per channel pair.
The kernel spectrum is made by three small DFT matmuls (one per axis, k taps -> L frequencies,
the dilation folded into the DFT matrix), never by transforming a zero-padded L³ kernel; the
per-frequency channel products are one batched matmul ([tiles·N, Cin/g] @ [Cin/g, Cout/g] per
frequency and group), or an elementwise product for depthwise.

Precision: fp16/bf16/fp32 inputs are computed in fp32 (complex64), fp64 in complex128; the result
has the input's dtype. Stride > 1 computes the stride-1 output and keeps every stride-th voxel.

Accuracy: the error is norm-wise, not per element. Every output mixes, through the transforms,
every input voxel of its tile, so its rounding error scales with the largest magnitudes around
(|y_fft - y| <~ c·eps·log2(L)·||x||·||w|| per tile), not with its own size: outputs much smaller
than the largest ones in their tile have a large relative error. Measured on a 2-core Xeon (fp32,
[1,16,48³], k=15, "same", float64 reference): max |error| / max |y| = 2.5e-7 (oneDNN's direct
sum: 1.3e-6), median per-element relative error 2.5e-7; where the right half of the input is
10^4 times smaller than the left, the outputs that see only that half are off by 1.6e-3 of
their own size (median; oneDNN 9e-7).

Non-finite values: a NaN or Inf would spread through the transforms over whole tiles (Inf·0 and
Inf-Inf are NaN). ``lk3d._algos`` runs this module only on operands that are all finite (one sum
per operand: 0.2-0.4 ms per pass at the size above, one thread, against 0.5-1.6 s for the FFT
passes) and gives the others to aten, i.e. to F.conv3d. Where a NaN or Inf meets the zero padding
(a non-finite weight tap over the padding in the forward, a non-finite output gradient over it in
grad-weight) torch's own CPU paths disagree: its float64 path, which pads with explicit zeros,
gives NaN there (0·Inf), oneDNN (bf16, and fp32 for large kernels or channels_last_3d) skips the
padding; aten's answer is that of the torch path it takes.

Memory: work is chunked over groups/output channels and over the batch so that one chunk's
complex spectra stay under ``LK3D_FFT_MEMORY_MB`` (default 1024 MiB) when the problem allows it:
forward and grad-input hold the chunk's kernel spectrum and its input and output tiles'
spectra; grad-weight holds the chunk's accumulator (Cin/g·Cout/g whole-volume spectra per group)
and its samples' input and gradient spectra. The peak is about that budget plus the input, its
padded copy and the output (grad-weight: plus the stride-1 gradient where stride > 1). A single
(sample, channel group) whose spectra alone exceed the budget still runs. Depthwise products
(Cin/g = 1) are elementwise in all three passes, never a matmul over a singleton channel axis.
"""
import bisect
import functools
import itertools
import math
import os

import torch
import torch.nn.functional as F

from lk3d._spec import extent, zero_pad
from lk3d.autotune import devices

_FAST_MAX = 1 << 14
_FAST = sorted({2 ** a * 3 ** b * 5 ** c * 7 ** d for a in range(15) for b in range(9)
                for c in range(7) for d in range(6) if 2 ** a * 3 ** b * 5 ** c * 7 ** d <= _FAST_MAX})

# Seconds per unit of each feature of ``fft_features`` (2 torch threads, torch 2.13), fitted by
# perf_reports/fit_fft_model.py to measured xcorr times over shapes and transform lengths: complex
# FFT work (n log2 n per transformed element), DFT-matmul MACs of the kernel spectrum, small-matrix
# batched complex-matmul MACs (dense channel products), elementwise complex products (depthwise),
# complex elements moved by the permutes around the product, and tiles (per-tile call overheads).
# Fitted on a 2-core Intel Xeon (perf_reports/fft_model_fit.json: 140 measured plans of 14 shapes;
# the model's spread, p90/p10 of modelled over measured seconds, went from 2.95 to 1.72).
COST = {"fft": 1.79e-10, "dft": 8.81e-11, "bmm": 3.87e-10, "elem": 5.13e-09, "move": 5.14e-09,
        "tile": 8.31e-05}


def next_fast(n):
    """Smallest 7-smooth size >= n (a fast transform length); n itself past 2**14."""
    i = bisect.bisect_left(_FAST, n)
    return _FAST[i] if i < len(_FAST) else n


def _budget_bytes():
    raw = os.environ.get("LK3D_FFT_MEMORY_MB", "1024")
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"LK3D_FFT_MEMORY_MB: expected a number of MiB, got {raw!r}") from None
    return int(mb * 2 ** 20)


def _complex(dtype):
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _real(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def candidate_lengths(Q, E):
    """Per axis, the transform lengths the plan considers for outputs q and dilated extent e."""
    cands = []
    for q, e in zip(Q, E):
        hi = next_fast(q + e - 1)
        axis = [f for f in _FAST if f >= e + 1 and f <= hi] or [hi]
        # Keep the shortest length of each tile count (a longer L with the same count is wasted),
        # then the 8 shortest and the 16 longest of those: the search stays small on long axes.
        seen, keep = set(), []
        for f in axis:
            t = -(-q // (f - e + 1))
            if t not in seen:
                seen.add(t)
                keep.append(f)
        cands.append(keep if len(keep) <= 24 else keep[:8] + keep[-16:])
    return cands


@functools.lru_cache(maxsize=4096)
def plan_tiles(Q, E, K, N, cin, cout, groups, gpu=None):
    """Per-axis transform lengths L for outputs Q, dilated extents E, taps K; and the modelled
    seconds. Returns ``(L, seconds)`` with L a 3-tuple. ``gpu``: a GPU's figures
    (``lk3d.autotune.devices.Figures``): L then minimises the time modelled on that device from
    its FLOP rate and bandwidth (``lk3d._cuda_model.fft_ms``; cuFFT is fast on the same 7-smooth
    lengths), not this host's fitted seconds."""
    cost = fft_seconds if gpu is None else functools.partial(_gpu_seconds, gpu=gpu)
    best = None
    for L in itertools.product(*candidate_lengths(Q, E)):
        s = cost(L, Q, E, K, N, cin, cout, groups)
        if best is None or s < best[1]:
            best = (L, s)
    return best


def _gpu_seconds(L, Q, E, K, N, cin, cout, groups, gpu):
    from lk3d import _cuda_model

    return _cuda_model.fft_ms(L, Q, E, K, N, cin, cout, groups, 0, gpu) / 1e3


def fft_features(L, Q, E, K, N, cin, cout, groups):
    """The work of one overlap-save correlation with transform lengths L, per unit of ``COST``."""
    B = [l - e + 1 for l, e in zip(L, E)]
    T = math.prod(-(-q // b) for q, b in zip(Q, B))
    vol = math.prod(L)
    Fr = L[0] * L[1] * (L[2] // 2 + 1)
    logv = math.log2(max(2, vol))
    cg, og = cin // groups, cout // groups
    kept = (1 + B[0] / L[0] + B[0] * B[1] / (L[0] * L[1])) / 3  # irfftn_cropped's share
    dft = cout * cg * (K[0] * K[1] * K[2] * (L[2] // 2 + 1) + K[0] * K[1] * L[1] * (L[2] // 2 + 1)
                       + K[0] * L[0] * L[1] * (L[2] // 2 + 1))
    prod = N * T * Fr * cg * og * groups
    return {"fft": N * T * (cin + cout * kept) * vol * logv, "dft": dft,
            "bmm": prod if cg > 1 else 0, "elem": prod if cg == 1 else 0,
            "move": (N * cin * T + N * cout * T) * Fr if cg > 1 else 0, "tile": N * T}


def grad_weight_features(P, E, K, N, cin, cout, groups):
    """The transform lengths of ``conv3d_grad_weight`` over a padded input of size P (one
    whole-volume transform per axis, no tiling) and its work, in ``fft_features``' units: the
    input's and the gradient's transforms, the per-frequency channel products summed over the
    batch, the accumulator's inverse cropped to the dilated extent E."""
    L = tuple(next_fast(p) for p in P)
    vol, Fr = math.prod(L), L[0] * L[1] * (L[2] // 2 + 1)
    logv = math.log2(max(2, vol))
    cg, og = cin // groups, cout // groups
    kept = (1 + E[0] / L[0] + E[0] * E[1] / (L[0] * L[1])) / 3
    prod = N * Fr * cg * og * groups
    return L, {"fft": (N * (cin + cout) + cout * cg * kept) * vol * logv, "dft": 0,
               "bmm": prod if cg > 1 else 0, "elem": prod if cg == 1 else 0,
               "move": N * (cin + cout) * Fr if cg > 1 else 0, "tile": N}


def fft_seconds(L, Q, E, K, N, cin, cout, groups):
    """Modelled seconds of one overlap-save correlation with transform lengths L."""
    f = fft_features(L, Q, E, K, N, cin, cout, groups)
    return sum(COST[name] * v for name, v in f.items())


def _dft_matrix(k, L, dil, half, dtype, device, sign):
    """[k, F] matrix exp(sign·2πi·a·dil·f/L) for taps a < k; F = L//2+1 when ``half``."""
    f = torch.arange(L // 2 + 1 if half else L, dtype=torch.float64, device=device)
    a = torch.arange(k, dtype=torch.float64, device=device) * dil
    ang = (sign * 2 * math.pi / L) * torch.outer(a, f)
    return torch.polar(torch.ones_like(ang), ang).to(dtype)


def kernel_spectrum(w, L, dil, groups, cdtype):
    """conj(DFT) of the dilated kernel, contiguous [groups, Ld·Lh·(Lw//2+1), Cin/g, Cout/g].

    Three matmuls, one per axis (taps -> frequencies), each writing its result already in the
    layout the next one (and the channel product) reads: no permute of the large spectrum."""
    cout, cg, kd, kh, kw = w.shape
    og = cout // groups
    rdtype = torch.float64 if cdtype == torch.complex128 else torch.float32
    Gw = _dft_matrix(kw, L[2], dil[2], True, cdtype, w.device, +1).T     # [Fw, kw]
    Gh = _dft_matrix(kh, L[1], dil[1], False, cdtype, w.device, +1).T    # [Lh, kh]
    Gd = _dft_matrix(kd, L[0], dil[0], False, cdtype, w.device, +1).T    # [Ld, kd]
    fw = Gw.shape[0]
    wv = w.to(rdtype).reshape(groups, og, cg, kd, kh, kw).permute(0, 3, 4, 5, 2, 1)
    wv = wv.reshape(groups, kd, kh, kw, cg * og)                          # real, tiny
    s = torch.complex(torch.matmul(Gw.real.contiguous(), wv),
                      torch.matmul(Gw.imag.contiguous(), wv))             # [G, kd, kh, Fw, CO]
    s = torch.matmul(Gh, s.reshape(groups, kd, kh, fw * cg * og))        # [G, kd, Lh, Fw·CO]
    s = torch.matmul(Gd, s.reshape(groups, kd, L[1] * fw * cg * og))     # [G, Ld, Lh·Fw·CO]
    return s.reshape(groups, L[0] * L[1] * fw, cg, og)


def irfftn_cropped(spec, L, keep):
    """``irfftn(spec, s=L)[..., :keep[0], :keep[1], :keep[2]]`` over the last three axes, one
    axis at a time, cropping after each: only the kept rows are carried into the next axis
    (measured ~3-4x faster than the full inverse when a tile keeps about half of each axis)."""
    a = torch.fft.ifft(spec, dim=-3)[..., :keep[0], :, :]
    a = torch.fft.ifft(a, dim=-2)[..., :keep[1], :].contiguous()
    return torch.fft.irfft(a, n=L[2], dim=-1)[..., :keep[2]]


def _tiles(x, L, B, T):
    """Overlapping input windows [N, C, Td, Th, Tw, Ld, Lh, Lw] of a zero-extended ``x``."""
    need = [t * b + l - b for t, b, l in zip(T, B, L)]
    ext = [max(0, n - s) for n, s in zip(need, x.shape[2:])]
    x = F.pad(x, (0, ext[2], 0, ext[1], 0, ext[0]))
    x = x[:, :, :need[0], :need[1], :need[2]]
    return x.unfold(2, L[0], B[0]).unfold(3, L[1], B[1]).unfold(4, L[2], B[2])


def xcorr(x, w, dil, Q, groups, L=None):
    """The grouped correlation ``out[n,o,p] = sum_{c,a} x[n,c,p+a·dil] w[o,c,a]`` for p < Q
    (x must cover Q + dilated extent - 1 per axis), by overlap-save FFT. Real result in the
    compute dtype (fp32 or fp64)."""
    N, cin = x.shape[:2]
    cout, cg = w.shape[:2]
    og = cout // groups
    K = tuple(w.shape[2:])
    E = extent(K, dil)
    if L is None:
        gpu = devices.figures(x.device) if x.is_cuda else None
        L = plan_tiles(tuple(Q), E, K, N, cin, cout, groups, gpu)[0]
    B = [l - e + 1 for l, e in zip(L, E)]
    T = [-(-q // b) for q, b in zip(Q, B)]
    nt = math.prod(T)
    Fr = L[0] * L[1] * (L[2] // 2 + 1)
    rdtype = _real(x.dtype)
    cdtype = _complex(x.dtype)
    esize = torch.empty((), dtype=cdtype).element_size()
    x = x.to(rdtype)

    out = torch.empty((N, cout, *(t * b for t, b in zip(T, B))), dtype=rdtype, device=x.device)
    # Chunks: groups (with their output channels) and batch, each chunk's spectra within budget.
    per_group = Fr * esize * (cg * og + nt * (cg + og))          # one sample, one group
    g_chunk = max(1, min(groups, _budget_bytes() // max(1, per_group)))
    n_chunk = max(1, min(N, _budget_bytes() // max(1, per_group * g_chunk)))
    for g0 in range(0, groups, g_chunk):
        g1 = min(groups, g0 + g_chunk)
        g = g1 - g0
        ws = kernel_spectrum(w[g0 * og:g1 * og], L, dil, g, cdtype)      # [g, Fr, cg, og]
        for n0 in range(0, N, n_chunk):
            n1 = min(N, n0 + n_chunk)
            n = n1 - n0
            xs = torch.fft.rfftn(_tiles(x[n0:n1, g0 * cg:g1 * cg], L, B, T), dim=(-3, -2, -1))
            xs = xs.reshape(n, g, cg, nt, Fr)
            if cg == 1:  # depthwise: an elementwise product per output channel
                ys = xs * ws.permute(0, 3, 2, 1).unsqueeze(0)             # [n, g, og, T, Fr]
            else:  # one [n·T, cg] @ [cg, og] product per group and frequency
                xs = xs.permute(1, 4, 0, 3, 2).reshape(g, Fr, n * nt, cg).contiguous()
                ys = torch.matmul(xs, ws).reshape(g, Fr, n, nt, og)
                ys = ys.permute(2, 0, 4, 3, 1).contiguous()               # [n, g, og, T, Fr]
            ys = ys.reshape(n, g * og, *T, L[0], L[1], L[2] // 2 + 1)
            ys = irfftn_cropped(ys, L, B)
            ys = ys.permute(0, 1, 2, 5, 3, 6, 4, 7)                      # [n, O, Td, Bd, ...]
            out[n0:n1, g0 * og:g1 * og] = ys.reshape(n, g * og, *out.shape[2:])
    return out[:, :, :Q[0], :Q[1], :Q[2]]


def conv3d_forward(x, w, bias, stride, padding, dilation, groups):
    """``F.conv3d`` by FFT; ``padding`` is (d_l, h_l, w_l, d_r, h_r, w_r)."""
    xp = zero_pad(x, padding)
    E = extent(w.shape[2:], dilation)
    Q = [p - e + 1 for p, e in zip(xp.shape[2:], E)]
    y = xcorr(xp, w, dilation, Q, groups)
    if any(s > 1 for s in stride):
        y = y[:, :, ::stride[0], ::stride[1], ::stride[2]]
    if bias is not None:
        y = y + bias.to(y.dtype).view(1, -1, 1, 1, 1)
    return y.to(x.dtype)


def conv3d_grad_input(grad, w, input_shape, stride, padding, dilation, groups):
    """Gradient of ``conv3d_forward`` in its input, by the same correlation."""
    cout, cg = w.shape[:2]
    og = cout // groups
    E = extent(w.shape[2:], dilation)
    P = [s + padding[i] + padding[i + 3] for i, s in enumerate(input_shape[2:])]
    Q = [p - e + 1 for p, e in zip(P, E)]
    if any(s > 1 for s in stride):  # spread grad onto the stride-1 output grid
        up = grad.new_zeros((*grad.shape[:2], *Q))
        up[:, :, ::stride[0], ::stride[1], ::stride[2]] = grad
        grad = up
    else:
        grad = grad[:, :, :Q[0], :Q[1], :Q[2]]
    gp = F.pad(grad, (E[2] - 1, E[2] - 1, E[1] - 1, E[1] - 1, E[0] - 1, E[0] - 1))
    wt = w.reshape(groups, og, cg, *w.shape[2:]).transpose(1, 2)
    wt = wt.reshape(groups * cg, og, *w.shape[2:]).flip(2, 3, 4)
    gx = xcorr(gp, wt, dilation, P, groups)
    left = padding[:3]
    gx = gx[:, :, left[0]:left[0] + input_shape[2], left[1]:left[1] + input_shape[3],
            left[2]:left[2] + input_shape[4]]
    return gx.to(grad.dtype)


def conv3d_grad_weight(grad, x, weight_shape, stride, padding, dilation, groups):
    """Gradient of ``conv3d_forward`` in its weight: for every tap a,
    ``dw[o,c,a] = sum_{n,p} g[n,o,p] · xp[n,c,p+a·dil]``, one length-L transform per axis."""
    cout, cg = weight_shape[:2]
    og = cout // groups
    K = weight_shape[2:]
    E = extent(K, dilation)
    xp = zero_pad(x, padding)
    P = xp.shape[2:]
    Q = [p - e + 1 for p, e in zip(P, E)]
    rdtype, cdtype = _real(x.dtype), _complex(x.dtype)
    if any(s > 1 for s in stride):
        up = grad.new_zeros((*grad.shape[:2], *Q), dtype=rdtype)
        up[:, :, ::stride[0], ::stride[1], ::stride[2]] = grad
        grad = up
    L = [next_fast(p) for p in P]
    N = x.shape[0]
    Fr = L[0] * L[1] * (L[2] // 2 + 1)
    esize = torch.empty((), dtype=cdtype).element_size()
    # Chunks: groups, then the batch. Per group: its accumulator (cg·og spectra) and, per sample,
    # the input's and the gradient's spectra (cg + og); a chunk's total stays within budget.
    acc_group, sample_group = Fr * esize * cg * og, Fr * esize * (cg + og)
    budget = _budget_bytes()
    g_chunk = max(1, min(groups, budget // max(1, acc_group + sample_group)))
    corr = torch.empty((cout, cg, *E), dtype=rdtype, device=x.device)
    for g0 in range(0, groups, g_chunk):
        g1 = min(groups, g0 + g_chunk)
        g = g1 - g0
        room = budget - g * acc_group
        n_chunk = max(1, min(N, room // max(1, g * sample_group)))
        # depthwise: [g, og, Fr], elementwise products summed over the batch in place; else
        # [g, Fr, cg, og], one [cg, n] @ [n, og] product per group and frequency
        shape = (g, og, Fr) if cg == 1 else (g, Fr, cg, og)
        acc = torch.zeros(shape, dtype=cdtype, device=x.device)
        for n0 in range(0, N, n_chunk):
            n1 = min(N, n0 + n_chunk)
            n = n1 - n0
            xs = torch.fft.rfftn(xp[n0:n1, g0 * cg:g1 * cg].to(rdtype), s=L, dim=(-3, -2, -1))
            gs = torch.fft.rfftn(grad[n0:n1, g0 * og:g1 * og].to(rdtype), s=L,
                                 dim=(-3, -2, -1))
            gs = gs.reshape(n, g, og, Fr).conj()
            if cg == 1:
                xs = xs.reshape(n, g, 1, Fr)
                for i in range(n):
                    acc.addcmul_(xs[i], gs[i])
            else:
                xs = xs.reshape(n, g, cg, Fr).permute(1, 3, 2, 0)           # [g, Fr, cg, n]
                acc += torch.matmul(xs, gs.permute(1, 3, 0, 2))
        if cg > 1:
            acc = acc.permute(0, 3, 2, 1)
        acc = acc.reshape(g * og, cg, L[0], L[1], L[2] // 2 + 1)
        corr[g0 * og:g1 * og] = irfftn_cropped(acc, L, E)
    dw = corr[:, :, ::dilation[0], ::dilation[1], ::dilation[2]]
    return dw.to(x.dtype).contiguous()
