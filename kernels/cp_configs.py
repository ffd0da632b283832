"""Launch-config spaces of the CP kernels (``lk3d.kernels.cp``), as data, and what the config
choice needs to know of them. No Triton is imported here.

    cp_conv   ``cp_conv_kernel``: forward and grad-input (with its grad U_in partials)
    cp_grad   ``cp_grad_kernel``: the per-tap sums D and G behind grad A, B, C, U_out, weights
    cp_sep    ``cp_sep_kernel``: one pass of the separable sequence (a projection, or a 1-D pass
              along one axis with its projection epilogue and partial sums)

Keys: BLOCK_M (produced voxels per tile), BLOCK_N (produced channels per epilogue step), BLOCK_K
(reduction elements per step), num_warps, num_stages. SPLIT (how many programs share the voxels
where partial sums are emitted) is derived from the problem and the device, not shipped; SPAN (do
steps span (tap, channel) pairs) is derived by the launcher from the channel count unless a
config names it. ``LK3D_CONFIG`` forces the keys it names, as for the tiled kernels.

``lk3d.tools.aot.cp_cases`` compiles every shipped config for sm_80 and sm_90 (no GPU needed).
The functions below are this family's part of ``lk3d.autotune.configs``; ``problem`` is an
``lk3d.autotune.configs.Problem`` (fields used here: kind, M, KC, NC, taps, rank, partials).
"""
import math

from lk3d.kernels import MAX_PARTIAL_ELEMS, config_spaces, pow2

# Main loop: a [BLOCK_M, BLOCK_K] gather times a [BLOCK_K, R_PAD] projection block; epilogue:
# [BLOCK_M, R_PAD] x [R_PAD, BLOCK_N]. Shared memory ~ stages * (BM + R_PAD) * BK * bytes. The
# gather's [BLOCK_M, BLOCK_K] pointer tile is what fills the registers: BLOCK_K = 64 spilled on
# sm_80 and sm_90 with 4 or 8 warps, as did BM128-N64-K32 with 8 warps (and its fp32 grad-input
# on sm_90 with 4).
CP_CONV_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3),
    # BLOCK_N=64 spilled on Triton 3.9 (M256 fp32; M64 16 B on sm_80, where ptxas 13 aims at 128
    # registers for 8 warps).
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=2),
    dict(BLOCK_M=256, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=2),
]
# Also a [BLOCK_K, BLOCK_M] x [BLOCK_M, R_PAD] dot per step (the per-tap sums) and grad_output
# tiles [BLOCK_M, BLOCK_N] in its prologue and epilogue.
CP_GRAD_CONFIGS = [
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2),
]

# One [BLOCK_M, R_PAD] tile per program: a BLOCK_K-channel projection step or one tap of a 1-D
# pass (a shifted R-channel row per voxel), then BLOCK_N-channel epilogue steps.
CP_SEP_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1),
]

CONFIG_SPACES = config_spaces(globals())  # {kind: <KIND>_CONFIGS above}
# Keys a launch takes beyond its space's (LK3D_CONFIG may force them too).
RUNTIME_KEYS = ("SPLIT", "SPAN")


def r_pad(rank):
    """The rank as the kernels hold it: a power of two, at least 16."""
    return pow2(rank, 16, 1 << 30)


def partial_elems(problem, config):
    """Elements of one program's partial sums (an upper bound)."""
    r = problem.rank
    if problem.kind == "cp_sep":  # taps: the longest axis; NC: the G sums' channels
        return (problem.taps + problem.NC) * r
    if problem.kind == "cp_conv":
        return problem.NC * r
    cols = problem.taps * (problem.KC if problem.KC < config["BLOCK_K"] else 1)
    return (cols + problem.NC) * r


def shared_bytes(config, problem, element_size):
    """Estimated shared memory of one program: the pipelined gather and projection tiles."""
    return (config.get("num_stages", 1) * (config["BLOCK_M"] + r_pad(problem.rank))
            * config["BLOCK_K"] * element_size)


def pick(problem, smem_limit, element_size):
    """A shipped config for a real GPU, by the produced channels (the epilogue's block) and, for
    the forward kernel, the number of voxels (a copy)."""
    configs = CONFIG_SPACES[problem.kind]
    if problem.kind == "cp_sep":
        return dict(configs[0])
    if problem.kind == "cp_conv":
        if problem.NC <= 32:
            return dict(configs[0])
        return dict(configs[2] if problem.M >= (1 << 16) else configs[1])
    return dict(configs[1] if problem.NC <= 32 else configs[0])


def interpreter_config(problem):
    """Few, large programs: the interpreter costs per operation per program, not per element;
    steps spanning (tap, channel) pairs fold the k³ taps into few steps."""
    block_m = pow2(problem.M, 16, 512)
    if problem.kind == "cp_sep":
        return dict(BLOCK_M=block_m, BLOCK_N=pow2(problem.NC, 16, 64),
                    BLOCK_K=pow2(problem.KC, 16, 64))
    block_k = pow2(problem.taps * problem.KC, 16, max(16, (1 << 17) // block_m))
    return dict(BLOCK_M=block_m, BLOCK_N=pow2(problem.NC, 16, 64), BLOCK_K=block_k, SPAN=True)


def split(problem, config, device_programs):
    """Programs of a launch with partial sums (None without): one per tile under the interpreter
    (``device_programs`` None); on a GPU enough to fill it, within the partial-sum memory cap."""
    if not problem.partials:
        return None
    tiles = max(1, math.ceil(problem.M / config["BLOCK_M"]))
    if device_programs is None:
        return tiles
    by_memory = max(1, MAX_PARTIAL_ELEMS // max(1, partial_elems(problem, config)))
    return int(min(tiles, device_programs, by_memory))
