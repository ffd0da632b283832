"""Launch-config spaces of the block-sparse kernels (``lk3d.kernels.block_sparse``), as data, and
what the config choice needs to know of them. No Triton is imported here.

The channel tiles of the block-sparse kernels are not tuned: they are the block's channel extents
padded to a power of two (>= 16 where they feed ``tl.dot``, see ``block_sparse.tile_channels``).
What is tuned is the voxel tile (BLOCK_M, BLOCK_S), warps and stages; SPLIT (programs sharing one
voxel reduction in grad-values) is derived from the problem and the device. ``LK3D_CONFIG`` forces
the keys it names, as for the tiled kernels.

``lk3d.tools.aot.block_sparse_cases`` compiles every shipped config for sm_80 and sm_90 (no GPU
needed) on the path that takes it. The functions below are this family's part of
``lk3d.autotune.configs``; ``problem`` is an ``lk3d.autotune.configs.Problem`` (fields used here:
kind, M, block_shape, programs: the (stored block, tap) programs of grad-values before splitting).
"""
from lk3d.kernels import config_spaces, pow2, split_programs

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

CONFIG_SPACES = config_spaces(globals())  # {kind: <KIND>_CONFIGS above}
# Keys a launch takes beyond its space's (LK3D_CONFIG may force them too).
RUNTIME_KEYS = ("SPLIT",)
_WGRAD = ("block_sparse_wgrad", "block_sparse_dw_wgrad")


def _tile(n, lo):
    return pow2(n, lo, 1 << 30)


def shared_bytes(config, problem, element_size):
    """Estimated shared memory of one program: the pipelined operand tiles of its tl.dot."""
    bo, bi = problem.block_shape[:2]
    stages = config.get("num_stages", 1)
    if problem.kind == "block_sparse_fwd":  # forward and grad-input: same tiles, K and N swapped
        k, n = _tile(bi, 16), _tile(bo, 16)
        return stages * (config["BLOCK_M"] * max(k, n) + k * n) * element_size
    if problem.kind == "block_sparse_wgrad":
        return stages * (_tile(bi, 16) + _tile(bo, 16)) * config["BLOCK_S"] * element_size
    return 0


def pick(problem, smem_limit, element_size):
    """A shipped config for a real GPU (a copy): the first within ``smem_limit`` bytes of shared
    memory; for wide blocks in fp32 the smallest tile, with as few stages as fit (at least one)."""
    configs = CONFIG_SPACES[problem.kind]
    if problem.kind == "block_sparse_dw":
        return dict(configs[1] if problem.M >= 4096 else configs[0])
    for c in configs:
        if shared_bytes(c, problem, element_size) <= smem_limit:
            return dict(c)
    c = dict(configs[-1])
    while c["num_stages"] > 1 and shared_bytes(c, problem, element_size) > smem_limit:
        c["num_stages"] -= 1
    return c


def interpreter_config(problem):
    """Few, large programs: the interpreter costs per operation per program, not per element."""
    if problem.kind in _WGRAD:
        return dict(BLOCK_S=pow2(problem.M, 16, 1024))
    return dict(BLOCK_M=pow2(problem.M, 16, 1024 if problem.kind == "block_sparse_fwd" else 4096))


def split(problem, config, device_programs):
    """SPLIT of grad-values (None for the other kinds): one program under the interpreter
    (``device_programs`` None), else enough to fill the device with >= 8 reduction steps per
    program and the fp32 partials within the cap."""
    if problem.kind not in _WGRAD:
        return None
    bo, bi = problem.block_shape[:2]
    return split_programs(problem.M, config["BLOCK_S"], problem.programs,
                          problem.programs * bo * bi, device_programs)
