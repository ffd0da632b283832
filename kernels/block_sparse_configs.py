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
# Channel blocks on the tensor-descriptor loader (lk3d.kernels.block_sparse_desc): an output brick
# BLOCK_H x BLOCK_W (PAIR: two stacked along H, one 2·BLOCK_H x BLOCK_W operand), one (tap,
# channel block) entry a step. The brick shrinks as the channels grow (``desc_fits``, ``pick``).
# At 16x16 bf16 blocks: on sm_90 the first issues 181 instructions a step for 16 HGMMA
# (64x16x16) and 3 UTMALDG (Triton 3.9; 171 on 3.6); on sm_80 the second (8 warps) 193 for 16
# HMMA and 8 LDGSTS. A single 32 x 32 brick with one warpgroup on sm_90 (151 instructions)
# spills in its epilogue on Triton 3.6, the two 16 x 32 halves do not.
BLOCK_SPARSE_DESC_CONFIGS = [
    dict(BLOCK_H=16, BLOCK_W=32, PAIR=True, num_warps=4, num_stages=3),  # sm_90 only (wgmma)
    dict(BLOCK_H=32, BLOCK_W=32, PAIR=False, num_warps=8, num_stages=3),  # before sm_90 only
    dict(BLOCK_H=16, BLOCK_W=32, PAIR=False, num_warps=4, num_stages=3),
    dict(BLOCK_H=8, BLOCK_W=16, PAIR=False, num_warps=4, num_stages=3),
    dict(BLOCK_H=4, BLOCK_W=16, PAIR=False, num_warps=4, num_stages=3),
]
# Grad-values on the tensor-descriptor loader: per group of forward entries of one block row
# (64 // bi of them, at most 4), [group·bi, BLOCK_M] x [BLOCK_M, bo] products over BLOCK_H x
# BLOCK_W output bricks; SPLIT programs share one group's reduction. The brick shrinks as the
# channels grow (``pick``).
BLOCK_SPARSE_DESC_WGRAD_CONFIGS = [
    dict(BLOCK_H=16, BLOCK_W=16, num_warps=4, num_stages=3),  # 16-channel 16-bit blocks
    dict(BLOCK_H=8, BLOCK_W=16, num_warps=4, num_stages=3),   # up to 64 bytes of channels
    dict(BLOCK_H=4, BLOCK_W=16, num_warps=4, num_stages=3),
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
_WGRAD = ("block_sparse_wgrad", "block_sparse_dw_wgrad", "block_sparse_desc_wgrad")
# The descriptor kernel's registers: a thread holds its share of the fp32 accumulator
# (BLOCK_M x BN) and of the operand box (BLOCK_M x BK) in 32-bit registers; at most DESC_REGISTERS
# of them, else a config spills (seen at 192 with 32-channel blocks). The 1024-row programs take
# 16x16 16-bit blocks only: one warpgroup on sm_90 (PAIR), 8 warps before.
DESC_REGISTERS = 128
WGMMA_SMEM = 200 * 1024  # a shared-memory limit above this is sm_90's (wgmma: one warpgroup)

# What the descriptor kernel takes (lk3d.kernels.block_sparse_desc): its entry word's fields.
DESC_MAX_TAP = 1 << 7
DESC_MAX_CHANNEL_BLOCKS = 1 << 10
DESC_MAX_SLICE = 128 * 128 * 2  # bytes of one value slice: 128x128 fp32 blocks spill


def _pow2_16_128(n):
    return 16 <= n <= 128 and n & (n - 1) == 0


def descriptor_fits(dtype, weight_shape, block_shape, stride, in_channels, transposed=False,
                    wgrad=False):
    """Whether ``lk3d.kernels.block_sparse_desc`` serves the forward (grad-input:
    ``transposed``) of a block-sparse conv of ``weight_shape`` in ``block_shape`` blocks at
    ``stride`` on ``in_channels`` input channels: channel blocks (Cin/g > 1) whose bo and bi
    are powers of two in [16, 128] (a [bi, bo] slice of at most 32 KB),
    kernel extents below 128, at most 1024 reduction channel blocks, stride 1 along H and W
    (grad-input: stride 1), a dtype of fp16 / bf16 / fp32 (``dtype`` a torch dtype or its
    name); grad-values (``wgrad``): channel blocks of at most 64 (wider ones spill)."""
    cout, cig, *kernel = weight_shape
    bo, bi = block_shape[:2]
    channels = cout if transposed else in_channels
    reduce_block = bo if transposed else bi
    size = {"float16": 2, "bfloat16": 2, "float32": 4}.get(str(dtype).replace("torch.", ""))
    return (size is not None and bo * bi * size <= DESC_MAX_SLICE
            and cig > 1 and _pow2_16_128(bo) and _pow2_16_128(bi)
            and all(0 < k < DESC_MAX_TAP for k in kernel)
            and channels // reduce_block <= DESC_MAX_CHANNEL_BLOCKS
            and tuple(stride)[1:] == (1, 1) and (not transposed or tuple(stride) == (1, 1, 1))
            and (not wgrad or max(bo, bi) <= 64))


    bo, bi = problem.block_shape[:2]
    return (bo, bi) if problem.KC == bo and problem.NC == bi and bo != bi else (bi, bo)


def _tile(n, lo):
    return pow2(n, lo, 1 << 30)


def desc_rows(config):
    """Output voxels of one program of the descriptor kernel."""
    return config["BLOCK_H"] * config["BLOCK_W"] * (2 if config["PAIR"] else 1)


def desc_registers(config, kc, nc, element_size):
    """32-bit registers a thread of the descriptor kernel holds for its accumulator and operand
    box at ``config``, ``kc`` reduction and ``nc`` produced channels."""
    return desc_rows(config) * (nc + kc * element_size / 4) / (32 * config["num_warps"])


def desc_fits(config, kc, nc, element_size):
    """Whether ``config`` of the descriptor kernel compiles without spills at these channels
    (``DESC_REGISTERS``; 1024 rows at 16x16 16-bit blocks)."""
    if desc_rows(config) >= 1024:
        return kc == nc == 16 and element_size == 2
    return desc_registers(config, kc, nc, element_size) <= DESC_REGISTERS


def shared_bytes(config, problem, element_size):
    """Estimated shared memory of one program: the pipelined operand tiles of its tl.dot."""
    bo, bi = problem.block_shape[:2]
    stages = config.get("num_stages", 1)
    if problem.kind == "block_sparse_fwd":  # forward and grad-input: same tiles, K and N swapped
        k, n = _tile(bi, 16), _tile(bo, 16)
        return stages * (config["BLOCK_M"] * max(k, n) + k * n) * element_size
    if problem.kind == "block_sparse_desc":
        k, n = problem.KC, problem.NC
        return stages * (desc_rows(config) + n) * k * element_size
    if problem.kind == "block_sparse_desc_wgrad":
        bo, bi = problem.block_shape[:2]
        return stages * config["BLOCK_H"] * config["BLOCK_W"] * (bi + bo) * element_size
    if problem.kind == "block_sparse_wgrad":
        return stages * (_tile(bi, 16) + _tile(bo, 16)) * config["BLOCK_S"] * element_size
    return 0


def pick(problem, smem_limit, element_size):
    """A shipped config for a real GPU (a copy): the first within ``smem_limit`` bytes of shared
    memory; for wide blocks in fp32 the smallest tile, with as few stages as fit (at least one)."""
    configs = CONFIG_SPACES[problem.kind]
    if problem.kind == "block_sparse_dw":
        return dict(configs[1] if problem.M >= 4096 else configs[0])
    if problem.kind == "block_sparse_desc_wgrad":  # the wider operands take the smaller brick
        width = max(problem.block_shape[:2]) * element_size
        c = dict(configs[0 if width <= 32 else 1 if width <= 64 else 2])
        while c["num_stages"] > 1 and shared_bytes(c, problem, element_size) > smem_limit:
            c["num_stages"] -= 1
        return c
    if problem.kind == "block_sparse_desc":
        # PAIR (one warpgroup) on sm_90 only, the 8-warp 32 x 32 brick before; programs within
        # the problem
        sm90 = smem_limit > WGMMA_SMEM
        fit = [c for c in configs if desc_fits(c, problem.KC, problem.NC, element_size)
               and desc_rows(c) <= max(64, problem.M)
               and (desc_rows(c) < 1024 or c["PAIR"] == sm90)
               and shared_bytes(c, problem, element_size) <= smem_limit]
        c = dict((fit or configs[-1:])[0])
        while c["num_stages"] > 1 and shared_bytes(c, problem, element_size) > smem_limit:
            c["num_stages"] -= 1
        return c
    for c in configs:
        if shared_bytes(c, problem, element_size) <= smem_limit:
            return dict(c)
    c = dict(configs[-1])
    while c["num_stages"] > 1 and shared_bytes(c, problem, element_size) > smem_limit:
        c["num_stages"] -= 1
    return c


def interpreter_config(problem):
    """Few, large programs: the interpreter costs per operation per program, not per element."""
    if problem.kind == "block_sparse_desc_wgrad":
        return dict(BLOCK_H=8, BLOCK_W=16)
    if problem.kind in _WGRAD:
        return dict(BLOCK_S=pow2(problem.M, 16, 1024))
    if problem.kind == "block_sparse_desc":
        return dict(BLOCK_H=8, BLOCK_W=16, PAIR=False)
    return dict(BLOCK_M=pow2(problem.M, 16, 1024 if problem.kind == "block_sparse_fwd" else 4096))


def split(problem, config, device_programs):
    """SPLIT of grad-values (None for the other kinds): one program under the interpreter
    (``device_programs`` None), else enough to fill the device with >= 8 reduction steps per
    program and the fp32 partials within the cap."""
    if problem.kind not in _WGRAD:
        return None
    bo, bi = problem.block_shape[:2]
    step = config["BLOCK_H"] * config["BLOCK_W"] if "BLOCK_H" in config else config["BLOCK_S"]
    return split_programs(problem.M, step, problem.programs,
                          problem.programs * bo * bi, device_programs)
