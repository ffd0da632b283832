"""Launch-config spaces of the block-sparse kernels (lk3d.kernels.block_sparse), as data.

The channel tiles of the block-sparse kernels are not tuned: they are the block's channel extents
padded to a power of two (>= 16 where they feed ``tl.dot``, see ``block_sparse.tile_channels``).
What is tuned is the voxel tile (BLOCK_M, BLOCK_S), warps and stages; SPLIT (programs sharing one
voxel reduction in grad-values) is derived from the problem and the device. ``LK3D_CONFIG`` forces
the keys it names, as for the tiled kernels.

``lk3d.tools.aot.block_sparse_cases`` compiles every shipped config for sm_80 and sm_90 (no GPU
needed) on the path that takes it.
"""
import torch

from lk3d.autotune.configs import _SMEM_LIMIT, _device_programs, _forced, _MAX_PARTIAL_ELEMS, _pow2

# Channel-block forward and grad-input (tl.dot per stored block and tap).
# Shared memory ~ stages * (BLOCK_M * BK + BK * BN) * bytes.
BLOCK_SPARSE_FWD_CONFIGS = [
    dict(BLOCK_M=128, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, num_warps=4, num_stages=3),
]
# Depthwise forward and grad-input: [BLOCK_M, bo] elementwise multiply-accumulate per tap.
BLOCK_SPARSE_DW_CONFIGS = [
    dict(BLOCK_M=128, num_warps=4, num_stages=1),
    dict(BLOCK_M=256, num_warps=4, num_stages=1),
]
# Channel-block grad-values: [bi, BLOCK_S] x [BLOCK_S, bo] per (stored block, tap).
BLOCK_SPARSE_WGRAD_CONFIGS = [
    dict(BLOCK_S=64, num_warps=4, num_stages=3),
    dict(BLOCK_S=32, num_warps=4, num_stages=3),  # BLOCK_S=128 spills at 64x64 blocks
]
# Depthwise grad-values: [BLOCK_S, bo] products summed over voxels.
BLOCK_SPARSE_DW_WGRAD_CONFIGS = [
    dict(BLOCK_S=128, num_warps=4, num_stages=1),
]

CONFIG_SPACES = {
    "block_sparse_fwd": BLOCK_SPARSE_FWD_CONFIGS,
    "block_sparse_dw": BLOCK_SPARSE_DW_CONFIGS,
    "block_sparse_wgrad": BLOCK_SPARSE_WGRAD_CONFIGS,
    "block_sparse_dw_wgrad": BLOCK_SPARSE_DW_WGRAD_CONFIGS,
}
_WGRAD = ("block_sparse_wgrad", "block_sparse_dw_wgrad")


def _tile(n, lo):
    return _pow2(n, lo, 1 << 30)


def shared_bytes(kind, config, block_shape, element_size):
    """Estimated shared memory of one program: the pipelined operand tiles of its tl.dot."""
    bo, bi = block_shape[:2]
    stages = config.get("num_stages", 1)
    if kind == "block_sparse_fwd":  # forward and grad-input: the same tiles, K and N swapped
        k, n = _tile(bi, 16), _tile(bo, 16)
        return stages * (config["BLOCK_M"] * max(k, n) + k * n) * element_size
    if kind == "block_sparse_wgrad":
        return stages * (_tile(bi, 16) + _tile(bo, 16)) * config["BLOCK_S"] * element_size
    return 0


def _interpreter_config(kind, M):
    """Few, large programs: the interpreter costs per operation per program, not per element."""
    if kind in _WGRAD:
        return dict(BLOCK_S=_pow2(M, 16, 1024))
    return dict(BLOCK_M=_pow2(M, 16, 1024 if kind == "block_sparse_fwd" else 4096))


def _pick(kind, M, block_shape, element_size, smem_limit):
    configs = CONFIG_SPACES[kind]
    if kind == "block_sparse_dw":
        return dict(configs[1] if M >= 4096 else configs[0])
    for c in configs:
        if shared_bytes(kind, c, block_shape, element_size) <= smem_limit:
            return dict(c)
    # Wide blocks in fp32: the smallest tile, with as few stages as fit (at least one).
    c = dict(configs[-1])
    while c["num_stages"] > 1 and shared_bytes(kind, c, block_shape, element_size) > smem_limit:
        c["num_stages"] -= 1
    return c


def default_split(M, block, programs, partial, device):
    """Split the voxel reduction of grad-values until the launch fills the device, keeping >= 8
    reduction steps per program and the fp32 partials within the cap."""
    if device.type != "cuda":
        return 1
    want = max(1, _device_programs(device) // max(1, programs))
    by_work = max(1, M // (8 * block))
    by_memory = max(1, _MAX_PARTIAL_ELEMS // max(1, partial))
    return int(min(want, by_work, by_memory))


def default_config(kind, *, M, block_shape, element_size, device, programs=1):
    """The launch config of a block-sparse launcher (a copy). ``kind`` is a key of CONFIG_SPACES,
    ``M`` the voxels a launch produces or reduces over, ``programs`` the (stored block, tap)
    programs of grad-values before splitting."""
    device = torch.device(device)
    if device.type != "cuda":
        config = _interpreter_config(kind, M)
    else:
        major = torch.cuda.get_device_capability(device)[0]
        config = _pick(kind, M, block_shape, element_size, _SMEM_LIMIT.get(major, 99 * 1024))
    keys = CONFIG_SPACES[kind][0]
    config.update({k: v for k, v in _forced().items() if k in keys or k == "SPLIT"})
    if kind in _WGRAD and "SPLIT" not in config:
        bo, bi = block_shape[:2]
        partial = programs * bo * bi
        config["SPLIT"] = default_split(M, config["BLOCK_S"], programs, partial, device)
    return config
