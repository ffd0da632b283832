"""The torch path of ``lk3d.block_sparse_conv3d``: its sparse route, in plain torch.

``block_sparse_conv3d_torch`` works in proportion to the stored blocks: the input is padded once;
for every kernel tap covered by a stored block, the stored blocks at that tap gather their
input-channel blocks from the strided, shifted view of the padded input and multiply them in one
batched product, which is added into their output block rows (bricks of several taps run as one
grouped ``F.conv3d``). Its cost is ``nnz·bo·bi·bd·bh·bw`` multiply-adds per output voxel
(``sparse_route_macs``), the dense cost times the block density; the backward passes
(``block_sparse_conv3d_torch_backward``: grad-input, the transposed sum; grad-values, per tap
products of output-gradient blocks and shifted input blocks) cost the same each.
``sparse_route_ms`` models its time, for ``lk3d.block_sparse``'s choice between this route and the
dense convolution of ``to_dense()``.

Arguments as the ``lk3d::block_sparse_conv3d`` ops take them (``input`` 5-D, the weight by its
parts, ``padding`` six ints ``(d_l, h_l, w_l, d_r, h_r, w_r)``).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lk3d._spec import out_size, zero_pad

__all__ = ["block_sparse_conv3d_torch", "block_sparse_conv3d_torch_backward",
           "sparse_route_macs", "sparse_route_ms"]


@dataclass(frozen=True)
class _Brick:
    """Some of the stored blocks at one spatial block of the kernel, run as one grouped conv:
    ``origin`` the brick's first tap, ``ks`` the blocks, ``chan`` the input channels they read
    (``bi`` per block, or for a depthwise weight whose rows span groups one per output channel),
    ``ochan`` the output channels they write (``bo`` per block), ``groups`` the conv's groups
    (one per block, or one per output channel)."""
    origin: tuple
    ks: torch.Tensor
    chan: torch.Tensor
    ochan: torch.Tensor
    groups: int


def _bricks(row_ptr, col, weight_shape, block_shape, groups, max_channels=None):
    """The stored blocks grouped by spatial block, in chunks reading at most ``max_channels``
    input channels each (to bound the gathered input)."""
    cout, cin_g = weight_shape[:2]
    bo, bi, bd, bh, bw = block_shape
    grid = [n // b for n, b in zip(weight_shape, block_shape)]
    per_row = math.prod(grid[2:])
    device = col.device
    col = col.long()
    rows = torch.repeat_interleave(torch.arange(grid[0], device=device), row_ptr.long().diff(),
                                   output_size=col.shape[0])
    spatial, ci = col % per_row, col // per_row
    ochan = (rows * bo)[:, None] + torch.arange(bo, device=device)
    cout_g = cout // groups
    per_output = cout_g % bo != 0  # depthwise (cin_g == bi == 1) with rows spanning groups
    if per_output:  # output channel o reads input channel o // cout_g
        chan = ochan // cout_g
    else:  # a block row lies in one group
        chan = ((rows * bo // cout_g) * cin_g + ci * bi)[:, None] + torch.arange(bi, device=device)
    step = max(1, (max_channels or col.shape[0] * chan.shape[1]) // chan.shape[1])
    order = torch.sort(spatial, stable=True).indices
    found, counts = torch.unique_consecutive(spatial[order], return_counts=True)
    out = []
    for s, same in zip(found.tolist(), order.split(counts.tolist())):
        db, rest = divmod(s, grid[3] * grid[4])
        hb, wb = divmod(rest, grid[4])
        for ks in same.split(step):
            m = ks.shape[0]
            out.append(_Brick((db * bd, hb * bh, wb * bw), ks, chan[ks].flatten(),
                              ochan[ks].flatten(), m * bo if per_output else m))
    return out


def _window(origin, block_shape, size, stride, dilation):
    """The part of the padded input that the taps of a brick starting at ``origin`` read: for a
    one-tap brick the strided view of that tap itself."""
    if math.prod(block_shape[2:]) == 1:
        return (slice(None), slice(None)) + tuple(
            slice(o * d, o * d + (n - 1) * s + 1, s)
            for o, n, s, d in zip(origin, size, stride, dilation))
    return (slice(None), slice(None)) + tuple(
        slice(o * d, o * d + (n - 1) * s + (b - 1) * d + 1)
        for o, b, n, s, d in zip(origin, block_shape[2:], size, stride, dilation))


# A brick of one tap is a batched matrix product (elementwise for one channel per group),
# cheaper than a 1×1×1 grouped conv call; larger bricks run as grouped convs.

def _one_tap(brick, w, z, transposed=False):
    """``w [m·bo, bi]`` (the blocks of a one-tap brick) applied to ``z [n, m·bi, ...]`` (or its
    transpose to ``z [n, m·bo, ...]``), per block."""
    n, size, m = z.shape[0], z.shape[2:], brick.ks.shape[0]
    if brick.groups == brick.ochan.numel() == brick.chan.numel():  # one channel per group
        return z * w.view(-1, 1, 1, 1)
    w = w.view(m, -1, w.shape[1])
    spec = "mob,nmop->nmbp" if transposed else "mob,nmbp->nmop"
    return torch.einsum(spec, w, z.reshape(n, m, -1, math.prod(size))).reshape(n, -1, *size)


def _one_tap_grad(brick, gys, xs):
    """The gradient ``[m·bo, bi]`` of the blocks of a one-tap brick."""
    if brick.groups == brick.ochan.numel() == brick.chan.numel():
        return (gys * xs).sum((0, 2, 3, 4)).view(-1, 1)
    n, m = gys.shape[0], brick.ks.shape[0]
    g = torch.einsum("nmop,nmbp->mob", gys.reshape(n, m, -1, gys[0, 0].numel()),
                     xs.reshape(n, m, -1, xs[0, 0].numel()))
    return g.reshape(-1, g.shape[2])


def _acc_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# Input elements one grouped conv of the torch path may gather (bounds its working memory).
_GATHER_LIMIT = 1 << 24


def _plan(input, padding, row_ptr, col, weight_shape, block_shape, groups):
    spatial = [s + l + r for s, l, r in zip(input.shape[2:], padding[:3], padding[3:])]
    per_channel = max(1, input.shape[0] * math.prod(spatial))
    return _bricks(row_ptr, col, weight_shape, block_shape, groups,
                   max(1, _GATHER_LIMIT // per_channel))


def block_sparse_conv3d_torch(input, values, row_ptr, col, bias, weight_shape, block_shape,
                              stride, padding, dilation, groups):
    """The torch path's sparse route of ``lk3d::block_sparse_conv3d`` (arguments as the op's;
    ``padding`` six ints ``(d_l, h_l, w_l, d_r, h_r, w_r)``), computed in float32 for half
    dtypes."""
    acc = _acc_dtype(input.dtype)
    size = out_size(input.shape[2:], weight_shape[2:], stride, padding, dilation)
    out = input.new_zeros(input.shape[0], weight_shape[0], *size, dtype=acc)
    xp = zero_pad(input.to(acc), padding)
    vals = values.to(acc)
    one_tap = math.prod(block_shape[2:]) == 1
    for brick in _plan(input, padding, row_ptr, col, weight_shape, block_shape, groups):
        xs = xp[_window(brick.origin, block_shape, size, stride, dilation)]
        xs = xs.index_select(1, brick.chan)
        w = vals[brick.ks].flatten(0, 1)
        if one_tap:
            y = _one_tap(brick, w.flatten(1), xs)
        else:
            y = F.conv3d(xs, w, None, stride, 0, dilation, brick.groups)
        out.index_add_(1, brick.ochan, y)
    if bias is not None:
        out += bias.to(acc).view(-1, 1, 1, 1)
    return out


def block_sparse_conv3d_torch_backward(grad, input, values, row_ptr, col, weight_shape,
                                       block_shape, stride, padding, dilation, groups,
                                       need_input=True, need_values=True):
    """``(grad_input, grad_values)`` of ``block_sparse_conv3d_torch`` (None where not needed);
    the bias gradient is ``grad.sum((0, 2, 3, 4))``."""
    acc = _acc_dtype(input.dtype)
    size = tuple(grad.shape[2:])
    gy = grad.to(acc)
    vals = values.to(acc)
    xp = zero_pad(input.to(acc), padding) if need_values else None
    gxp = zero_pad(input.new_zeros(input.shape, dtype=acc), padding) if need_input else None
    gv = torch.zeros(values.shape, dtype=acc, device=values.device) if need_values else None
    one_tap = math.prod(block_shape[2:]) == 1
    for brick in _plan(input, padding, row_ptr, col, weight_shape, block_shape, groups):
        window = _window(brick.origin, block_shape, size, stride, dilation)
        w = vals[brick.ks].flatten(0, 1)
        gys = gy.index_select(1, brick.ochan)
        if need_input:
            if one_tap:
                gxs = _one_tap(brick, w.flatten(1), gys, transposed=True)
            else:
                gxs = F.conv_transpose3d(gys, w, None, stride, 0, 0, brick.groups, dilation)
            gxp[window].index_add_(1, brick.chan, gxs)
        if need_values:
            xs = xp[window].index_select(1, brick.chan)
            if one_tap:
                gw = _one_tap_grad(brick, gys, xs)
            else:
                gw = torch.ops.aten.convolution_backward(
                    gys, xs, w, None, stride, [0, 0, 0], dilation, False, [0, 0, 0],
                    brick.groups, [False, True, False])[1]
            gv[brick.ks] = gw.reshape(-1, *values.shape[1:])
    gx = None
    if need_input:
        d_l, h_l, w_l = padding[:3]
        D, H, W = input.shape[2:]
        gx = gxp[:, :, d_l:d_l + D, h_l:h_l + H, w_l:w_l + W]
    return gx, gv


def sparse_route_macs(input, padding, size, row_ptr, col, weight_shape, block_shape,
                      groups) -> int:
    """Multiply-adds of ``block_sparse_conv3d_torch`` with output extent ``size``:
    ``bo·bi·bd·bh·bw`` per stored block and output voxel, counted over the grouped convs it
    runs."""
    voxels = input.shape[0] * math.prod(size)
    taps = math.prod(block_shape[2:])
    total = 0
    for brick in _plan(input, padding, row_ptr, col, weight_shape, block_shape, groups):
        # One grouped conv: out channels × (in channels per group) × taps per output voxel.
        total += brick.ochan.numel() * (brick.chan.numel() // brick.groups) * taps * voxels
    return total


# The cost model of the sparse route: its constants were fitted (non-negative least squares on
# relative error) to 35 measured times of the sparse route on a 2-core Intel Xeon (torch 2.13;
# channel blocks 8x8 to 32x32 per tap, 2³/3³/4³ bricks, depthwise bricks; 5% to 100% density),
# the same machine as lk3d.conv3d's CPU model: per element gathered
# or scattered, per multiply-add of a one-tap brick (batched small products; the fit puts its
# cost in the gathers), per multiply-add of a brick run as a grouped F.conv3d (oneDNN), and per
# brick. With them the route picked was the faster one in 32 of the 35 cases and within 1.2x
# of it in 34 (the constants fitted earlier on an AMD EPYC misrouted 20 there, by up to 7x).
_MOVE_NS = 1.6
_TAP_MAC_NS = 0.0
_CONV_MAC_NS = 0.023
_BRICK_MS = 0.4


def sparse_route_ms(input, row_ptr, col, weight_shape, block_shape, stride, padding, dilation,
                    groups) -> float:
    """Modelled milliseconds of the sparse route (``block_sparse_conv3d_torch``, a forward):
    per stored block its gathered input channels and scattered output channels (twice for an
    elementwise depthwise tap) and its multiply-adds; per occupied spatial block one brick."""
    size = out_size(input.shape[2:], weight_shape[2:], stride, padding, dilation)
    n, nnz = input.shape[0], col.shape[0]
    out_vox = n * math.prod(size)
    bo, bi = block_shape[:2]
    taps = math.prod(block_shape[2:])
    one_tap = taps == 1
    window = out_vox if one_tap else n * math.prod(
        (o - 1) * s + (b - 1) * d + 1 for o, s, b, d in zip(size, stride, block_shape[2:],
                                                             dilation))
    cout_g = weight_shape[0] // groups
    per_output = cout_g % bo != 0  # as in _bricks: one input channel per output channel
    elementwise = one_tap and (per_output or bo == bi == 1)
    gathered = bo if per_output else bi
    moved = nnz * (gathered * window + bo * out_vox * (2 if elementwise else 1))
    macs = nnz * bo * (1 if per_output else bi) * taps * out_vox
    spatial = math.prod(k // b for k, b in zip(weight_shape[2:], block_shape[2:]))
    bricks = torch.unique(col.long() % spatial).numel() if nnz else 0
    scale = 2 / max(1, torch.get_num_threads())
    ns = moved * _MOVE_NS + macs * scale * (_TAP_MAC_NS if one_tap else _CONV_MAC_NS)
    return ns * 1e-6 + _BRICK_MS * bricks
