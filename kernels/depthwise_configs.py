"""Launch-config spaces of the channels-innermost depthwise kernels (``lk3d.kernels.depthwise``),
as data, and what the config choice needs to know of them. No Triton is imported here. Which
problems they take: ``lk3d._algos.direct_depthwise``.

Each list is what lk3d ships: every entry is run once under the Triton interpreter and compiled
ahead of time for sm_80 and sm_90 by the tests (no spills). The only shared memory is the
epilogue's (bf16: interleaving the even and odd channels back), a few KB.
"""
from lk3d.kernels import config_spaces, pow2, split_programs

# Forward and stride-1 grad-input: BLOCK_V strips of up to R outputs along W (the launcher fits R
# to the row), BLOCK_C channels. A thread holds R accumulators of one 16-byte channel vector, and
# an input row costs it R + KW - 1 loads for R·KW FMAs per channel. R = 5 spilled outside the loop
# on Triton 3.6 (sm_90, fp32, or bf16 at stride 2), R = 6 on 3.9; 4 warps capped ptxas at 128
# registers on 3.6: one warp each.
CONV3D_DW_CL_CONFIGS = [
    dict(BLOCK_V=16, BLOCK_C=16, R=4, num_warps=1, num_stages=1),
    dict(BLOCK_V=8, BLOCK_C=32, R=4, num_warps=1, num_stages=1),
]
# Grad-weight: steps of BLOCK_V strips of up to R grad-output voxels along W, BLOCK_C channels, a
# strip of up to KT W taps of one (kd, kh) per program (the launcher fits R and KT). A thread
# holds KT accumulators and R grad-output vectors of one 16-byte channel vector; a step costs it
# R + (R - 1)·STR_W + (KT - 1)·DIL_W + 1 loads for R·KT FMAs per channel (R = 6, KT = 7 at stride
# 1: 18 loads for 42). 158-176 registers on sm_80/sm_90, Triton 3.6 and 3.9, no spills; R = 4
# issued 545 instructions a step for 224 FFMA where R = 6 issues 700 for 336.
CONV3D_DW_CL_WGRAD_CONFIGS = [
    dict(BLOCK_V=16, BLOCK_C=16, R=6, KT=8, num_warps=1, num_stages=1),
    dict(BLOCK_V=8, BLOCK_C=32, R=6, KT=8, num_warps=1, num_stages=1),
]

CONFIG_SPACES = config_spaces(globals())  # {kind: <KIND>_CONFIGS above}
RUNTIME_KEYS = ("SPLIT",)

# Channels a thread's 16-byte load must divide evenly for every dtype (8 bf16/fp16, 4 fp32, 2 fp64).
CHANNEL_MULTIPLE = 8


def tap_strip(kw, kt_max):
    """(programs along the W taps, taps per program KT) of the grad-weight: the fewest strips of
    at most ``kt_max`` taps that cover ``kw``, each as short as still covers it."""
    num = -(-kw // kt_max)
    return num, -(-kw // num)


def shared_bytes(config, problem, element_size):
    """No pipelined operand tiles (the epilogue's few KB aside)."""
    return 0


def pick(problem, smem_limit, element_size):
    """A shipped config for a real GPU (``problem.NC``: the channels): the wider channel block
    where it divides the channels (no masked lanes)."""
    configs = CONFIG_SPACES[problem.kind]
    return dict(configs[1] if problem.NC % 32 == 0 else configs[0])


def interpreter_config(problem):
    """Few, large programs: the interpreter costs per operation per program, not per element
    (``problem.M``: for the forward and grad-input, the produced row's length along W)."""
    if problem.kind == "conv3d_dw_cl_wgrad":  # all W taps in one program
        return dict(BLOCK_V=8, BLOCK_C=pow2(problem.NC, 8, 64), R=4, KT=64)
    return dict(BLOCK_V=pow2(-(-problem.M // 4), 1, 64), BLOCK_C=pow2(problem.NC, 8, 64), R=4)


def split(problem, config, device_programs):
    """SPLIT of the grad-weight's reduction over ``problem.M`` voxels (None for the other kinds):
    one program under the interpreter (``device_programs`` None), else enough one-warp programs
    to give each SM 16 warps."""
    if problem.kind != "conv3d_dw_cl_wgrad":
        return None
    if device_programs is not None:
        device_programs = device_programs * 4 // config.get("num_warps", 4)
    return split_programs(problem.M, config["BLOCK_V"] * config["R"], problem.programs,
                          problem.partial, device_programs)
