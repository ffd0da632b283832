"""The block-sparse Triton launchers of ``lk3d.kernels.block_sparse`` with their launch config:
what ``lk3d.block_sparse`` calls where the kernels serve. Same arguments as the launchers (padding
six ints); ``config=None`` takes ``lk3d.autotune.configs.default_config`` (the space:
``lk3d.kernels.block_sparse_configs``), chosen for the voxels the launch produces or reduces over.
"""
import math

from lk3d.autotune import configs
from lk3d import kernels
from lk3d.kernels import block_sparse_configs as block_sparse_family
from lk3d.kernels import out_size

configs.register(block_sparse_family)


def _config(kind, M, block_shape, t, programs=1):
    problem = configs.Problem(kind, M=M, block_shape=tuple(block_shape), programs=programs)
    return configs.default_config(problem, t.device, t.element_size())


def _kind(weight_shape, wgrad=False):
    depthwise = weight_shape[1] == 1
    if wgrad:
        return "block_sparse_dw_wgrad" if depthwise else "block_sparse_wgrad"
    return "block_sparse_dw" if depthwise else "block_sparse_fwd"


def block_sparse_fwd(x, values, row_ptr, col, weight_shape, block_shape, bias, stride, padding,
                     dilation, groups, config=None, *, allow_tf32=False):
    """``lk3d.kernels.block_sparse.block_sparse_fwd`` with its config."""
    if config is None:
        size = out_size(x.shape[2:], weight_shape[2:], stride, padding, dilation)
        config = _config(_kind(weight_shape), x.shape[0] * math.prod(size), block_shape, x)
    return kernels.block_sparse.block_sparse_fwd(
        x, values, row_ptr, col, weight_shape, block_shape, bias, stride, padding, dilation, groups,
        config, allow_tf32=allow_tf32)


def block_sparse_bwd_input(grad, values, row_ptr, col, weight_shape, block_shape, input_shape,
                           stride, padding, dilation, groups, config=None, *, allow_tf32=False):
    """``lk3d.kernels.block_sparse.block_sparse_bwd_input`` with its config."""
    if config is None:
        config = _config(_kind(weight_shape), input_shape[0] * math.prod(input_shape[2:]),
                         block_shape, grad)
    return kernels.block_sparse.block_sparse_bwd_input(
        grad, values, row_ptr, col, weight_shape, block_shape, input_shape, stride, padding,
        dilation, groups, config, allow_tf32=allow_tf32)


def block_sparse_bwd_values(grad, x, values, row_ptr, col, weight_shape, block_shape, stride,
                            padding, dilation, groups, config=None, *, allow_tf32=False):
    """``lk3d.kernels.block_sparse.block_sparse_bwd_values`` with its config."""
    if config is None:
        M = grad.shape[0] * math.prod(grad.shape[2:])
        config = _config(_kind(weight_shape, wgrad=True), M, block_shape, x,
                         programs=values.shape[0] * math.prod(block_shape[2:]))
    return kernels.block_sparse.block_sparse_bwd_values(
        grad, x, values, row_ptr, col, weight_shape, block_shape, stride, padding, dilation, groups,
        config, allow_tf32=allow_tf32)
