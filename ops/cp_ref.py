"""The torch path of ``lk3d.cp_conv3d``: the factored sequence in plain torch, and the dense
references.

``cp_conv3d_torch`` (the ``aten`` algorithm of ``lk3d::cp_conv3d``): a pointwise conv with
``U_in`` (x -> [N, R, D, H, W]), three 1-D depthwise convs (groups=R) with ``A``, ``B``, ``C``
along D, H and W, each taking that axis's stride, dilation and padding, then a pointwise conv with
``U_out·weights`` and the bias. ``cp_conv3d_torch_backward`` recomputes the sequence and runs
``aten.convolution_backward`` through it in reverse. ``cp_conv3d_dense`` and
``cp_conv3d_dense_backward`` run the dense convolution of the reconstructed weight by aten (the
path of operands that are not all finite); ``cp_conv3d_ref`` is the float64 reference of the
tests.

Arguments as the ``lk3d::cp_conv3d`` ops take them (``input`` 5-D, ``padding`` six ints
``(d_l, h_l, w_l, d_r, h_r, w_r)``), but for ``cp_conv3d_ref``.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lk3d import _algos
from lk3d.cp_factors import dense_weight

__all__ = ["cp_conv3d_torch", "cp_conv3d_torch_backward", "cp_conv3d_dense",
           "cp_conv3d_dense_backward", "cp_conv3d_ref"]


@dataclass(frozen=True)
class _AxisConv:
    """One 1-D depthwise conv of the sequence, along spatial ``axis`` (0: D, 1: H, 2: W): the
    symmetric part of the padding goes to the conv, the rest to an ``F.pad`` before it."""
    axis: int
    stride: list
    padding: list
    dilation: list
    extra: list  # F.pad's six values (w_l, w_r, h_l, h_r, d_l, d_r), or None

    def kernel(self, factor):
        """``factor [k, R]`` as a depthwise weight ``[R, 1, k, 1, 1]`` (k on this axis)."""
        shape = [factor.shape[1], 1, 1, 1, 1]
        shape[2 + self.axis] = factor.shape[0]
        return factor.t().reshape(shape)

    def pad(self, z):
        return z if self.extra is None else F.pad(z, self.extra)

    def forward(self, z, factor):
        return F.conv3d(self.pad(z), self.kernel(factor), None, self.stride, self.padding,
                        self.dilation, factor.shape[1])

    def backward(self, grad, z, factor, need_input, need_factor):
        """Gradients of ``forward(z, factor)`` in ``z`` and in ``factor`` (None where not
        needed)."""
        gz, gw, _ = torch.ops.aten.convolution_backward(
            grad, self.pad(z), self.kernel(factor), None, self.stride, self.padding,
            self.dilation, False, [0, 0, 0], factor.shape[1], [need_input, need_factor, False])
        if need_input and self.extra is not None:
            gz = F.pad(gz, [-p for p in self.extra])
        gfactor = gw.reshape(factor.shape[1], factor.shape[0]).t() if need_factor else None
        return gz, gfactor


def _axis_convs(stride, padding, dilation):
    convs = []
    for axis in range(3):
        left, right = padding[axis], padding[3 + axis]
        sym = min(left, right)
        extra = None
        if left != right:
            extra = [0] * 6
            extra[2 * (2 - axis)] = left - sym
            extra[2 * (2 - axis) + 1] = right - sym
        one = [1, 1, 1]
        st, pd, dl = list(one), [0, 0, 0], list(one)
        st[axis], pd[axis], dl[axis] = stride[axis], sym, dilation[axis]
        convs.append(_AxisConv(axis, st, pd, dl, extra))
    return convs


def _pointwise(factor):
    """``factor [C, R]`` as the weight ``[R, C, 1, 1, 1]`` of a 1×1×1 conv C -> R channels."""
    return factor.t().reshape(factor.shape[1], factor.shape[0], 1, 1, 1)


def _sequence(x, U_in, A, B, C, stride, padding, dilation):
    """``[z0, z1, z2, z3]``: after the U_in pointwise conv and after each 1-D conv."""
    zs = [F.conv3d(x, _pointwise(U_in))]
    for conv, factor in zip(_axis_convs(stride, padding, dilation), (A, B, C)):
        zs.append(conv.forward(zs[-1], factor))
    return zs


def cp_conv3d_torch(input, U_out, U_in, A, B, C, weights, bias, stride, padding, dilation):
    """The factored sequence with torch's convolutions; arguments as ``lk3d::cp_conv3d``
    (``input`` 5-D, ``padding`` six ints ``(d_l, h_l, w_l, d_r, h_r, w_r)``)."""
    z3 = _sequence(input, U_in, A, B, C, stride, padding, dilation)[-1]
    u_out = U_out if weights is None else U_out * weights
    return F.conv3d(z3, u_out.reshape(*u_out.shape, 1, 1, 1), bias)


def cp_conv3d_torch_backward(grad, input, U_out, U_in, A, B, C, weights, stride, padding,
                             dilation, output_mask):
    """Gradients of ``cp_conv3d_torch`` in (input, U_out, U_in, A, B, C, weights); entries whose
    ``output_mask`` is False come back as zeros. (The bias gradient is ``grad.sum((0, 2, 3,
    4))``.)"""
    need_x, need_uo, need_ui, need_a, need_b, need_c, need_w = output_mask
    zs = _sequence(input, U_in, A, B, C, stride, padding, dilation)
    u_out = U_out if weights is None else U_out * weights
    grads = [None] * 7
    if need_uo or need_w:
        g_uout = torch.einsum("no...,nr...->or", grad, zs[-1])
        grads[1] = g_uout if weights is None else g_uout * weights
        if weights is not None:
            grads[6] = (g_uout * U_out).sum(0)
    # How far back the chain must go: the earliest factor (or the input) asked for.
    need = [need_x or need_ui, need_a, need_b, need_c]
    if any(need):
        first = need.index(True)
        gz = F.conv3d(grad, u_out.t().reshape(*u_out.t().shape, 1, 1, 1))
        convs = _axis_convs(stride, padding, dilation)
        for step in (2, 1, 0):
            if step + 1 < first:
                break
            gz, gfactor = convs[step].backward(gz, zs[step], (A, B, C)[step], step >= first,
                                               output_mask[3 + step])
            grads[3 + step] = gfactor
        if first == 0:
            gx, gw, _ = torch.ops.aten.convolution_backward(
                gz, input, _pointwise(U_in), None, [1, 1, 1], [0, 0, 0], [1, 1, 1], False,
                [0, 0, 0], 1, [need_x, need_ui, False])
            grads[0] = gx
            if need_ui:
                grads[2] = gw.reshape(gw.shape[0], gw.shape[1]).t()
    like = (input, U_out, U_in, A, B, C, weights if weights is not None else U_out[0])
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)]


def cp_conv3d_dense(input, U_out, U_in, A, B, C, weights, bias, stride, padding, dilation):
    """``F.conv3d`` with the dense weight (aten); arguments as ``cp_conv3d_torch``."""
    u_out = U_out if weights is None else U_out * weights
    return _algos.aten_forward(input, dense_weight(u_out, U_in, A, B, C), bias, stride, padding,
                               dilation, 1)


def cp_conv3d_dense_backward(grad, input, U_out, U_in, A, B, C, weights, stride, padding,
                             dilation, output_mask):
    """Gradients of ``cp_conv3d_dense``, arguments and result as ``cp_conv3d_torch_backward``:
    the vector-Jacobian product of the same torch calls (``torch.func.vjp``), so every NaN and
    Inf lands where autograd through ``F.conv3d(input, factors.to_dense())`` puts it."""
    def dense(x, U_out, U_in, A, B, C, *weights):
        return cp_conv3d_dense(x, U_out, U_in, A, B, C, weights[0] if weights else None, None,
                               stride, padding, dilation)
    primals = (input, U_out, U_in, A, B, C) + (() if weights is None else (weights,))
    grads = list(torch.func.vjp(dense, *primals)[1](grad))
    like = (input, U_out, U_in, A, B, C, weights if weights is not None else U_out[0])
    grads += [None] * (7 - len(grads))
    return [g if g is not None and m else torch.zeros_like(t)
            for g, t, m in zip(grads, like, output_mask)]


def cp_conv3d_ref(input, factors, bias=None, **args):
    """Float64 reference on the CPU: ``F.conv3d`` with the reconstructed dense weight."""
    up = (lambda t: None if t is None else t.detach().to("cpu", torch.float64))
    return F.conv3d(up(input), up(factors.to_dense()), up(bias), **args)
