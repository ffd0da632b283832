"""The ``torch.library`` custom ops behind ``lk3d.conv3d``, with fake impls and autograd.

``lk3d::conv3d`` and its three backward ops (``conv3d_grad_input``, ``conv3d_grad_weight``,
``conv3d_grad_bias``) each run one of two implementations, picked per call outside any traced
graph (``torch.compile`` sees one node per op):

* the Triton kernels of ``lk3d.kernels.tiled`` for CUDA tensors in fp16/bf16/fp32, and for CPU
  tensors in fp16/fp32/fp64 when Triton runs in its interpreter (``TRITON_INTERPRET=1``: how the
  tests run the kernel code without a GPU);
* aten otherwise (CPU: oneDNN/native; CUDA float64: cuDNN), the fast torch-native path.

``LK3D_ALGO=aten`` or ``LK3D_ALGO=tiled`` forces one (``tiled`` where the kernels can run).
Padding is passed as six ints ``(d_l, h_l, w_l, d_r, h_r, w_r)`` so ``padding="same"`` with an even
kernel (asymmetric) needs no padded copy in the kernels. The output, and grad-input, are laid out
like the input (channels_last_3d stays channels_last_3d), as aten does.
Double backward is not supported (the backward ops have no autograd of their own).
"""
import math
import os
from typing import List, Optional

import torch
import torch.nn.functional as F

from lk3d.autotune.configs import Problem, default_config
from lk3d.kernels import HAS_TRITON, INTERPRETED, memory_format

if HAS_TRITON:
    from lk3d.kernels import tiled

_KERNEL_DTYPES = {
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
    # bf16 tl.dot is wrong in the interpreter (see CPU_FACTS); CPU bf16 goes to aten.
    "cpu": (torch.float16, torch.float32, torch.float64),
}


def use_kernels(t: torch.Tensor) -> bool:
    """Whether the Triton kernels serve a tensor like ``t`` (device, dtype, LK3D_ALGO)."""
    algo = os.environ.get("LK3D_ALGO", "").strip().lower()
    if algo not in ("", "auto", "aten", "tiled"):
        raise ValueError(f"LK3D_ALGO: expected 'auto', 'aten' or 'tiled', got {algo!r}")
    if algo == "aten" or not HAS_TRITON:
        return False
    if t.device.type == "cuda":
        return t.dtype in _KERNEL_DTYPES["cuda"]
    return t.device.type == "cpu" and INTERPRETED and t.dtype in _KERNEL_DTYPES["cpu"]


def _empty(shape, like, memory_format):
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)


def _split_pad(padding):
    return tuple(padding[:3]), tuple(padding[3:])


def _out_size(spatial, kernel, stride, padding, dilation):
    left, right = _split_pad(padding)
    return tuple((s + pl + pr - d * (k - 1) - 1) // st + 1 for s, k, st, pl, pr, d in
                 zip(spatial, kernel, stride, left, right, dilation))


def _allow_tf32():
    return bool(torch.backends.cudnn.allow_tf32)


def _aten_padded(x, padding):
    """aten takes symmetric padding only: pad asymmetric cases explicitly (zeros)."""
    left, right = _split_pad(padding)
    if left == right:
        return x, list(left)
    return F.pad(x, (left[2], right[2], left[1], right[1], left[0], right[0])), [0, 0, 0]


def _device_ctx(t):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else _nullctx()


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("lk3d::conv3d", mutates_args=())
def conv3d_op(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              stride: List[int], padding: List[int], dilation: List[int],
              groups: int) -> torch.Tensor:
    out_size = _out_size(input.shape[2:], weight.shape[2:], stride, padding, dilation)
    mf = memory_format(input)
    N, cout = input.shape[0], weight.shape[0]
    if not use_kernels(input):
        x, pad = _aten_padded(input, padding)
        y = F.conv3d(x, weight, bias, stride, pad, dilation, groups)
        return y.contiguous(memory_format=mf)
    if N == 0:
        return _empty((N, cout, *out_size), input, mf)
    left = _split_pad(padding)[0]
    taps = weight.shape[2] * weight.shape[3] * weight.shape[4]
    with _device_ctx(input):
        if weight.shape[1] == 1:  # depthwise, with channel multiplier cout / cin
            cfg = default_config(Problem("conv3d_dw", M=math.prod(out_size), taps=taps),
                                 input.device)
            return tiled.conv3d_dw_fwd(input, weight, bias, stride, left, dilation, out_size, cfg)
        cfg = default_config(Problem("conv3d_fwd", M=N * math.prod(out_size), KC=weight.shape[1],
                                     NC=cout // groups, taps=taps), input.device)
        return tiled.conv3d_fwd(input, weight, bias, stride, left, dilation, groups, out_size,
                                cfg, allow_tf32=_allow_tf32())


@conv3d_op.register_fake
def _(input, weight, bias, stride, padding, dilation, groups):
    out_size = _out_size(input.shape[2:], weight.shape[2:], stride, padding, dilation)
    return _empty((input.shape[0], weight.shape[0], *out_size), input, memory_format(input))


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("lk3d::conv3d_grad_input", mutates_args=())
def conv3d_grad_input_op(grad: torch.Tensor, weight: torch.Tensor, input_shape: List[int],
                         stride: List[int], padding: List[int], dilation: List[int],
                         groups: int) -> torch.Tensor:
    mf = memory_format(grad)
    if not use_kernels(grad):
        left, right = _split_pad(padding)
        padded = [input_shape[0], input_shape[1],
                  *(s + pl + pr for s, pl, pr in zip(input_shape[2:], left, right))]
        gx = torch.ops.aten.convolution_backward(
            grad, grad.new_empty(1).expand(padded), weight, None, stride, [0, 0, 0], dilation,
            False, [0, 0, 0], groups, [True, False, False])[0]
        gx = gx[:, :, left[0]:left[0] + input_shape[2], left[1]:left[1] + input_shape[3],
                left[2]:left[2] + input_shape[4]]
        return gx.contiguous(memory_format=mf)
    if math.prod(input_shape) == 0:
        return _empty(input_shape, grad, mf)
    left = _split_pad(padding)[0]
    taps = weight.shape[2] * weight.shape[3] * weight.shape[4]
    with _device_ctx(grad):
        if weight.shape[1] == 1:
            cfg = default_config(Problem("conv3d_dw", M=math.prod(input_shape[2:]), taps=taps),
                                 grad.device)
            return tiled.conv3d_dw_bwd_input(grad, weight, input_shape, stride, left, dilation,
                                             cfg)
        cfg = default_config(Problem("conv3d_fwd", M=math.prod(input_shape) // input_shape[1],
                                     KC=weight.shape[0] // groups, NC=weight.shape[1],
                                     taps=taps), grad.device)
        return tiled.conv3d_bwd_input(grad, weight, input_shape, stride, left, dilation, groups,
                                      cfg, allow_tf32=_allow_tf32())


@conv3d_grad_input_op.register_fake
def _(grad, weight, input_shape, stride, padding, dilation, groups):
    return _empty(input_shape, grad, memory_format(grad))


@torch.library.custom_op("lk3d::conv3d_grad_weight", mutates_args=())
def conv3d_grad_weight_op(grad: torch.Tensor, input: torch.Tensor, weight_shape: List[int],
                          stride: List[int], padding: List[int], dilation: List[int],
                          groups: int) -> torch.Tensor:
    if grad.numel() == 0:
        return grad.new_zeros(weight_shape)
    if not use_kernels(input):
        x, pad = _aten_padded(input, padding)
        return torch.ops.aten.convolution_backward(
            grad, x, grad.new_empty(1).expand(weight_shape), None, stride, pad, dilation, False,
            [0, 0, 0], groups, [False, True, False])[1].contiguous()
    left = _split_pad(padding)[0]
    cout, cig = weight_shape[0], weight_shape[1]
    taps = weight_shape[2] * weight_shape[3] * weight_shape[4]
    M = grad.numel() // cout
    with _device_ctx(input):
        if cig == 1:
            base = dict(kind="conv3d_dw_wgrad", M=M, taps=taps, partial=cout * taps)
            probe = default_config(Problem(**base), input.device)
            cfg = default_config(Problem(**base, programs=cout * -(-taps // probe["BLOCK_T"])),
                                 input.device)
            return tiled.conv3d_dw_bwd_weight(input, grad, weight_shape, stride, left, dilation,
                                              cfg)
        base = dict(kind="conv3d_wgrad", M=M, KC=cig, NC=cout // groups, taps=taps,
                    partial=cout * cig * taps)
        probe = default_config(Problem(**base), input.device)
        programs = (taps * groups * -(-(cout // groups) // probe["BLOCK_CO"])
                    * -(-cig // probe["BLOCK_CI"]))
        cfg = default_config(Problem(**base, programs=programs), input.device)
        return tiled.conv3d_bwd_weight(input, grad, weight_shape, stride, left, dilation, groups,
                                       cfg, allow_tf32=_allow_tf32())


@conv3d_grad_weight_op.register_fake
def _(grad, input, weight_shape, stride, padding, dilation, groups):
    return grad.new_empty(weight_shape)


@torch.library.custom_op("lk3d::conv3d_grad_bias", mutates_args=())
def conv3d_grad_bias_op(grad: torch.Tensor) -> torch.Tensor:
    if grad.numel() == 0 or not use_kernels(grad):
        return grad.sum(dim=(0, 2, 3, 4))
    with _device_ctx(grad):
        M = grad.numel() // grad.shape[1]
        cfg = default_config(Problem("bias_grad", M=M, programs=grad.shape[1], partial=1),
                             grad.device)
        return tiled.bias_grad(grad, cfg)


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
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = conv3d_grad_bias_op(grad)
    return gi, gw, gb, None, None, None, None


conv3d_op.register_autograd(_backward, setup_context=_setup_context)
