"""Block-sparse convolution: ``lk3d.block_sparse_conv3d`` and the ``lk3d::block_sparse_conv3d``
ops, on an ``lk3d.BlockSparseWeight`` (``lk3d.block_sparse_weight``: the layout, the builders and
the checks of the weight format).

Layout: NCDHW or channels_last_3d input (the output keeps the input's layout), batched or
unbatched. Supported: everything ``lk3d.conv3d`` takes (stride, dilation, padding as ints,
3-tuples, ``"same"`` with even kernels, ``"valid"``; groups, depthwise with a channel
multiplier), with exactly ``F.conv3d(input, weight.to_dense(), bias, ...)``'s result. With
groups > 1 and ``Cin/g > 1`` a block row may not span two groups (``(Cout/g) % bo == 0``); a
depthwise weight (``Cin/g == 1``) takes any ``bo`` dividing ``Cout``.

Where it runs. Each pass (``lk3d::block_sparse_conv3d``, and grad-input and grad-values inside
``lk3d::block_sparse_conv3d_backward``) picks, per call, one of two routes with the same result
through ``lk3d.autotune.select``, as ``lk3d.conv3d`` picks its algorithm (the planner's ops
``block_sparse_conv3d``, ``block_sparse_conv3d_grad_input``, ``block_sparse_conv3d_grad_values``;
``explain`` and ``plans`` show the choice):

    sparse   work in proportion to the stored blocks, ``nnz·bo·bi·bd·bh·bw`` multiply-adds per
             output voxel (``block_sparse_conv3d_macs``; the dense cost times the block density),
             and as many for each backward pass: the Triton kernels of
             ``lk3d.kernels.block_sparse`` where they serve the tensors (``USE_KERNELS`` and
             ``_algos.kernels_can_run``: CUDA fp16/bf16/fp32; CPU under the interpreter, where
             this route is preferred unless one is forced), else per-block torch products
             (``block_sparse_conv3d_torch``, in ``lk3d.block_sparse_ref``).
    dense    the dense convolution of ``to_dense()`` with lk3d.conv3d's aten or FFT algorithm
             (oneDNN's dense kernels beat per-block torch products on small channel blocks at all
             but low densities; on CUDA, cuDNN beats the kernels' padded 16-wide channel tiles on
             small blocks).

``LK3D_ALGO=sparse|dense`` forces a route, and so does ``lk3d.block_sparse.ROUTE = "sparse" |
"dense"`` (``"auto"``, the default, forces nothing; where set it takes LK3D_ALGO's place); a
cached or measured plan (``LK3D_AUTOTUNE=1``, ``lk3d.autotune.tune()``, also over the kernels'
launch configs) wins over the cost models. The pattern (``row_ptr``, ``col``) is fixed within a
step: it gets no gradient. Double backward works on every route: the backward op's own autograd
is written with the forward and backward ops (see "Double backward" below).

Non-finite values: in ``F.conv3d(input, weight.to_dense())`` a NaN or Inf of the input meets the
zeros of the blocks that are not stored, and ``Inf · 0`` is NaN; the kernels and the sparse route
skip those blocks, so they would leave finite, or infinite, values where the dense convolution has
NaN (likewise for a NaN or Inf of the output gradient in grad-input). A forward whose input or
stored values, or a grad-input whose output gradient or stored values, are not all finite
(``lk3d._algos.finite``: one sum each) therefore runs the dense convolution of ``to_dense()`` by
aten, with F.conv3d's NaN/Inf placement. Grad-values needs no such step: every route sums the
same products there.
"""
from functools import partial
from typing import List, Optional

import torch

from lk3d import _algos
from lk3d import _block_sparse_launch as launch
from lk3d._spec import (Conv3dSpec, batched, check_group_channels, check_same, check_tensor,
                        empty, geometry, out_size, positive_int, triple)
from lk3d.autotune import registry, select
from lk3d.block_sparse_ref import (block_sparse_conv3d_torch, block_sparse_conv3d_torch_backward,
                                   sparse_route_macs, sparse_route_ms)
from lk3d.block_sparse_weight import (BlockSparseWeight, check_block_shape, dense_weight,
                                      stored_blocks)
from lk3d.kernels import INTERPRETED, memory_format

__all__ = ["BlockSparseWeight", "block_sparse_conv3d", "block_sparse_conv3d_torch",
           "block_sparse_conv3d_macs", "check_block_sparse_conv3d", "explain", "plans"]

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
# the routes: two algorithms of each pass, chosen by lk3d.autotune.select
# ---------------------------------------------------------------------------------------------

# Each pass (forward, grad-input, grad-values) is an op of the planner with two algorithms, its
# routes: "sparse", work in proportion to the stored blocks (the Triton kernels where they serve
# the tensors, else block_sparse_conv3d_torch), and "dense", the dense convolution of
# ``to_dense()`` by lk3d.conv3d's aten or FFT algorithm (whichever its cost model prefers,
# ``_dense_algo``). The plan comes as for lk3d.conv3d: forced (``ROUTE``, else LK3D_ALGO), cached,
# measured (LK3D_AUTOTUNE=1, lk3d.autotune.tune()) or modelled. Small blocks cost the torch route
# far more per multiply-add than oneDNN's dense kernels (gathers and scatters of channel slices,
# small batched products), and the gather kernels on CUDA more than the dense kernels (a gather
# per element, channel tiles padded to 16), so "sparse" wins only below some density; the
# tensor-descriptor kernel (forward and stride-1 grad-input of 16..128-channel blocks) runs near
# the dense kernel's rate per stored FLOP, so there "sparse" wins below about full density. The
# models:
# ``lk3d.block_sparse_ref.sparse_route_ms`` for the torch route,
# ``lk3d._block_sparse_launch.kernels_ms`` for the kernels, lk3d.conv3d's ``_algos.model_ms`` for
# "dense". Under the Triton interpreter the kernels, where they serve, are preferred (they are
# what the tests check). Each pass's problem is ``(pass, input, row_ptr, col, weight_shape,
# block_shape, stride, padding, dilation, groups, serve)``, ``serve`` saying whether the kernels
# take the pass's tensors.

OPS = {"forward": "block_sparse_conv3d", "grad_input": "block_sparse_conv3d_grad_input",
       "grad_values": "block_sparse_conv3d_grad_values"}

# Forces a route of every pass: "auto" (no forcing), "sparse" or "dense". It is the planner's own
# forcing, as LK3D_ALGO=sparse|dense is, and takes its place for block-sparse calls.
ROUTE = "auto"


def _serve(t):
    """Whether the Triton kernels serve a pass reading ``t``: ``USE_KERNELS`` on, ``t`` of a device
    and dtype they take (``lk3d._algos.kernels_can_run``)."""
    return USE_KERNELS and _algos.kernels_can_run(t)


def _dense_algo(input, weight_shape, stride, padding, dilation, groups):
    """``(algo, ms)``: lk3d.conv3d's modelled-fastest non-Triton algorithm for the dense
    convolution of the same kernel."""
    times = {a: _algos.model_ms(a, list(input.shape), list(weight_shape), stride, padding,
                                dilation, groups, input.dtype, input.device)
             for a in _algos.candidates(input) if a != "tiled"}
    algo = min(times, key=times.get)
    return algo, times[algo]


def _forced():
    """``(route, "lk3d.block_sparse.ROUTE")`` where ``ROUTE`` forces one, else None."""
    routes = [a.name for a in registry.algorithms(OPS["forward"])]
    if ROUTE not in ("auto", *routes):
        raise ValueError(f"lk3d.block_sparse.ROUTE: expected 'auto' or one of {routes}, got "
                         f"{ROUTE!r}")
    return None if ROUTE == "auto" else (ROUTE, "lk3d.block_sparse.ROUTE")


def _request(pass_, input, row_ptr, col, weight_shape, block_shape, stride, padding, dilation,
             groups, serve):
    """The plan cache key's parts, the planner's problem and the preferred route of pass ``pass_``
    (a key of ``OPS``). The key adds to lk3d.conv3d's the block shape, the stored blocks and
    whether the kernels serve."""
    key = (input.dtype, list(input.shape), weight_shape, stride, padding, dilation, groups,
           f"|b{'x'.join(map(str, block_shape))}|nnz{col.shape[0]}|",
           "kernels" if serve else "torch")
    preferred = "sparse" if serve and INTERPRETED and input.device.type == "cpu" else None
    problem = (pass_, input, row_ptr, col, weight_shape, block_shape, stride, padding, dilation,
               groups, serve)
    return key, problem, preferred


def _plan(pass_, *problem):
    """The ``select.Plan`` of pass ``pass_``; ``problem`` as ``_request`` takes it after the
    pass."""
    key, problem, preferred = _request(pass_, *problem)
    return select.plan(OPS[pass_], key, problem[1].device, problem, preferred=preferred,
                       forced=_forced())


def _run(pass_, main, args, problem):
    """Choose the route of pass ``pass_`` (its tensors read ``main``) and run it on ``args``, the
    runners' arguments; ``problem``: ``(input, row_ptr, col, weight_shape, block_shape, stride,
    padding, dilation, groups)``."""
    key, problem, preferred = _request(pass_, *problem, _serve(main))
    return select.execute(OPS[pass_], key, problem[1].device, problem, args, preferred,
                          _forced())


def _sparse_ms(pass_, input, row_ptr, col, weight_shape, block_shape, stride, padding, dilation,
               groups, serve):
    if serve:
        return launch.kernels_ms(pass_, input, col.shape[0], weight_shape, block_shape, stride,
                                 padding, dilation, groups)
    return sparse_route_ms(input, row_ptr, col, weight_shape, block_shape, stride, padding,
                           dilation, groups)


def _dense_ms(pass_, input, row_ptr, col, weight_shape, block_shape, stride, padding, dilation,
              groups, serve):
    return _dense_algo(input, weight_shape, stride, padding, dilation, groups)[1]


def _sparse_configs(pass_, input, row_ptr, col, weight_shape, block_shape, stride, padding,
                    dilation, groups, serve):
    if not serve:
        return None
    return launch.launch_configs(pass_, input, col.shape[0], weight_shape, block_shape, stride,
                                 padding, dilation)


def _always(*problem):
    return True


# the runners, by pass and route

def _sparse_forward(input, values, row_ptr, col, bias, weight_shape, block_shape, stride, padding,
                    dilation, groups, config=None):
    if _serve(input):
        return launch.block_sparse_fwd(input, values, row_ptr, col, weight_shape, block_shape,
                                       bias, stride, padding, dilation, groups, config)
    return block_sparse_conv3d_torch(input, values, row_ptr, col, bias, weight_shape,
                                     block_shape, stride, padding, dilation, groups)


def _dense_forward(input, values, row_ptr, col, bias, weight_shape, block_shape, stride, padding,
                   dilation, groups):
    algo = _dense_algo(input, weight_shape, stride, padding, dilation, groups)[0]
    w = dense_weight(values, row_ptr, col, weight_shape, block_shape)
    return _algos.FORWARD[algo](input, w, bias, stride, padding, dilation, groups)


def _sparse_backward(pass_, grad, input, values, row_ptr, col, weight_shape, block_shape, stride,
                     padding, dilation, groups, config=None):
    """The sparse route of backward pass ``pass_`` ("grad_input" or "grad_values")."""
    if _serve(grad) and pass_ == "grad_input":
        return launch.block_sparse_bwd_input(grad, values, row_ptr, col, weight_shape,
                                             block_shape, list(input.shape), stride, padding,
                                             dilation, groups, config)
    if _serve(grad):
        return launch.block_sparse_bwd_values(grad, input, values, row_ptr, col, weight_shape,
                                              block_shape, stride, padding, dilation, groups,
                                              config)
    need_input = pass_ == "grad_input"
    return block_sparse_conv3d_torch_backward(
        grad, input, values, row_ptr, col, weight_shape, block_shape, stride, padding, dilation,
        groups, need_input=need_input, need_values=not need_input)[0 if need_input else 1]


def _dense_backward(pass_, grad, input, values, row_ptr, col, weight_shape, block_shape, stride,
                    padding, dilation, groups):
    """The dense route of backward pass ``pass_``: grad-values is the stored blocks' part of the
    dense weight's gradient."""
    algo = _dense_algo(input, weight_shape, stride, padding, dilation, groups)[0]
    if pass_ == "grad_input":
        w = dense_weight(values, row_ptr, col, weight_shape, block_shape)
        return _algos.GRAD_INPUT[algo](grad, w, list(input.shape), stride, padding, dilation,
                                       groups)
    gw = _algos.GRAD_WEIGHT[algo](grad, input, list(weight_shape), stride, padding, dilation,
                                  groups)
    return stored_blocks(gw, row_ptr, col, block_shape)


# The backward passes' runners take ``(grad, input, values, row_ptr, col, weight_shape,
# block_shape, stride, padding, dilation, groups)``.
for _pass, _sparse_run, _dense_run in (
        ("forward", _sparse_forward, _dense_forward),
        *((p, partial(_sparse_backward, p), partial(_dense_backward, p))
          for p in ("grad_input", "grad_values"))):
    registry.register(registry.Algorithm(
        OPS[_pass], "sparse", _sparse_run, _always, _sparse_ms, spaces=launch.SPACES[_pass],
        configs=_sparse_configs, launches=True))
    registry.register(registry.Algorithm(OPS[_pass], "dense", _dense_run, _always, _dense_ms))


# ---------------------------------------------------------------------------------------------
# the passes and the custom ops
# ---------------------------------------------------------------------------------------------

def _forward(input, values, row_ptr, col, bias, weight_shape, block_shape, stride, padding,
             dilation, groups):
    if not _algos.finite(input, values):  # see "Non-finite values" in the module docstring
        w = dense_weight(values, row_ptr, col, weight_shape, block_shape)
        return _algos.aten_forward(input, w, bias, stride, padding, dilation, groups)
    geometry = (stride, padding, dilation, groups)
    return _run("forward", input, (input, values, row_ptr, col, bias, weight_shape, block_shape,
                                   *geometry),
                (input, row_ptr, col, weight_shape, block_shape, *geometry))


def _backward_pass(pass_, grad, input, values, row_ptr, col, weight_shape, block_shape, stride,
                   padding, dilation, groups):
    """Backward pass ``pass_``: "grad_input" or "grad_values"."""
    geometry = (stride, padding, dilation, groups)
    if pass_ == "grad_input" and not _algos.finite(grad, values):
        w = dense_weight(values, row_ptr, col, weight_shape, block_shape)
        return _algos.aten_grad_input(grad, w, list(input.shape), *geometry)
    return _run(pass_, grad, (grad, input, values, row_ptr, col, weight_shape, block_shape,
                              *geometry),
                (input, row_ptr, col, weight_shape, block_shape, *geometry))


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
            gx = _backward_pass("grad_input", grad, input, values, row_ptr, col, *args)
        if output_mask[1]:
            gv = _backward_pass("grad_values", grad, input, values, row_ptr, col, *args)
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

def _plans(passes, input, weight, bias, stride, padding, dilation, groups):
    """``(input with a batch dim, spec, whether the kernels serve, {pass: select.Plan})``."""
    x, _, spec = _checked(input, _check_weight(weight), bias, stride, padding, dilation, groups)
    serve = _serve(x)
    problem = (x, weight.row_ptr, weight.col, list(weight.shape), list(weight.block_shape),
               list(spec.stride), list(spec.padding), list(spec.dilation), spec.groups, serve)
    return x, spec, serve, {p: _plan(p, *problem) for p in passes}


def explain(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> dict:
    """How the forward of ``block_sparse_conv3d(input, weight, ...)`` would run here, without
    running anything: ``{"path": "kernels"}`` where the plan is the sparse route and the Triton
    kernels serve, else ``{"path": "torch", "route": "sparse" | "dense", "algo": the dense
    route's algorithm or None, "times_ms": ms per route (modelled, or measured for a cached
    plan; none for a forced one)}``. ``plans`` gives every pass's plan."""
    x, spec, serve, found = _plans(("forward",), input, weight, bias, stride, padding, dilation,
                                   groups)
    plan = found["forward"]
    if plan.algo == "sparse" and serve:
        return dict(path="kernels")
    algo = None
    if plan.algo == "dense":
        algo = _dense_algo(x, weight.shape, list(spec.stride), list(spec.padding),
                           list(spec.dilation), spec.groups)[0]
    return dict(path="torch", route=plan.algo, algo=algo, times_ms=dict(plan.times_ms))


def plans(input, weight, bias=None, stride=1, padding=0, dilation=1,
          groups=1) -> "select.Plans":
    """The plans ``block_sparse_conv3d`` would use for these arguments, without running anything:
    ``{"forward": plan, "grad_input": plan, "grad_values": plan}`` (an
    ``lk3d.autotune.select.Plans``: printed, a table), each a dict as ``lk3d.explain`` gives
    (route "sparse" or "dense", where the choice came from, the launch config, ms per route)."""
    x, spec, serve, found = _plans(tuple(OPS), input, weight, bias, stride, padding, dilation,
                                   groups)
    dense = _dense_algo(x, weight.shape, list(spec.stride), list(spec.padding),
                        list(spec.dilation), spec.groups)[0]
    pad = padding if isinstance(padding, str) else tuple(spec.pad_left)
    sparse = "the Triton kernels" if serve else "per-block torch products"
    title = (f"lk3d.block_sparse_conv3d on {x.device}, {str(x.dtype).removeprefix('torch.')}: "
             f"input {tuple(x.shape)}, weight {tuple(weight.shape)} in blocks "
             f"{tuple(weight.block_shape)}, density {weight.density:.3g}, stride "
             f"{tuple(spec.stride)}, padding {pad}, dilation {tuple(spec.dilation)}, groups "
             f"{spec.groups}\npath: sparse by {sparse}, dense by lk3d.conv3d's {dense} on "
             f"the dense weight")
    return select.Plans({p: plan.as_dict() for p, plan in found.items()}, title)


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
