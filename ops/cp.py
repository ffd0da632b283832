"""Rank-R CP convolution: ``lk3d.cp_conv3d`` and the ``lk3d::cp_conv3d`` op, on an
``lk3d.CPFactors`` (``lk3d.cp_factors``).

A rank-R CP kernel holds a dense weight ``[Cout, Cin, kd, kh, kw]`` as five factor matrices::

    W[o, i, a, b, c] = sum_r  U_out[o, r] * weights[r] * U_in[i, r] * A[a, r] * B[b, r] * C[c, r]

so the convolution factors into a sequence (DESIGN.md, "rank-R CP")::

    y[n, o, p] = sum_r U_out[o, r] weights[r] sum_{a,b,c} A[a, r] B[b, r] C[c, r]
                                            sum_i U_in[i, r] x[n, i, p * stride + (a, b, c) * dil]

Layout: NCDHW or channels_last_3d input (the output keeps the input's layout), batched or
unbatched. Supported: stride, dilation and padding (ints, 3-tuples, ``"same"`` with even kernels,
``"valid"``) exactly as ``F.conv3d(input, factors.to_dense(), bias, ...)``; groups = 1 only.

Where it runs. ``lk3d::cp_conv3d`` and its backward op ``lk3d::cp_conv3d_backward`` each pick,
per call, one of three algorithms through ``lk3d.autotune.select`` (``explain`` shows the plans):
``separable``, the staged separable kernels (``cp_sep_kernel``, see "Separable" below), and
``tiled``, the k³ fused Triton kernels of ``lk3d.kernels.cp``, where they can serve the tensors
(``_algos.kernels_can_run``: CUDA fp16/bf16/fp32; CPU fp16/fp32/fp64 under the interpreter,
``TRITON_INTERPRET=1``, where they are always taken; all tensors of one dtype and device), and
``aten``, the factored torch sequence below. ``LK3D_ALGO=tiled|aten`` forces one; a cached or
measured plan (``LK3D_AUTOTUNE=1``, ``lk3d.autotune.tune()``) wins over the cost model
(``model_ms``), which weighs the fused kernels' FLOPs against the sequence's memory traffic: the
sequence wins at large kernels. The kernels take their launch config from
``lk3d.autotune.configs`` (the space: ``lk3d.kernels.cp_configs``):

    forward      ``cp_conv3d_fwd``: one fused kernel per tile of output voxels; gathers x per tap,
                 projects it through ``U_in`` with the tap's ``A·B·C`` row folded in, accumulates
                 z [voxels, R] in registers and writes ``z·weights @ U_out^T + bias`` once. Reads x,
                 writes y, nothing else: no ``[N, R, D, H, W]`` intermediate.
    grad input   ``cp_conv3d_bwd_input``: the same kernel through the transposed tap map
    + grad U_in  (grad_output projected through ``U_out·weights``, then ``U_in``); with grad U_in
                 asked for it also sums ``x^T @ gu`` per program.
    grad U_out, weights, A, B, C
                 ``cp_conv3d_bwd_factors``: per output tile, ``gz = grad_y @ U_out·weights`` and
                 the forward's z; it sums ``D[tap, r] = sum gz·u_tap`` and ``G = grad_y^T z``, and
                 here (tiny tensors) grad A = sum_{b,c} D B C (likewise B, C), grad U_out =
                 G·weights, grad weights = sum_o G·U_out. Only what ``output_mask`` asks for is
                 computed; bias grad is ``grad.sum((0, 2, 3, 4))``.

Separable (``LK3D_ALGO=separable``; on CUDA the cost model's pick at large kernels, e.g. G4):
one launch of ``cp_sep_kernel`` per pass of the sequence, R-channel intermediates between them,
stored channels innermost in the input's dtype. Grids: x's [D, H, W]; after the W pass
[D, H, W']; after the H pass [D, H', W']; y's [D', H', W'] (primes: output sizes).

    forward      z0 = x @ U_in (x's grid), z1 = C along W, z2 = B along H, then A along D with
                 ``(·weights) @ U_out^T + bias`` as its epilogue, writing y. Intermediates z0,
                 z1, z2 (R channels each; at most two alive at once).
    backward     z0..z2 recomputed as far as the mask needs them; G = dy^T z3 (the D pass of z2
                 with the sums as epilogue, z3 never stored) for grad U_out and weights;
                 g3 = dy @ U_out·weights; g2 = A^T along D (summing grad A = sum g3 ⊙ shifted
                 z2), g1 = B^T along H (grad B), then C^T along W projected through U_in^T into
                 grad input, summing grad C and grad U_in = x^T g0. Intermediates z0, z1, z2,
                 g3, g2, g1.

FLOPs per output voxel (stride 1): 2·R·(Cin + kd + kh + kw + Cout) forward, the executed count
being that with R and the channel counts rounded up to the tiles (R_PAD >= 16); bytes: x read
once, y written once, each intermediate written once and read once (G4, bf16: 448 B per voxel
against 352 for x + y + the three intermediates once). The k³ fused kernel remains where the
model prices it lower (kernels of a few taps).

FLOPs per output voxel of the fused forward: ``2·k³·Cin·R + 2·R·Cout`` (k³ = kd·kh·kw), not the
separable ``2·R·(Cin + kd + kh + kw + Cout)``: running U_in, then A, B, C one axis at a time,
needs each intermediate staged on chip and re-read along one axis, and Triton has no addressable
on-chip staging for a halo'd 3-D tile (shared memory is the compiler's): the separable kernels
above stage through memory instead. Against the dense kernel (``2·k³·Cin·Cout``) it still saves a factor
``Cout / R`` and never builds the dense weight; grad-input costs the same with Cin and Cout
swapped, the factor gradients about twice the forward.

The ``aten`` algorithm, and everywhere the kernels do not serve (CPU without the interpreter,
CPU bf16, float64 on CUDA, mixed dtypes), is the factored sequence in torch
(``cp_conv3d_torch``, in ``lk3d.cp_ref``): a pointwise conv with ``U_in`` (x -> [N, R, D, H,
W]), three 1-D depthwise convs (groups=R) with ``A``, ``B``, ``C`` along D, H and W, each taking
that axis's stride, dilation and padding, then a pointwise conv with ``U_out·weights`` and the
bias; the separable ``2·R·(Cin + kd + kh + kw + Cout)`` FLOPs per output voxel (stride 1), at the
price of materialising the intermediates. Its backward recomputes the sequence and runs
``aten.convolution_backward`` through it in reverse. Both paths match ``F.conv3d`` with the dense
weight.

Non-finite values: both algorithms sum over the rank, so an Inf of the input (or of a factor, or
of the output gradient) meets the R components with their own signs and turns to NaN where
``F.conv3d(input, factors.to_dense())`` has +Inf or -Inf; a factor's Inf also meets the other
factors' zeros differently. A call whose operands are not all finite (``lk3d._algos.finite``: one
sum per tensor; the input, the factors and, backward, the output gradient) therefore runs the
dense convolution of ``to_dense()`` by aten (``cp_conv3d_dense``; backward its vector-Jacobian
product, ``cp_conv3d_dense_backward``): F.conv3d's NaN/Inf placement, at the dense convolution's
cost. The bias is added elementwise by every path and needs no check.

Double backward: the backward op has autograd of its own, written with the two ops themselves
(see "Double backward" below), so it runs on either algorithm and under ``torch.compile``.
"""
import math
from numbers import Integral
from typing import List, Optional

import torch

from lk3d import _algos
from lk3d import _cuda_model as cuda_model
from lk3d._algos import kernels_can_run
from lk3d._spec import (Conv3dSpec, batched, check_same, check_tensor, empty, geometry, out_size,
                        triple)
from lk3d.autotune import configs, devices, registry, select
from lk3d.cp_factors import CPFactors
from lk3d.cp_ref import (cp_conv3d_dense, cp_conv3d_dense_backward, cp_conv3d_ref,
                         cp_conv3d_torch, cp_conv3d_torch_backward)
from lk3d import kernels
from lk3d.kernels import INTERPRETED, memory_format
from lk3d.kernels import cp_configs as cp_family

configs.register(cp_family)

__all__ = ["CPFactors", "cp_conv3d", "cp_conv3d_torch", "cp_conv3d_ref", "check_cp_conv3d",
           "explain"]

# Set to False to run the torch path even where the Triton kernels could serve.
USE_KERNELS = True


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------

def check_cp_conv3d(input, factors, bias, stride, padding, dilation, groups) -> Conv3dSpec:
    """Check the arguments of ``cp_conv3d`` (``input`` 5-D here) and return the normalised spec."""
    check_tensor("input", input, (5,))
    if not isinstance(factors, CPFactors):
        raise TypeError(f"factors: expected an lk3d.CPFactors, got {type(factors).__name__}")
    check_same("factors", factors.U_out, input)
    if bias is not None:
        check_tensor("bias", bias, (1,))
        check_same("bias", bias, input)
        if tuple(bias.shape) != (factors.out_channels,):
            raise ValueError(f"bias: expected shape ({factors.out_channels},) to match U_out's "
                             f"{factors.out_channels} rows, got {tuple(bias.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, Integral):
        raise TypeError(f"groups: expected an int, got {groups!r} ({type(groups).__name__})")
    if groups != 1:
        raise ValueError(f"groups: a CP convolution takes groups=1 only, got {groups}")
    if input.shape[1] != factors.in_channels:
        raise ValueError(f"input: expected {factors.in_channels} channels (the rows of U_in), "
                         f"got input of shape {tuple(input.shape)}")
    stride = triple("stride", stride)
    dilation = triple("dilation", dilation)
    return geometry(input.shape[2:], factors.kernel_size, stride, padding, dilation,
                    kernel_arg="factors")


# ---------------------------------------------------------------------------------------------
# the custom ops
# ---------------------------------------------------------------------------------------------

def _kernels_serve(input, *tensors):
    """Whether the Triton kernels serve this call: ``USE_KERNELS`` on, ``input`` of a device and
    dtype they take (``lk3d._algos.kernels_can_run``), every other tensor alike."""
    return USE_KERNELS and kernels_can_run(input) and all(
        t is None or (t.dtype == input.dtype and t.device == input.device) for t in tensors)


def _problem(kind, M, kc, nc, A, B, C, rank, partials=False):
    return configs.Problem(kind, M=M, KC=kc, NC=nc, taps=A.shape[0] * B.shape[0] * C.shape[0],
                           rank=rank, partials=partials)


# The choice between the fused kernels ("tiled") and the factored torch sequence ("aten"), made
# where the ops run by lk3d.autotune.select as for lk3d.conv3d: LK3D_ALGO=tiled|aten forces one,
# a cached or (under LK3D_AUTOTUNE=1 / tune()) measured plan wins, else this cost model. Under the
# Triton interpreter the kernels are preferred (they are what the tests check). The fused
# kernels cost 2·k³·Cin·R FLOPs per output voxel (compute-bound), the sequence about its memory
# traffic (five convolutions, four R-channel intermediates): the sequence wins at large kernels.
# CUDA rates come from the device's figures (lk3d._cuda_model): the fused kernels at their issue
# ceiling ("cp_fused"), the sequence's pointwise convolutions at cuDNN's dense rate and its 1-D
# depthwise ones at its depthwise rate, floored by its memory traffic; guesses until `lk3d tune`
# measures the device.


def model_ms(algo, x_shape, cout, rank, kernel, stride, padding, dilation, dtype, device,
             backward=False) -> float:
    """Modelled milliseconds of a CP convolution's forward (or, with ``backward``, its backward:
    about twice the forward's work) by ``algo``: "tiled" (the fused Triton kernels) or "aten"
    (the factored sequence of convolutions). ``device``: a ``torch.device`` or a GPU's figures
    (``lk3d.autotune.devices.Figures``)."""
    size = out_size(x_shape[2:], kernel, stride, padding, dilation)
    n, cin = x_shape[:2]
    m_in, m_out = n * math.prod(x_shape[2:]), n * math.prod(size)
    passes = 2 if backward else 1
    gpu = devices.figures(device)
    elem = torch.empty((), dtype=dtype).element_size()
    moved = elem * (m_in * (cin + 7 * rank) + m_out * (rank + cout))
    if algo == "separable":
        if gpu is None:
            return math.inf  # the interpreter checks kernels; it is not for speed
        return _separable_ms(separable_launches(x_shape, cout, rank, kernel, stride, padding,
                                                dilation, backward),
                             gpu, dtype, _algos.allow_tf32(), elem)
    if algo == "tiled":
        if gpu is None:
            return math.inf  # the interpreter checks kernels; it is not for speed
        flops = 2 * m_out * (math.prod(kernel) * cin * rank + rank * cout)
        return passes * cuda_model.kernel_ms("cp_fused", flops, elem * m_out * (cin + cout), gpu,
                                             dtype, _algos.allow_tf32())
    flops = 2 * (m_in * rank * (cin + sum(kernel)) + m_out * rank * cout)
    if gpu is not None:
        tf32 = _algos.allow_tf32()
        pointwise = 2 * (m_in * rank * cin + m_out * rank * cout)
        secs = 1e-3 * (cuda_model.aten_ms("dense", pointwise, 0, gpu, dtype, tf32, 2)
                       + cuda_model.aten_ms("depthwise", flops - pointwise, 0, gpu, dtype, tf32,
                                            3))
        secs += moved / (cuda_model.BANDWIDTH_FRACTION * gpu.bandwidth)
        return passes * 1e3 * secs
    secs = moved / _algos.CPU_BYTES_PER_S + flops / (
        _algos.CPU_ATEN_PER_THREAD["depthwise"] * torch.get_num_threads())
    return passes * 1e3 * secs + 0.05


# The separable kernels (lk3d.kernels.cp.cp_sep_kernel, algorithm "separable"): one launch per
# pass of the sequence, each priced as its FLOPs at its unit's rate (the projections' tl.dot on
# the tensor cores, the 1-D passes' multiply-adds on the FP32 FMA units; a pass with both pays
# both), floored by the bytes it moves (its source, its destination, the tensors its partial sums
# read) at the sustained bandwidth, plus a launch. The rates are the kinds "cp_separable_tensor"
# and "cp_separable_fma" of the shipped kernel ceilings (lk3d._cuda_model.kernel_ceiling: the
# passes' issue ceilings read off their SASS for the device's SM version by `lk3d estimate` at
# the G4 goal shape; on sm_90 the projections' loop issues 4 HGMMA in 75 instructions, a 1-D
# pass's tap 16 FFMA in 88). Bounds taken as rates until a GPU measures the kernels.


def separable_launches(x_shape, cout, rank, kernel, stride, padding, dilation, backward=False):
    """The separable kernels' launches for one pass (forward, or the whole backward), each
    ``(tensor FLOPs, FMA FLOPs, elements moved)``, every output asked for; ``padding`` six ints
    or a string."""
    n, cin = x_shape[:2]
    size = out_size(x_shape[2:], kernel, stride, padding, dilation)
    (d, h, w), (yd, yh, yw) = x_shape[2:], size
    v0, v1, v2, v3 = (n * d * h * w, n * d * h * yw, n * d * yh * yw, n * yd * yh * yw)
    kd, kh, kw = kernel
    r = rank
    recompute = [(2 * v0 * cin * r, 0, v0 * (cin + r)),
                 (0, 2 * v1 * kw * r, (v0 + v1) * r),
                 (0, 2 * v2 * kh * r, (v1 + v2) * r)]
    if not backward:
        return recompute + [(2 * v3 * r * cout, 2 * v3 * kd * r, v2 * r + v3 * cout)]
    return recompute + [
        (2 * v3 * r * cout, 2 * v3 * kd * r, v2 * r + v3 * cout),       # G = dy^T z3
        (2 * v3 * cout * r, 0, v3 * (cout + r)),                        # g3 = dy @ U_out·w
        (0, 4 * v2 * kd * r, (v3 + 2 * v2) * r),                        # g2, grad A
        (0, 4 * v1 * kh * r, (v2 + 2 * v1) * r),                        # g1, grad B
        (4 * v0 * r * cin, 4 * v0 * kw * r, (v1 + v0) * r + 2 * v0 * cin)]  # dx, grad C, U_in


def _separable_ms(launches, gpu, dtype, tf32, elem):
    tensor, fma = (cuda_model.kernel_ceiling(f"cp_separable_{unit}", gpu)[1]
                   * cuda_model.unit_peak(gpu, unit, dtype, tf32) for unit in ("tensor", "fma"))
    bandwidth = cuda_model.BANDWIDTH_FRACTION * gpu.bandwidth
    return sum(1e3 * max(tf / tensor + ff / fma, elem * moved / bandwidth) + cuda_model.LAUNCH_MS
               for tf, ff, moved in launches)


def _request(op, input, U_out, A, B, C, stride, padding, dilation, serve):
    """The plan cache key's parts, the planner's problem and the preferred algorithm of one pass
    (``op``: "cp_conv3d" or "cp_conv3d_backward"); ``serve``: whether the kernels can take the
    call's tensors."""
    cout, rank = U_out.shape
    kernel = [A.shape[0], B.shape[0], C.shape[0]]
    key = (input.dtype, list(input.shape), [cout, input.shape[1], *kernel], stride, padding,
           dilation, 1, f"|R{rank}")
    preferred = "tiled" if INTERPRETED and input.device.type == "cpu" else None
    return key, (input, U_out, A, B, C, stride, padding, dilation, serve), preferred


def _plan(op, input, U_out, A, B, C, stride, padding, dilation, serve):
    """The ``select.Plan`` of one pass, as ``_run`` would choose it."""
    key, problem, preferred = _request(op, input, U_out, A, B, C, stride, padding, dilation,
                                       serve)
    return select.plan(op, key, input.device, problem, preferred=preferred, only=True)


def _run(op, args, tensors, geometry, dense, bias=None):
    """Run pass ``op`` on ``args`` (its runners' arguments). ``tensors``: the input first, the
    factors ``U_out, U_in, A, B, C, weights`` last, every tensor the pass sums over (one that is
    not finite sends the call to ``dense``, see "Non-finite values"); ``geometry``: stride,
    padding, dilation; ``bias``, added elementwise, only has to suit the kernels."""
    if not _algos.finite(*tensors):
        return dense(*args)
    input, (U_out, _, A, B, C, _) = tensors[0], tensors[-6:]
    key, problem, preferred = _request(op, input, U_out, A, B, C, *geometry,
                                       _kernels_serve(*tensors, bias))
    return select.execute(op, key, input.device, problem, args, preferred, only=True)


def _forward(input, U_out, U_in, A, B, C, weights, bias, stride, padding, dilation):
    tensors = (input, U_out, U_in, A, B, C, weights)
    return _run("cp_conv3d", (*tensors, bias, stride, padding, dilation), tensors,
                (stride, padding, dilation), cp_conv3d_dense, bias)


def _forward_kernels(input, U_out, U_in, A, B, C, weights, bias, stride, padding, dilation):
    size = out_size(input.shape[2:], (A.shape[0], B.shape[0], C.shape[0]), stride, padding,
                    dilation)
    cin, (cout, rank) = input.shape[1], U_out.shape
    config = configs.default_config(
        _problem("cp_conv", input.shape[0] * math.prod(size), cin, cout, A, B, C, rank),
        input.device)
    with _algos.launch_device(input):
        return kernels.cp.cp_conv3d_fwd(input, U_out, U_in, A, B, C, weights, bias, stride,
                                        padding, dilation, config,
                                        allow_tf32=_algos.allow_tf32())


def _sep_config(input, U_out, A, B, C, partials=False):
    cin, (cout, rank) = input.shape[1], U_out.shape
    problem = configs.Problem("cp_sep", M=input.shape[0] * math.prod(input.shape[2:]), KC=cin,
                              NC=max(cin, cout), taps=max(A.shape[0], B.shape[0], C.shape[0]),
                              rank=rank, partials=partials)
    return configs.default_config(problem, input.device)


def _forward_separable(input, U_out, U_in, A, B, C, weights, bias, stride, padding, dilation):
    with _algos.launch_device(input):
        return kernels.cp.cp_sep_fwd(input, U_out, U_in, A, B, C, weights, bias, stride,
                                     padding, dilation, _sep_config(input, U_out, A, B, C),
                                     allow_tf32=_algos.allow_tf32())


def _backward_separable(grad, input, U_out, U_in, A, B, C, weights, stride, padding, dilation,
                        output_mask):
    with _algos.launch_device(input):
        dx, gui, ta, tb, tc, G = kernels.cp.cp_sep_bwd(
            grad, input, U_out, U_in, A, B, C, weights, stride, padding, dilation,
            _sep_config(input, U_out, A, B, C, partials=True), list(output_mask),
            allow_tf32=_algos.allow_tf32())
    grads = [dx, None, gui, ta, tb, tc, None]
    if G is not None:
        grads[1] = G if weights is None else G * weights
        if weights is not None:
            grads[6] = (G * U_out).sum(0)
    like = (input, U_out, U_in, A, B, C, weights if weights is not None else U_out[0])
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)]


def _backward_impl(grad, input, U_out, U_in, A, B, C, weights, stride, padding, dilation,
                   output_mask):
    return _run("cp_conv3d_backward", (grad, input, U_out, U_in, A, B, C, weights, stride,
                                       padding, dilation, output_mask),
                (input, grad, U_out, U_in, A, B, C, weights), (stride, padding, dilation),
                cp_conv3d_dense_backward)


def _backward_kernels(grad, input, U_out, U_in, A, B, C, weights, stride, padding, dilation,
                      output_mask):
    need_x, need_uo, need_ui, need_a, need_b, need_c, need_w = output_mask
    need_taps, need_out = need_a or need_b or need_c, need_uo or need_w
    N, cin = input.shape[:2]
    cout, rank = U_out.shape
    geometry = (stride, padding, dilation)
    tf32 = _algos.allow_tf32()
    grads = [None] * 7
    with _algos.launch_device(input):
        if need_x or need_ui:
            config = configs.default_config(
                _problem("cp_conv", N * math.prod(input.shape[2:]), cout, cin, A, B, C, rank,
                         partials=need_ui), input.device)
            grads[0], grads[2] = kernels.cp.cp_conv3d_bwd_input(
                grad, input, U_out, U_in, A, B, C, weights, *geometry, config,
                need_input=need_x, need_u_in=need_ui, allow_tf32=tf32)
        if need_taps or need_out:
            config = configs.default_config(
                _problem("cp_grad", N * math.prod(grad.shape[2:]), cin, cout, A, B, C, rank,
                         partials=True), input.device)
            D, G = kernels.cp.cp_conv3d_bwd_factors(
                input, grad, U_out, U_in, A, B, C, weights, *geometry, config,
                need_taps=need_taps, need_out=need_out, allow_tf32=tf32)
    if need_out:
        grads[1] = G if weights is None else G * weights
        if weights is not None:
            grads[6] = (G * U_out).sum(0)
    for i, (spec, factor) in enumerate((("abcr,br,cr->ar", (B, C)), ("abcr,ar,cr->br", (A, C)),
                                        ("abcr,ar,br->cr", (A, B)))):
        if output_mask[3 + i]:
            grads[3 + i] = torch.einsum(spec, D, *(f.to(D.dtype) for f in factor))
    like = (input, U_out, U_in, A, B, C, weights if weights is not None else U_out[0])
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)]


def _cost(algo, backward):
    def cost_ms(input, U_out, A, B, C, stride, padding, dilation, serve):
        return model_ms(algo, list(input.shape), U_out.shape[0], U_out.shape[1],
                        [A.shape[0], B.shape[0], C.shape[0]], stride, padding, dilation,
                        input.dtype, input.device, backward=backward)
    return cost_ms


def _serve(input, U_out, A, B, C, stride, padding, dilation, serve):
    return serve


def _always(*problem):
    return True


# The two passes' algorithms (lk3d.autotune.registry); their problem is ``(input, U_out, A, B, C,
# stride, padding, dilation, serve)``, ``serve`` saying whether the kernels take the call's tensors.
# The kernels' launch configs are not measured: each launch takes configs.default_config.
for _op, _kernels_run, _sep_run, _torch_run in (
        ("cp_conv3d", _forward_kernels, _forward_separable, cp_conv3d_torch),
        ("cp_conv3d_backward", _backward_kernels, _backward_separable,
         cp_conv3d_torch_backward)):
    registry.register(registry.Algorithm(
        _op, "tiled", _kernels_run, _serve, _cost("tiled", _op != "cp_conv3d"),
        why_not=_algos.kernels_why_not, launches=True))
    registry.register(registry.Algorithm(
        _op, "separable", _sep_run, _serve, _cost("separable", _op != "cp_conv3d"),
        why_not=_algos.kernels_why_not, launches=True))
    registry.register(registry.Algorithm(_op, "aten", _torch_run, _always,
                                         _cost("aten", _op != "cp_conv3d")))


@torch.library.custom_op("lk3d::cp_conv3d", mutates_args=())
def cp_conv3d_op(input: torch.Tensor, U_out: torch.Tensor, U_in: torch.Tensor, A: torch.Tensor,
                 B: torch.Tensor, C: torch.Tensor, weights: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], stride: List[int], padding: List[int],
                 dilation: List[int]) -> torch.Tensor:
    kernel = (A.shape[0], B.shape[0], C.shape[0])
    size = out_size(input.shape[2:], kernel, stride, padding, dilation)
    mf = memory_format(input)
    if input.shape[0] == 0:
        return empty((0, U_out.shape[0], *size), input, mf)
    y = _forward(input, U_out, U_in, A, B, C, weights, bias, stride, padding, dilation)
    return y.to(input.dtype).contiguous(memory_format=mf)


@cp_conv3d_op.register_fake
def _(input, U_out, U_in, A, B, C, weights, bias, stride, padding, dilation):
    kernel = (A.shape[0], B.shape[0], C.shape[0])
    size = out_size(input.shape[2:], kernel, stride, padding, dilation)
    return empty((input.shape[0], U_out.shape[0], *size), input, memory_format(input))


@torch.library.custom_op("lk3d::cp_conv3d_backward", mutates_args=())
def cp_conv3d_backward_op(grad: torch.Tensor, input: torch.Tensor, U_out: torch.Tensor,
                          U_in: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                          weights: Optional[torch.Tensor], stride: List[int], padding: List[int],
                          dilation: List[int], output_mask: List[bool]) -> List[torch.Tensor]:
    """Gradients in (input, U_out, U_in, A, B, C, weights); where ``output_mask`` is False, or
    for ``weights`` when it is None, the entry is zeros (of shape [R] for a missing ``weights``)."""
    like = (input, U_out, U_in, A, B, C, weights if weights is not None else U_out[0])
    if grad.numel() == 0 or input.numel() == 0:
        return [torch.zeros_like(t) for t in like]
    grads = _backward_impl(grad, input, U_out, U_in, A, B, C, weights, stride, padding, dilation,
                           list(output_mask))
    # Both paths compute U_out's and weights' gradients together: zero the one not asked for.
    out = [g.to(t.dtype).contiguous() if m else t.new_zeros(t.shape)
           for g, t, m in zip(grads, like, output_mask)]
    out[0] = out[0].contiguous(memory_format=memory_format(input))
    return out


@cp_conv3d_backward_op.register_fake
def _(grad, input, U_out, U_in, A, B, C, weights, stride, padding, dilation, output_mask):
    like = (U_out, U_in, A, B, C, weights if weights is not None else U_out[0])
    return ([empty(input.shape, input, memory_format(input))]
            + [empty(t.shape, t) for t in like])


def _setup_context(ctx, inputs, output):
    input, U_out, U_in, A, B, C, weights, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(input, U_out, U_in, A, B, C, weights)
    ctx.has_bias = bias is not None
    ctx.args = (list(stride), list(padding), list(dilation))


def _backward(ctx, grad):
    input, U_out, U_in, A, B, C, weights = ctx.saved_tensors
    needs = list(ctx.needs_input_grad)
    mask = needs[:6] + [weights is not None and needs[6]]
    grads = [None] * 7
    if any(mask):
        grads = cp_conv3d_backward_op(grad, input, U_out, U_in, A, B, C, weights, *ctx.args,
                                      mask)
        grads = [g if m else None for g, m in zip(grads, mask)]
    gb = grad.sum(dim=(0, 2, 3, 4)) if ctx.has_bias and needs[7] else None
    return (*grads, gb, None, None, None)


cp_conv3d_op.register_autograd(_backward, setup_context=_setup_context)


# Double backward. The backward op is the gradient of S = <grad, cp_conv3d(x, s, U_in, A, B, C)>
# (s = U_out·weights), which is linear in grad, in x and in each factor. Cotangents v = (v_x,
# v_U_out, ..., v_weights) of that gradient pair with it to give S's derivative along v,
# <grad, J v>, where
#     J v = cp_conv3d(v_x, s, U_in, A, B, C) + cp_conv3d(x, dW)
# and dW, the CP weight's derivative along v, is a CP weight again: one block of R columns per
# factor with a cotangent, that factor replaced by it (s by v_s = v_U_out·weights +
# U_out·v_weights). So the gradient in grad is J v, and those in x and the factors are the
# backward op's on the two convolutions, each block's gradients going back to the factors it was
# built from (not to the cotangent in it). Blocks share a call while their rank fits the rank the
# kernels pad R to (a power of two, at least 16): no call holds more than the forward did.
# Cotangents of entries the backward op did not compute (output_mask False: constant zeros) do
# not count.

def _setup_context_backward(ctx, inputs, output):
    grad, input, U_out, U_in, A, B, C, weights, stride, padding, dilation, mask = inputs
    ctx.save_for_backward(grad, input, U_out, U_in, A, B, C, weights)
    ctx.args = (list(stride), list(padding), list(dilation))
    ctx.mask = [bool(m) for m in mask[:6]] + [bool(mask[6]) and weights is not None]
    ctx.set_materialize_grads(False)  # an unused gradient need not cost a convolution


def _sum(*terms):
    """The sum of the terms that are not None (None if all are)."""
    terms = [t for t in terms if t is not None]
    return sum(terms[1:], terms[0]) if terms else None


def _backward_backward(ctx, gg):
    grad, x, U_out, U_in, A, B, C, weights = ctx.saved_tensors
    v = [g if m else None for g, m in zip(gg, ctx.mask)]
    needs = ctx.needs_input_grad  # grad, input, U_out, U_in, A, B, C, weights, ...
    scaled = weights is not None
    s = U_out * weights if scaled else U_out
    factors = [s, U_in, A, B, C]
    v_uo = v[1] * weights if scaled and v[1] is not None else v[1]
    v_s = _sum(v_uo, None if v[6] is None else U_out * v[6])
    moved = [(j, t) for j, t in enumerate([v_s, *v[2:6]]) if t is not None]
    rank = s.shape[1]
    per_call = max(16, 1 << (rank - 1).bit_length()) // rank
    calls = [moved[i:i + per_call] for i in range(0, len(moved), per_call)]

    def dW(blocks):
        return [torch.cat([t if j == k else factors[k] for j, t in blocks], 1) for k in range(5)]

    want = [needs[2] or needs[7], *needs[3:7]]  # gradients in s, U_in, A, B, C
    g_grad = g_x = h = None  # h: the s-gradient of the block where s moved
    g = [None] * 5
    if needs[0]:
        terms = [cp_conv3d_op(x, *dW(blocks), None, None, *ctx.args) for blocks in calls]
        if v[0] is not None:
            terms.append(cp_conv3d_op(v[0], *factors, None, None, *ctx.args))
        g_grad = _sum(*terms)
    if v[0] is not None and any(want):
        got = cp_conv3d_backward_op(grad, v[0], *factors, None, *ctx.args, [False, *want, False])
        g = [got[1 + k] if want[k] else None for k in range(5)]
    for blocks in calls if needs[1] or any(want) else []:
        got = cp_conv3d_backward_op(grad, x, *dW(blocks), None, *ctx.args,
                                    [needs[1], *want, False])
        g_x = _sum(g_x, got[0] if needs[1] else None)
        for k in range(5):
            if want[k]:
                chunks = got[1 + k].split(rank, 1)
                g[k] = _sum(g[k], *(c for (j, _), c in zip(blocks, chunks) if j != k))
                if k == 0 and blocks[0][0] == 0:
                    h = chunks[0]
    # back from s = U_out·weights, and from v_s = v_U_out·weights + U_out·v_weights
    g_uo, g_w = g[0], None
    if scaled:
        g_uo = _sum(None if g[0] is None else g[0] * weights,
                    None if h is None or v[6] is None else h * v[6])
        g_w = _sum(None if g[0] is None else (g[0] * U_out).sum(0),
                   None if h is None or v[1] is None else (h * v[1]).sum(0))
    return (g_grad, g_x, g_uo if needs[2] else None, *g[1:], g_w if needs[7] else None,
            None, None, None, None)


cp_conv3d_backward_op.register_autograd(_backward_backward,
                                        setup_context=_setup_context_backward)


# ---------------------------------------------------------------------------------------------
# the functional
# ---------------------------------------------------------------------------------------------

def explain(input, factors, bias=None, stride=1, padding=0, dilation=1,
            groups=1) -> "select.Plans":
    """The plans ``cp_conv3d`` would use for these arguments, without running anything:
    ``{"forward": plan, "backward": plan}`` (an ``lk3d.autotune.select.Plans``: printed, a
    table), each a dict as ``lk3d.explain`` gives (algorithm "tiled", the fused Triton kernels, or
    "aten", the factored torch sequence; where the choice came from, "only" where the kernels
    cannot take the tensors; modelled or measured ms per candidate)."""
    x, _ = batched(input)
    spec = check_cp_conv3d(x, factors, bias, stride, padding, dilation, groups)
    U_out, U_in, A, B, C, weights = factors.tensors()
    geometry = (list(spec.stride), spec.padding, list(spec.dilation))
    serve = _kernels_serve(x, U_out, U_in, A, B, C, weights, bias)
    plans = {name: _plan(op, x, U_out, A, B, C, *geometry, serve).as_dict()
             for name, op in (("forward", "cp_conv3d"), ("backward", "cp_conv3d_backward"))}
    pad = padding if isinstance(padding, str) else tuple(spec.pad_left)
    title = (f"lk3d.cp_conv3d on {x.device}, {str(x.dtype).removeprefix('torch.')}: input "
             f"{tuple(x.shape)}, rank {U_out.shape[1]}, {x.shape[1]} -> {U_out.shape[0]} "
             f"channels, kernel {(A.shape[0], B.shape[0], C.shape[0])}, stride "
             f"{tuple(spec.stride)}, padding {pad}, dilation {tuple(spec.dilation)}")
    return select.Plans(plans, title)


def cp_conv3d(input, factors, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """3D convolution with a rank-R CP kernel: ``F.conv3d(input, factors.to_dense(), bias, stride,
    padding, dilation)`` without building the dense weight.

    ``input`` is ``[N, Cin, D, H, W]`` or unbatched ``[Cin, D, H, W]``; ``factors`` an
    ``lk3d.CPFactors`` of the input's dtype and device with ``Cin`` rows in ``U_in``; ``stride``,
    ``dilation`` and ``padding`` take an int or a tuple of 3, and ``padding`` also ``"same"``
    (stride 1 only) or ``"valid"``. ``groups`` must be 1 (it is there so a grouped call fails
    loudly). Differentiable in the input, every factor, the weights and the bias, twice and more
    (double backward); one ``lk3d::cp_conv3d`` node under ``torch.compile``.
    """
    input, unbatched = batched(input)
    spec = check_cp_conv3d(input, factors, bias, stride, padding, dilation, groups)
    out = cp_conv3d_op(input, *factors.tensors(), bias, list(spec.stride), spec.padding,
                       list(spec.dilation))
    return out.squeeze(0) if unbatched else out
