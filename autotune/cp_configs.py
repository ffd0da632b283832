"""Launch-config spaces of the cp kernels (lk3d.kernels.cp), as data.

    cp_conv   ``_cp_conv_kernel``: forward and grad-input (with its grad U_in partials)
    cp_grad   ``_cp_grad_kernel``: the per-tap sums D and G behind grad A, B, C, U_out, weights

Keys: BLOCK_M (produced voxels per tile), BLOCK_N (produced channels per epilogue step), BLOCK_K
(reduction elements per step), num_warps, num_stages. SPLIT (how many programs share the voxels
where partial sums are emitted) is derived from the problem and the device, not shipped; SPAN (do
steps span (tap, channel) pairs) is derived by the launcher from the channel count unless a
config names it. ``LK3D_CONFIG`` forces the keys it names, as for the tiled kernels.

``lk3d.tools.aot.cp_cases`` compiles every shipped config for sm_80 and sm_90 (no GPU needed).
"""
import math
from dataclasses import dataclass

from lk3d.autotune.configs import _device_programs, _forced, _interpreted, _pow2

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

CONFIG_SPACES = {"cp_conv": CP_CONV_CONFIGS, "cp_grad": CP_GRAD_CONFIGS}

# Partial sums are per program, fp32: cap one launch's at this many elements.
_MAX_PARTIAL_ELEMS = 1 << 26


@dataclass(frozen=True)
class CPProblem:
    """What the config choice of a cp kernel looks at."""
    kind: str         # a key of CONFIG_SPACES
    M: int            # produced voxels (output voxels for cp_grad)
    KC: int           # gathered channels
    NC: int           # produced channels
    taps: int         # kd * kh * kw
    rank: int
    partials: bool = False  # whether the launch emits per-program partial sums


def partial_elems(problem: CPProblem, config: dict) -> int:
    """Elements of one program's partial sums (an upper bound)."""
    r = problem.rank
    if problem.kind == "cp_conv":
        return problem.NC * r
    cols = problem.taps * (problem.KC if problem.KC < config["BLOCK_K"] else 1)
    return (cols + problem.NC) * r


def _interpreter_config(problem):
    """Few, large programs: the interpreter costs per operation per program, not per element;
    steps spanning (tap, channel) pairs fold the k³ taps into few steps."""
    block_m = _pow2(problem.M, 16, 512)
    block_k = _pow2(problem.taps * problem.KC, 16, max(16, (1 << 17) // block_m))
    return dict(BLOCK_M=block_m, BLOCK_N=_pow2(problem.NC, 16, 64), BLOCK_K=block_k, SPAN=True)


def _pick(configs, problem):
    """A shipped config for a real GPU, by the produced channels (the epilogue's block) and, for
    the forward kernel, the number of voxels."""
    if problem.kind == "cp_conv":
        if problem.NC <= 32:
            return configs[0]
        return configs[2] if problem.M >= (1 << 16) else configs[1]
    return configs[1] if problem.NC <= 32 else configs[0]


def default_config(problem: CPProblem, device) -> dict:
    """The launch config for ``problem`` on ``device`` (a copy; callers may change it)."""
    configs = CONFIG_SPACES[problem.kind]
    config = _interpreter_config(problem) if _interpreted(device) else dict(_pick(configs, problem))
    config.update({k: v for k, v in _forced().items()
                   if k in configs[0] or k in ("SPLIT", "SPAN")})
    if problem.partials and "SPLIT" not in config:
        config["SPLIT"] = default_split(problem, config, device)
    return config


def default_split(problem: CPProblem, config: dict, device) -> int:
    """Programs for a launch with partial sums: one per tile on the interpreter; on a GPU enough
    to fill it (4 per SM), within the partial-sum memory cap."""
    tiles = max(1, math.ceil(problem.M / config["BLOCK_M"]))
    if _interpreted(device):
        return tiles
    by_memory = max(1, _MAX_PARTIAL_ELEMS // max(1, partial_elems(problem, config)))
    return int(min(tiles, _device_programs(device), by_memory))
