"""The block-sparse Triton launchers of ``lk3d.kernels.block_sparse`` and
``lk3d.kernels.block_sparse_desc`` with their launch config, and what the planner knows of them:
what ``lk3d.block_sparse``'s sparse route runs where the kernels serve. The passes of channel
blocks the tensor-descriptor kernels take (``descriptor``: forward, stride-1 grad-input,
grad-values) run on them, the other passes and problems on the gather kernels of
``lk3d.kernels.block_sparse``. Same arguments as the launchers (padding six ints); ``config=None``
takes ``lk3d.autotune.configs.default_config`` (the space: ``lk3d.kernels.block_sparse_configs``),
chosen for the voxels the launch produces or reduces over.

The three passes are named ``"forward"``, ``"grad_input"`` and ``"grad_values"``; for each,
``SPACES`` names the kernel kinds whose configs it launches with, ``launch_configs`` the configs
worth measuring and ``kernels_ms`` its modelled time.
"""
import math

import torch

from lk3d import _algos, kernels
from lk3d import _cuda_model as cuda_model
from lk3d.autotune import configs, devices
from lk3d.kernels import block_sparse_configs as block_sparse_family
from lk3d.kernels import out_size, pow2

configs.register(block_sparse_family)

SPACES = {"forward": ("block_sparse_desc", "block_sparse_fwd", "block_sparse_dw"),
          "grad_input": ("block_sparse_desc", "block_sparse_fwd", "block_sparse_dw"),
          "grad_values": ("block_sparse_desc_wgrad", "block_sparse_wgrad",
                          "block_sparse_dw_wgrad")}


def descriptor(pass_, dtype, weight_shape, block_shape, stride, in_channels):
    """Whether pass ``pass_`` runs on the tensor-descriptor kernels
    (``lk3d.kernels.block_sparse_desc``): the problems they take
    (``block_sparse_configs.descriptor_fits``; grad-values as the forward); the others take
    ``lk3d.kernels.block_sparse``."""
    return block_sparse_family.descriptor_fits(
        dtype, weight_shape, block_shape, stride, in_channels, transposed=pass_ == "grad_input",
        wgrad=pass_ == "grad_values")


def problem(pass_, x_shape, weight_shape, block_shape, nnz, stride, padding, dilation,
            dtype=None):
    """What the config choice of pass ``pass_`` looks at, for an input of shape ``x_shape``
    (``dtype``: the operands', None for the kernels of lk3d.kernels.block_sparse)."""
    depthwise = weight_shape[1] == 1
    size = out_size(x_shape[2:], weight_shape[2:], stride, padding, dilation)
    if pass_ == "grad_values":
        desc = dtype is not None and descriptor(pass_, dtype, weight_shape, block_shape, stride,
                                                x_shape[1])
        kind = ("block_sparse_desc_wgrad" if desc else
                "block_sparse_dw_wgrad" if depthwise else "block_sparse_wgrad")
        return configs.Problem(kind,
                               M=x_shape[0] * math.prod(size), block_shape=tuple(block_shape),
                               programs=nnz * math.prod(block_shape[2:]))
    produced = size if pass_ == "forward" else x_shape[2:]
    if dtype is not None and descriptor(pass_, dtype, weight_shape, block_shape, stride,
                                        x_shape[1]):
        bo, bi = block_shape[:2]
        kc, nc = (bo, bi) if pass_ == "grad_input" else (bi, bo)
        return configs.Problem("block_sparse_desc", M=x_shape[0] * math.prod(produced), KC=kc,
                               NC=nc, taps=math.prod(block_shape[2:]) * nnz,
                               block_shape=tuple(block_shape))
    return configs.Problem("block_sparse_dw" if depthwise else "block_sparse_fwd",
                           M=x_shape[0] * math.prod(produced), block_shape=tuple(block_shape))


def launch_configs(pass_, input, nnz, weight_shape, block_shape, stride, padding, dilation):
    """The launch configs worth measuring for pass ``pass_`` of a call with this ``input``."""
    return configs.candidate_configs(
        problem(pass_, input.shape, weight_shape, block_shape, nnz, stride, padding, dilation,
                input.dtype),
        input.device, input.element_size())


# The tensor-descriptor kernels (where ``descriptor``) are priced at their own ceilings and
# executed FLOPs (``_descriptor_ms``). The other kernels' modelled time on CUDA is
# lk3d.conv3d's model of its own Triton kernels ("tiled",
# lk3d._algos.model_ms, priced from the device's figures) on the dense weight, times the fraction
# of it stored (the density), over the step efficiency of the channel-block kernel against the
# dense kernel of the same pass (the implicit GEMM; its grad-weight for grad-values): a step
# gathers its [BLOCK_M, channels] operand element by element and feeds one tl.dot of channel
# extents padded to >= 16, so its useful work grows with bo·bi and its cost with the gathered
# channels (bi forward, bo grad-input, both grad-values). At 16x16 blocks the efficiency is the
# ratio of the two kernels' issue ceilings on the device's SM version (``_step_efficiency_16``,
# from lk3d._cuda_model.kernel_ceiling); wider blocks approach the dense kernel. The depthwise
# kernels are elementwise like the dense depthwise one, whose rate the model takes as it is.
# Untuned, as lk3d.conv3d's CUDA rates are, until `lk3d tune` measures the device.
_CEILING_KINDS = {"forward": ("block_sparse_16x16", "implicit_gemm"),
                  "grad_input": ("block_sparse_16x16", "implicit_gemm"),
                  "grad_values": ("block_sparse_16x16_wgrad", "implicit_gemm_wgrad")}


def _step_efficiency_16(pass_, gpu):
    """The 16x16 channel-block kernel's ceiling over the dense kernel's for ``pass_`` on
    ``gpu``."""
    sparse, dense = _CEILING_KINDS[pass_]
    return (cuda_model.kernel_ceiling(sparse, gpu)[1]
            / cuda_model.kernel_ceiling(dense, gpu)[1])


_CONV_OPS = {"forward": "conv3d", "grad_input": "conv3d_grad_input",
             "grad_values": "conv3d_grad_weight"}


def _tile(n):
    return pow2(n, 16, 1 << 30)


def _descriptor_ms(pass_, input, nnz, weight_shape, block_shape, stride, padding, dilation,
                   gpu):
    """The tensor-descriptor kernels' modelled ms: their executed FLOPs (every stored block's
    taps over the output bricks of the default config) at the ceiling of their kind
    ("block_sparse_desc", grad-values "block_sparse_desc_wgrad"), floored by the bytes they move;
    plus the launcher's copies (each read and written): the operands to NDHWC (grad-values:
    input and grad_output) and, forward and grad-input, the stored blocks repacked into entry
    order."""
    prob = problem(pass_, input.shape, weight_shape, block_shape, nnz, stride, padding, dilation,
                   input.dtype)
    elem = torch.empty((), dtype=input.dtype).element_size()
    config = block_sparse_family.pick(prob, gpu.shared_per_sm - 1024, elem)
    size = out_size(input.shape[2:], weight_shape[2:], stride, padding, dilation)
    produced = input.shape[2:] if pass_ == "grad_input" else size
    bh = config["BLOCK_H"] * (2 if config.get("PAIR") else 1)
    bw = config["BLOCK_W"]
    rows = (input.shape[0] * produced[0] * -(-produced[1] // bh) * bh
            * -(-produced[2] // bw) * bw)
    bo, bi = block_shape[:2]
    entries = nnz * math.prod(block_shape[2:])
    flops = 2 * rows * bo * bi * entries
    values = nnz * math.prod(block_shape)
    x = input.shape[0] * math.prod(input.shape[1:])
    dy = input.shape[0] * weight_shape[0] * math.prod(size)
    if pass_ == "grad_values":
        moved = elem * (x + dy + values) + 4 * entries * (bo * bi + 2)
        return (cuda_model.kernel_ms("block_sparse_desc_wgrad", flops, moved, gpu, input.dtype,
                                     _algos.allow_tf32())
                + cuda_model.copy_ms(2 * elem * (x + dy), gpu))
    operand = x if pass_ == "forward" else dy
    moved = elem * (x + dy + values) + 4 * entries
    return (cuda_model.kernel_ms("block_sparse_desc", flops, moved, gpu, input.dtype,
                                 _algos.allow_tf32())
            + cuda_model.copy_ms(2 * elem * (operand + values), gpu))


def kernels_ms(pass_, input, nnz, weight_shape, block_shape, stride, padding, dilation,
               groups, device=None) -> float:
    """Modelled milliseconds of pass ``pass_`` by the kernels; inf off CUDA (the interpreter is
    for checking the kernels, not for speed). ``device``: ``input``'s by default, or a GPU's
    figures (``lk3d.autotune.devices.Figures``)."""
    gpu = devices.figures(input.device if device is None else device)
    if gpu is None:
        return math.inf
    if descriptor(pass_, input.dtype, weight_shape, block_shape, stride, input.shape[1]):
        return _descriptor_ms(pass_, input, nnz, weight_shape, block_shape, stride, padding,
                              dilation, gpu)
    dense_ms = _algos.model_ms("tiled", list(input.shape), list(weight_shape), stride, padding,
                               dilation, groups, input.dtype, gpu, op=_CONV_OPS[pass_],
                               gathered=True)
    blocks = math.prod(w // b for w, b in zip(weight_shape, block_shape))
    bo, bi = block_shape[:2]
    efficiency = 1.0
    if weight_shape[1] > 1:
        gathered = {"forward": _tile(bi), "grad_input": _tile(bo),
                    "grad_values": (_tile(bi) + _tile(bo)) / 2}[pass_]
        efficiency = min(1.0, _step_efficiency_16(pass_, gpu) * bo * bi / (16 * gathered))
    return dense_ms * (nnz / blocks) / efficiency


def _launch(pass_, launcher, main, x_shape, values, weight_shape, block_shape, geometry, config,
            args, allow_tf32):
    """Pass ``pass_`` on ``args`` (everything before the geometry): the tensor-descriptor
    kernel where it serves (``descriptor``), else ``launcher`` (one of
    ``lk3d.kernels.block_sparse``'s), with ``config`` or the pass's default (chosen for
    ``main``'s device and element size). A config of the other kernel's space (a tuned plan made
    before the routing) is replaced by the default."""
    stride, groups = geometry[0], geometry[3]
    desc = descriptor(pass_, main.dtype, weight_shape, block_shape, stride,
                      weight_shape[1] * groups)
    if config is None or ("BLOCK_H" in config) != desc:
        config = configs.default_config(
            problem(pass_, x_shape, weight_shape, block_shape, values.shape[0], *geometry[:3],
                    main.dtype),
            main.device, main.element_size())
    if desc:
        launcher = {"forward": kernels.block_sparse_desc.block_sparse_desc_fwd,
                    "grad_input": kernels.block_sparse_desc.block_sparse_desc_bwd_input,
                    "grad_values": kernels.block_sparse_desc.block_sparse_desc_bwd_values}[pass_]
    return launcher(*args, *geometry, config, allow_tf32=allow_tf32)

def block_sparse_fwd(x, values, row_ptr, col, weight_shape, block_shape, bias, stride, padding,
                     dilation, groups, config=None, *, allow_tf32=False):
    """``lk3d.kernels.block_sparse.block_sparse_fwd`` with its config."""
    return _launch("forward", kernels.block_sparse.block_sparse_fwd, x, x.shape, values,
                   weight_shape, block_shape, (stride, padding, dilation, groups), config,
                   (x, values, row_ptr, col, weight_shape, block_shape, bias), allow_tf32)


def block_sparse_bwd_input(grad, values, row_ptr, col, weight_shape, block_shape, input_shape,
                           stride, padding, dilation, groups, config=None, *, allow_tf32=False):
    """``lk3d.kernels.block_sparse.block_sparse_bwd_input`` with its config."""
    return _launch("grad_input", kernels.block_sparse.block_sparse_bwd_input, grad, input_shape,
                   values, weight_shape, block_shape, (stride, padding, dilation, groups), config,
                   (grad, values, row_ptr, col, weight_shape, block_shape, input_shape),
                   allow_tf32)


def block_sparse_bwd_values(grad, x, values, row_ptr, col, weight_shape, block_shape, stride,
                            padding, dilation, groups, config=None, *, allow_tf32=False):
    """``lk3d.kernels.block_sparse.block_sparse_bwd_values`` with its config."""
    return _launch("grad_values", kernels.block_sparse.block_sparse_bwd_values, x, x.shape,
                   values, weight_shape, block_shape, (stride, padding, dilation, groups), config,
                   (grad, x, values, row_ptr, col, weight_shape, block_shape), allow_tf32)
