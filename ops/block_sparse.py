"""Block-sparse convolution: ``lk3d.block_sparse_conv3d`` and the ``lk3d::block_sparse_conv3d``
ops, on an ``lk3d.BlockSparseWeight`` (``lk3d.block_sparse_weight``: the layout, the builders and
the checks of the weight format).

Layout: NCDHW or channels_last_3d input (the output keeps the input's layout), batched or
unbatched. Supported: everything ``lk3d.conv3d`` takes (stride, dilation, padding as ints,
3-tuples, ``"same"`` with even kernels, ``"valid"``; groups, depthwise with a channel
multiplier), with exactly ``F.conv3d(input, weight.to_dense(), bias, ...)``'s result. With
groups > 1 and ``Cin/g > 1`` a block row may not span two groups (``(Cout/g) % bo == 0``); a
depthwise weight (``Cin/g == 1``) takes any ``bo`` dividing ``Cout``.

Where it runs: the Triton kernels of ``lk3d.kernels.block_sparse`` when they are there and can
serve the tensors (``_forward``, ``_grad_input``, ``_grad_values``), else the torch path, by one
of two routes with the same result, whichever a cost model says is cheaper (``explain`` tells
which; ``ROUTE`` forces one): the dense route runs the dense convolution of ``to_dense()`` with
lk3d.conv3d's aten or FFT algorithm (oneDNN's dense kernels beat per-block torch products on
small channel blocks at all but low densities), the sparse route
(``block_sparse_conv3d_torch``, in ``lk3d.block_sparse_ref``) works in proportion to the stored
blocks: ``nnz·bo·bi·bd·bh·bw`` multiply-adds per output voxel (``block_sparse_conv3d_macs``), the
dense cost times the block density, and as many for each backward pass. The pattern (``row_ptr``,
``col``) is fixed within a step: it gets no gradient. Double backward works on every path: the
backward op's own autograd is written with the forward and backward ops (see "Double backward"
below).

Non-finite values: in ``F.conv3d(input, weight.to_dense())`` a NaN or Inf of the input meets the
zeros of the blocks that are not stored, and ``Inf · 0`` is NaN; the kernels and the sparse route
skip those blocks, so they would leave finite, or infinite, values where the dense convolution has
NaN (likewise for a NaN or Inf of the output gradient in grad-input). A forward whose input or
stored values, or a grad-input whose output gradient or stored values, are not all finite
(``lk3d._algos.finite``: one sum each) therefore runs the dense convolution of ``to_dense()`` by
aten, with F.conv3d's NaN/Inf placement. Grad-values needs no such step: every route sums the
same products there.
"""
from typing import List, Optional

import torch

from lk3d import _algos
from lk3d._spec import (Conv3dSpec, batched, check_group_channels, check_same, check_tensor,
                        empty, geometry, out_size, positive_int, triple)
from lk3d.block_sparse_ref import (block_sparse_conv3d_torch, block_sparse_conv3d_torch_backward,
                                   sparse_route_macs, sparse_route_ms)
from lk3d.block_sparse_weight import (BlockSparseWeight, check_block_shape, dense_weight,
                                      stored_blocks)
from lk3d.kernels import memory_format

try:
    from lk3d import _block_sparse_launch as _kernels
except ImportError:  # no Triton here, or the kernels are not written yet: the torch path serves
    _kernels = None

__all__ = ["BlockSparseWeight", "block_sparse_conv3d", "block_sparse_conv3d_torch",
           "block_sparse_conv3d_macs", "check_block_sparse_conv3d", "explain"]

# Set to False to run the torch path even where the Triton kernels could serve.
USE_KERNELS = True


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------

def check_block_sparse_conv3d(input, weight_shape, block_shape, values, bias, stride, padding,
                              dilation, groups) -> Conv3dSpec:
    """Check the arguments of ``block_sparse_conv3d`` (``input`` 5-D, the weight given by its
    parts) and return the normalised spec."""
    check_tensor("input", input, (5,))
    check_same("weight", values, input)
    cout = weight_shape[0]
    if bias is not None:
        check_tensor("bias", bias, (1,))
        check_same("bias", bias, input)
        if tuple(bias.shape) != (cout,):
            raise ValueError(f"bias: expected shape ({cout},) to match weight's output channels, "
                             f"got {tuple(bias.shape)}")
    groups = positive_int("groups", groups)
    stride = triple("stride", stride)
    dilation = triple("dilation", dilation)
    check_group_channels(input.shape[1], weight_shape, groups)
    check_block_shape(weight_shape, block_shape, groups)
    return geometry(input.shape[2:], tuple(weight_shape[2:]), stride, padding, dilation, groups)


def _check_weight(weight):
    if not isinstance(weight, BlockSparseWeight):
        raise TypeError(f"weight: expected an lk3d.BlockSparseWeight, got "
                        f"{type(weight).__name__}")
    return weight


def _checked(input, weight, bias, stride, padding, dilation, groups):
    """``(input with a batch dim, whether it had none, the normalised spec)`` of a call."""
    x, unbatched = batched(input)
    return x, unbatched, check_block_sparse_conv3d(x, weight.shape, weight.block_shape,
                                                   weight.values, bias, stride, padding,
                                                   dilation, groups)


def block_sparse_conv3d_macs(input, weight, stride=1, padding=0, dilation=1, groups=1) -> int:
    """Multiply-adds the torch path's sparse route performs for ``block_sparse_conv3d(input,
    weight, None, stride, padding, dilation, groups)``: ``bo·bi·bd·bh·bw`` per stored block and
    output voxel, counted over the grouped convs it runs. Its grad-input and grad-values passes
    perform as many each."""
    x, _, spec = _checked(input, _check_weight(weight), None, stride, padding, dilation, groups)
    return sparse_route_macs(x, spec.padding, spec.out_size, weight.row_ptr, weight.col,
                             weight.shape, weight.block_shape, spec.groups)


# ---------------------------------------------------------------------------------------------
# the torch path's route: the stored blocks, or the dense convolution of the same kernel
# ---------------------------------------------------------------------------------------------

# Where the Triton kernels do not serve, a call runs one of two routes with the same result:
# "sparse" (block_sparse_conv3d_torch, work ∝ the stored blocks) or "dense" (the dense
# convolution of ``to_dense()`` by lk3d.conv3d's aten or FFT algorithm, whichever its cost
# model prefers). Small blocks cost the sparse route far more per multiply-add than oneDNN's
# dense kernels (gathers and scatters of channel slices, small batched products), so it wins
# only below some density; ``_route`` picks the cheaper by the two cost models
# (``lk3d.block_sparse_ref.sparse_route_ms`` and lk3d.conv3d's ``_algos.model_ms``).

# "auto" (the cost model), or "sparse" / "dense" to force a route (the tests force "sparse").
ROUTE = "auto"


def _dense_algo(input, weight_shape, stride, padding, dilation, groups):
    """``(algo, ms)``: lk3d.conv3d's modelled-fastest non-Triton algorithm for the dense
    convolution of the same kernel."""
    times = {a: _algos.model_ms(a, list(input.shape), list(weight_shape), stride, padding,
                                dilation, groups, input.dtype, input.device)
             for a in _algos.candidates(input) if a != "tiled"}
    algo = min(times, key=times.get)
    return algo, times[algo]


def _route(input, row_ptr, col, weight_shape, block_shape, stride, padding, dilation, groups):
    """``(route, dense algo or None, modelled ms per route)`` of a torch-path call (see
    ``ROUTE``)."""
    if ROUTE not in ("auto", "sparse", "dense"):
        raise ValueError(f"lk3d.block_sparse.ROUTE: expected 'auto', 'sparse' or 'dense', got "
                         f"{ROUTE!r}")
    times, algo = {}, None
    if ROUTE != "dense":
        times["sparse"] = sparse_route_ms(input, row_ptr, col, weight_shape, block_shape, stride,
                                          padding, dilation, groups)
    if ROUTE != "sparse":
        algo, times["dense"] = _dense_algo(input, weight_shape, stride, padding, dilation,
                                           groups)
    route = min(times, key=times.get)
    return route, algo if route == "dense" else None, times


def explain(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> dict:
    """How ``block_sparse_conv3d(input, weight, ...)`` would run here: ``{"path": "kernels"}``
    where the Triton kernels serve, else ``{"path": "torch", "route": "sparse" | "dense",
    "algo": the dense route's algorithm or None, "times_ms": modelled ms per route}``."""
    x, _, spec = _checked(input, _check_weight(weight), bias, stride, padding, dilation, groups)
    if _launcher("block_sparse_fwd", x) is not None:
        return dict(path="kernels")
    route, algo, times = _route(x, weight.row_ptr, weight.col, weight.shape, weight.block_shape,
                                list(spec.stride), list(spec.padding), list(spec.dilation),
                                spec.groups)
    return dict(path="torch", route=route, algo=algo, times_ms=times)


# ---------------------------------------------------------------------------------------------
# the custom ops
# ---------------------------------------------------------------------------------------------

def _launcher(name, t):
    """The Triton launcher ``name`` of ``lk3d.kernels.block_sparse`` (with its config, through
    ``lk3d._block_sparse_launch``) if it exists and can serve tensors like ``t``, else None."""
    if not USE_KERNELS or _kernels is None or not _algos.kernels_can_run(t):
        return None
    return getattr(_kernels, name, None)


def _forward(input, values, row_ptr, col, bias, weight_shape, block_shape, stride, padding,
             dilation, groups):
    if not _algos.finite(input, values):  # see "Non-finite values" in the module docstring
        w = dense_weight(values, row_ptr, col, weight_shape, block_shape)
        return _algos.aten_forward(input, w, bias, stride, padding, dilation, groups)
    run = _launcher("block_sparse_fwd", input)
    if run is not None:
        return run(input, values, row_ptr, col, weight_shape, block_shape, bias, stride,
                   padding, dilation, groups)
    route, algo, _ = _route(input, row_ptr, col, weight_shape, block_shape, stride, padding,
                            dilation, groups)
    if route == "dense":
        w = dense_weight(values, row_ptr, col, weight_shape, block_shape)
        return _algos.FORWARD[algo](input, w, bias, stride, padding, dilation, groups)
    return block_sparse_conv3d_torch(input, values, row_ptr, col, bias, weight_shape,
                                     block_shape, stride, padding, dilation, groups)


def _grad_input(grad, values, row_ptr, col, weight_shape, block_shape, input, stride, padding,
                dilation, groups):
    if not _algos.finite(grad, values):
        w = dense_weight(values, row_ptr, col, weight_shape, block_shape)
        return _algos.aten_grad_input(grad, w, list(input.shape), stride, padding, dilation,
                                      groups)
    run = _launcher("block_sparse_bwd_input", grad)
    if run is not None:
        return run(grad, values, row_ptr, col, weight_shape, block_shape, list(input.shape),
                   stride, padding, dilation, groups)
    route, algo, _ = _route(input, row_ptr, col, weight_shape, block_shape, stride, padding,
                            dilation, groups)
    if route == "dense":
        w = dense_weight(values, row_ptr, col, weight_shape, block_shape)
        return _algos.GRAD_INPUT[algo](grad, w, list(input.shape), stride, padding, dilation,
                                       groups)
    return block_sparse_conv3d_torch_backward(grad, input, values, row_ptr, col, weight_shape,
                                              block_shape, stride, padding, dilation, groups,
                                              need_values=False)[0]


def _grad_values(grad, input, values, row_ptr, col, weight_shape, block_shape, stride, padding,
                 dilation, groups):
    run = _launcher("block_sparse_bwd_values", grad)
    if run is not None:
        return run(grad, input, values, row_ptr, col, weight_shape, block_shape, stride, padding,
                   dilation, groups)
    route, algo, _ = _route(input, row_ptr, col, weight_shape, block_shape, stride, padding,
                            dilation, groups)
    if route == "dense":
        gw = _algos.GRAD_WEIGHT[algo](grad, input, list(weight_shape), stride, padding, dilation,
                                      groups)
        return stored_blocks(gw, row_ptr, col, block_shape)
    return block_sparse_conv3d_torch_backward(grad, input, values, row_ptr, col, weight_shape,
                                              block_shape, stride, padding, dilation, groups,
                                              need_input=False)[1]


@torch.library.custom_op("lk3d::block_sparse_conv3d", mutates_args=())
def block_sparse_conv3d_op(input: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor,
                           col: torch.Tensor, bias: Optional[torch.Tensor],
                           weight_shape: List[int], block_shape: List[int], stride: List[int],
                           padding: List[int], dilation: List[int],
                           groups: int) -> torch.Tensor:
    size = out_size(input.shape[2:], weight_shape[2:], stride, padding, dilation)
    mf = memory_format(input)
    if input.shape[0] == 0:
        return empty((0, weight_shape[0], *size), input, mf)
    y = _forward(input, values, row_ptr, col, bias, list(weight_shape), list(block_shape),
                 list(stride), list(padding), list(dilation), groups)
    return y.to(input.dtype).contiguous(memory_format=mf)


@block_sparse_conv3d_op.register_fake
def _(input, values, row_ptr, col, bias, weight_shape, block_shape, stride, padding, dilation,
      groups):
    size = out_size(input.shape[2:], weight_shape[2:], stride, padding, dilation)
    return empty((input.shape[0], weight_shape[0], *size), input, memory_format(input))


@torch.library.custom_op("lk3d::block_sparse_conv3d_backward", mutates_args=())
def block_sparse_conv3d_backward_op(grad: torch.Tensor, input: torch.Tensor,
                                    values: torch.Tensor, row_ptr: torch.Tensor,
                                    col: torch.Tensor, weight_shape: List[int],
                                    block_shape: List[int], stride: List[int],
                                    padding: List[int], dilation: List[int], groups: int,
                                    output_mask: List[bool]) -> List[torch.Tensor]:
    """``[grad_input, grad_values]``; an entry whose ``output_mask`` is False is zeros."""
    mf = memory_format(input)
    gx = gv = None
    if grad.numel() and values.shape[0]:
        args = (list(weight_shape), list(block_shape), list(stride), list(padding),
                list(dilation), groups)
        if output_mask[0]:
            gx = _grad_input(grad, values, row_ptr, col, args[0], args[1], input, *args[2:])
        if output_mask[1]:
            gv = _grad_values(grad, input, values, row_ptr, col, *args)
    gx = torch.zeros_like(input, memory_format=mf) if gx is None else gx
    gv = torch.zeros_like(values) if gv is None else gv
    return [gx.to(input.dtype).contiguous(memory_format=mf), gv.to(values.dtype).contiguous()]


@block_sparse_conv3d_backward_op.register_fake
def _(grad, input, values, row_ptr, col, weight_shape, block_shape, stride, padding, dilation,
      groups, output_mask):
    return [empty(input.shape, input, memory_format(input)), empty(values.shape, values)]


def _setup_context(ctx, inputs, output):
    (input, values, row_ptr, col, bias, weight_shape, block_shape, stride, padding, dilation,
     groups) = inputs
    ctx.save_for_backward(input, values, row_ptr, col)
    ctx.has_bias = bias is not None
    ctx.args = (list(weight_shape), list(block_shape), list(stride), list(padding),
                list(dilation), groups)


def _backward(ctx, grad):
    input, values, row_ptr, col = ctx.saved_tensors
    needs = ctx.needs_input_grad
    gx = gv = gb = None
    if needs[0] or needs[1]:
        gx, gv = block_sparse_conv3d_backward_op(grad, input, values, row_ptr, col, *ctx.args,
                                                 [needs[0], needs[1]])
        gx, gv = (gx if needs[0] else None), (gv if needs[1] else None)
    if ctx.has_bias and needs[4]:
        gb = grad.sum(dim=(0, 2, 3, 4))
    return gx, gv, None, None, gb, None, None, None, None, None, None


block_sparse_conv3d_op.register_autograd(_backward, setup_context=_setup_context)


# Double backward. The backward op is the gradient of <grad, conv(x, values)>, linear in grad, x
# and values; cotangents (v_x, v_values) of it give that product's derivative along them,
# <grad, conv(v_x, values) + conv(x, v_values)>: its gradient in grad is that sum, in x the
# grad-input with v_values as the blocks, in values the grad-values with v_x as the input. The
# cotangent of an entry the backward op did not compute (output_mask False: zeros) does not count.

def _setup_context_backward(ctx, inputs, output):
    grad, input, values, row_ptr, col, *args, mask = inputs
    ctx.save_for_backward(grad, input, values, row_ptr, col)
    ctx.args = tuple(list(a) for a in args[:-1]) + (args[-1],)
    ctx.mask = [bool(m) for m in mask]
    ctx.set_materialize_grads(False)  # an unused gradient need not cost a convolution


def _backward_backward(ctx, gg):
    grad, x, values, row_ptr, col = ctx.saved_tensors
    v_x, v_values = (g if m else None for g, m in zip(gg, ctx.mask))
    needs = ctx.needs_input_grad
    g_grad = g_x = g_values = None
    if needs[0]:
        terms = [block_sparse_conv3d_op(a, b, row_ptr, col, None, *ctx.args)
                 for a, b in ((v_x, values), (x, v_values)) if a is not None and b is not None]
        g_grad = sum(terms[1:], terms[0]) if terms else None
    if needs[1] and v_values is not None:
        g_x = block_sparse_conv3d_backward_op(grad, x, v_values, row_ptr, col, *ctx.args,
                                              [True, False])[0]
    if needs[2] and v_x is not None:
        g_values = block_sparse_conv3d_backward_op(grad, v_x, values, row_ptr, col, *ctx.args,
                                                   [False, True])[1]
    return g_grad, g_x, g_values, *[None] * 9


block_sparse_conv3d_backward_op.register_autograd(_backward_backward,
                                                  setup_context=_setup_context_backward)


# ---------------------------------------------------------------------------------------------
# the functional
# ---------------------------------------------------------------------------------------------

def block_sparse_conv3d_parts(input, shape, block_shape, values, row_ptr, col, bias, stride,
                              padding, dilation, groups):
    """``block_sparse_conv3d`` on a weight given by its parts (a pattern already checked, as a
    ``BlockSparseWeight`` checks it; ``lk3d.nn.BlockSparseConv3d`` holds its weight so)."""
    input, unbatched = batched(input)
    spec = check_block_sparse_conv3d(input, shape, block_shape, values, bias, stride, padding,
                                     dilation, groups)
    out = block_sparse_conv3d_op(input, values, row_ptr, col, bias, list(shape),
                                 list(block_shape), list(spec.stride), spec.padding,
                                 list(spec.dilation), spec.groups)
    return out.squeeze(0) if unbatched else out


def block_sparse_conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """3D convolution with a block-sparse weight: ``F.conv3d(input, weight.to_dense(), bias,
    stride, padding, dilation, groups)`` at a cost proportional to the stored blocks.

    ``input`` is ``[N, Cin, D, H, W]`` or unbatched ``[Cin, D, H, W]``; ``weight`` an
    ``lk3d.BlockSparseWeight`` of the input's dtype and device with ``shape[1] = Cin / groups``;
    ``stride``, ``dilation`` and ``padding`` as ``lk3d.conv3d`` takes them. Differentiable in the
    input, ``weight.values`` and the bias, twice and more (double backward); one
    ``lk3d::block_sparse_conv3d`` node under ``torch.compile``.
    """
    _check_weight(weight)
    return block_sparse_conv3d_parts(input, weight.shape, weight.block_shape, weight.values,
                                     weight.row_ptr, weight.col, bias, stride, padding, dilation,
                                     groups)
