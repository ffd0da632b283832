"""The ``torch.library`` custom ops behind ``lk3d.conv3d``, with fake impls and autograd.

``lk3d::conv3d`` and its backward ops (``conv3d_grad_input``, ``conv3d_grad_weight``,
``conv3d_grad_bias``) each pick an algorithm per call — Triton ``tiled``, ``fft`` or ``aten``,
registered by ``lk3d._algos`` — through ``lk3d.autotune.select`` (forced by ``LK3D_ALGO``, cached per device,
measured under ``LK3D_AUTOTUNE=1`` / ``lk3d.autotune.tune()``, else modelled). The choice happens
where the op runs, outside any traced graph: ``torch.compile`` sees one node per op.
Under the Triton interpreter (``TRITON_INTERPRET=1``) CPU tensors run the kernels unless forced
otherwise: that is how the tests execute kernel code without a GPU.

Padding is passed as six ints ``(d_l, h_l, w_l, d_r, h_r, w_r)`` so ``padding="same"`` with an even
kernel (asymmetric) needs no padded copy in the kernels. The output, and grad-input, are laid out
like the input (channels_last_3d stays channels_last_3d), as aten does.

Double backward: each backward op has autograd of its own, written with the same ops (so it runs
on every algorithm and stays one node per op under ``torch.compile``). Grad-input and grad-weight
are bilinear, ``<grad, conv3d(x, w)>`` differentiated once, so differentiating them again only
swaps roles: grad-input ``(grad, w)`` gives ``conv3d(gg, w)`` for grad and ``grad_weight(grad,
gg)`` for w; grad-weight ``(grad, x)`` gives ``conv3d(x, gg)`` for grad and ``grad_input(grad,
gg)`` for x; grad-bias (a sum) broadcasts back. Any order of derivative follows.
"""
import math
from typing import List, Optional

import torch

from lk3d import _algos
from lk3d._algos import kernels_can_run
from lk3d._spec import empty, out_size
from lk3d.autotune import registry, select
from lk3d.kernels import INTERPRETED, memory_format


def _request(op, main, x_shape, w_shape, stride, padding, dilation, groups, size):
    """The plan cache key's parts, the planner's problem and the preferred algorithm of one pass
    (``size``: the output's spatial size, computed once per call)."""
    key = (main.dtype, x_shape, w_shape, stride, padding, dilation, groups)
    preferred = "tiled" if (INTERPRETED and main.device.type == "cpu") else None
    return key, (main, x_shape, w_shape, stride, padding, dilation, groups, tuple(size)), preferred


def plan(op, main, x_shape, w_shape, stride, padding, dilation, groups, size):
    """The ``select.Plan`` for one pass; ``main`` is the tensor the pass reads (device, dtype)."""
    key, problem, preferred = _request(op, main, x_shape, w_shape, stride, padding, dilation,
                                       groups, size)
    return select.plan(op, key, main.device, problem, preferred=preferred)


def _run(op, main, x_shape, w_shape, size, args, geometry):
    """Choose and run one pass: its one call of the planner; ``args`` lead the runner's
    arguments, ``geometry`` ends them."""
    key, problem, preferred = _request(op, main, x_shape, w_shape, *geometry, size)
    return select.execute(op, key, main.device, problem, (*args, *geometry), preferred)


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------

def _out_shape(input, weight, stride, padding, dilation):
    """The output's shape. An input without channels gives an output without channels (and no
    bias added), as F.conv3d does (its meta function says so: no input channel, no output
    channel)."""
    size = out_size(input.shape[2:], weight.shape[2:], stride, padding, dilation)
    return (input.shape[0], weight.shape[0] if input.shape[1] else 0, *size)


@torch.library.custom_op("lk3d::conv3d", mutates_args=())
def conv3d_op(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              stride: List[int], padding: List[int], dilation: List[int],
              groups: int) -> torch.Tensor:
    shape = _out_shape(input, weight, stride, padding, dilation)
    mf = memory_format(input)
    if math.prod(shape) == 0:
        return empty(shape, input, mf)
    y = _run("conv3d", input, list(input.shape), list(weight.shape), shape[2:],
             (input, weight, bias), (stride, padding, dilation, groups))
    return y.to(input.dtype).contiguous(memory_format=mf)


@conv3d_op.register_fake
def _(input, weight, bias, stride, padding, dilation, groups):
    return empty(_out_shape(input, weight, stride, padding, dilation), input, memory_format(input))


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("lk3d::conv3d_grad_input", mutates_args=())
def conv3d_grad_input_op(grad: torch.Tensor, weight: torch.Tensor, input_shape: List[int],
                         stride: List[int], padding: List[int], dilation: List[int],
                         groups: int) -> torch.Tensor:
    mf = memory_format(grad)
    if grad.numel() == 0:
        return empty(input_shape, grad, mf).zero_()
    gx = _run("conv3d_grad_input", grad, list(input_shape), list(weight.shape), grad.shape[2:],
              (grad, weight, list(input_shape)),
              (stride, padding, dilation, groups))
    return gx.to(grad.dtype).contiguous(memory_format=mf)


@conv3d_grad_input_op.register_fake
def _(grad, weight, input_shape, stride, padding, dilation, groups):
    return empty(input_shape, grad, memory_format(grad))


@torch.library.custom_op("lk3d::conv3d_grad_weight", mutates_args=())
def conv3d_grad_weight_op(grad: torch.Tensor, input: torch.Tensor, weight_shape: List[int],
                          stride: List[int], padding: List[int], dilation: List[int],
                          groups: int) -> torch.Tensor:
    if grad.numel() == 0:
        return grad.new_zeros(weight_shape)
    gw = _run("conv3d_grad_weight", input, list(input.shape), list(weight_shape), grad.shape[2:],
              (grad, input, list(weight_shape)),
              (stride, padding, dilation, groups))
    return gw.to(grad.dtype).contiguous()


@conv3d_grad_weight_op.register_fake
def _(grad, input, weight_shape, stride, padding, dilation, groups):
    return grad.new_empty(weight_shape)


@torch.library.custom_op("lk3d::conv3d_grad_bias", mutates_args=())
def conv3d_grad_bias_op(grad: torch.Tensor) -> torch.Tensor:
    if grad.numel() == 0 or not kernels_can_run(grad) or select.forced_algo() in ("fft", "aten"):
        return grad.sum(dim=(0, 2, 3, 4))
    return _algos.tiled_grad_bias(grad)


@conv3d_grad_bias_op.register_fake
def _(grad):
    return grad.new_empty(grad.shape[1])


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None
    ctx.args = (list(stride), list(padding), list(dilation), groups)


def _backward(ctx, grad):
    input, weight = ctx.saved_tensors
    gi = gw = gb = None
    if ctx.needs_input_grad[0]:
        gi = conv3d_grad_input_op(grad, weight, list(input.shape), *ctx.args)
    if ctx.needs_input_grad[1]:
        gw = conv3d_grad_weight_op(grad, input, list(weight.shape), *ctx.args)
    if ctx.has_bias and ctx.needs_input_grad[2]:  # zeros where the output had no channels
        gb = conv3d_grad_bias_op(grad) if input.shape[1] else grad.new_zeros(weight.shape[0])
    return gi, gw, gb, None, None, None, None


conv3d_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# double backward: the backward ops' own autograd
# ---------------------------------------------------------------------------------------------

def _setup_context_grad(ctx, inputs, output):
    """Grad-input ``(grad, weight, ...)`` and grad-weight ``(grad, input, ...)`` alike: both
    tensors saved, the geometry kept."""
    ctx.save_for_backward(*inputs[:2])
    ctx.args = tuple(list(a) for a in inputs[3:6]) + (inputs[6],)


def _grad_input_backward(ctx, gg):
    # grad_input(grad, w) = d/dx <grad, conv3d(x, w)>: gg takes the place of x.
    grad, weight = ctx.saved_tensors
    g_grad = conv3d_op(gg, weight, None, *ctx.args) if ctx.needs_input_grad[0] else None
    g_weight = (conv3d_grad_weight_op(grad, gg, list(weight.shape), *ctx.args)
                if ctx.needs_input_grad[1] else None)
    return g_grad, g_weight, None, None, None, None, None


def _grad_weight_backward(ctx, gg):
    # grad_weight(grad, x) = d/dw <grad, conv3d(x, w)>: gg takes the place of w.
    grad, input = ctx.saved_tensors
    g_grad = conv3d_op(input, gg, None, *ctx.args) if ctx.needs_input_grad[0] else None
    g_input = (conv3d_grad_input_op(grad, gg, list(input.shape), *ctx.args)
               if ctx.needs_input_grad[1] else None)
    return g_grad, g_input, None, None, None, None, None


def _setup_context_grad_bias(ctx, inputs, output):
    ctx.shape = inputs[0].shape


def _grad_bias_backward(ctx, gg):
    return gg.reshape(1, -1, 1, 1, 1).expand(ctx.shape)


conv3d_grad_input_op.register_autograd(_grad_input_backward, setup_context=_setup_context_grad)
conv3d_grad_weight_op.register_autograd(_grad_weight_backward,
                                        setup_context=_setup_context_grad)
conv3d_grad_bias_op.register_autograd(_grad_bias_backward,
                                      setup_context=_setup_context_grad_bias)
