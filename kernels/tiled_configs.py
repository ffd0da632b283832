"""Launch-config spaces of the tiled conv3d kernels (``lk3d.kernels.tiled``), as data, and what the
config choice needs to know of them. No Triton is imported here.

Each list is what lk3d ships: every entry is run once under the Triton interpreter and compiled
ahead of time for sm_80 and sm_90 by the tests (no spills, shared memory within the limit).
``LK3D_CONFIG`` (a JSON object, e.g. ``{"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}``) forces the
keys it names on every launch whose kernel takes them (``lk3d.autotune.configs``).

SPLIT (the number of programs sharing one spatial reduction in the weight/bias gradients) is not a
compile-time setting: it is derived from the problem and the device (``split``).

The functions below are this family's part of ``lk3d.autotune.configs``; ``problem`` is an
``lk3d.autotune.configs.Problem`` (fields used here: kind, M, KC, NC, taps, programs, partial).
"""
from lk3d.kernels import config_spaces, pow2, split_programs

# Implicit GEMM (forward and grad-input). Shared memory ~ stages * (BM*BK + BK*BN) * bytes.
CONV3D_FWD_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=3),  # 4 warps spill on sm_80
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),  # K64 spills on sm_80
]
# Depthwise forward and grad-input: output voxels per program.
CONV3D_DW_CONFIGS = [
    dict(BLOCK=128, num_warps=4, num_stages=1),
    dict(BLOCK=256, num_warps=8, num_stages=1),
    # One voxel per thread: with two (BLOCK=256 on 4 warps, 512 on 8) ptxas 13 aims at 80
    # registers and spills 8 B on sm_80; BLOCK=512 spilled on 4, 8 or 16 warps, by arch and
    # Triton version. Left so until the depthwise kernel is redesigned.
]
# Dense/grouped grad-weight: a GEMM per tap over (Cout/g, Cin/g), reducing over voxels.
CONV3D_WGRAD_CONFIGS = [
    dict(BLOCK_CO=16, BLOCK_CI=16, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_CO=32, BLOCK_CI=32, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_CO=64, BLOCK_CI=64, BLOCK_K=32, num_warps=4, num_stages=3),
]
# Depthwise grad-weight: BLOCK_T taps share each grad-output load of BLOCK_S voxels.
CONV3D_DW_WGRAD_CONFIGS = [
    dict(BLOCK_T=16, BLOCK_S=128, num_warps=4, num_stages=1),
    dict(BLOCK_T=32, BLOCK_S=128, num_warps=8, num_stages=1),
]
BIAS_GRAD_CONFIGS = [
    dict(BLOCK_S=1024, num_warps=4, num_stages=1),
]

CONFIG_SPACES = config_spaces(globals())  # {kind: <KIND>_CONFIGS above}
# Keys a launch takes beyond its space's (LK3D_CONFIG may force them too).
RUNTIME_KEYS = ("SPLIT",)
_SPLIT_KINDS = ("conv3d_wgrad", "conv3d_dw_wgrad", "bias_grad")


def shared_bytes(config, problem, element_size):
    """Estimated shared memory of one program: the pipelined operand tiles of a tl.dot."""
    stages = config.get("num_stages", 1)
    if problem.kind == "conv3d_fwd":
        return stages * (config["BLOCK_M"] + config["BLOCK_N"]) * config["BLOCK_K"] * element_size
    if problem.kind == "conv3d_wgrad":
        return stages * (config["BLOCK_CO"] + config["BLOCK_CI"]) * config["BLOCK_K"] * element_size
    return 0


def pick(problem, smem_limit, element_size):
    """A shipped config for a real GPU, by the channel counts of the problem (a copy)."""
    configs = CONFIG_SPACES[problem.kind]
    if problem.kind == "conv3d_fwd":
        want = pow2(problem.NC, 16, 128)
        return dict(next((c for c in configs if c["BLOCK_N"] >= want and c["BLOCK_M"] == 128),
                         configs[-2]))
    if problem.kind == "conv3d_dw":
        return dict(configs[1] if problem.M >= 4096 else configs[0])
    if problem.kind == "conv3d_wgrad":
        want = max(pow2(problem.NC, 16, 64), pow2(problem.KC, 16, 64))
        return dict(next(c for c in configs if c["BLOCK_CO"] >= want))
    return dict(configs[0])


def interpreter_config(problem):
    """Few, large programs: the interpreter costs per operation per program, not per element."""
    if problem.kind == "conv3d_fwd":
        return dict(BLOCK_M=pow2(problem.M, 16, 1024), BLOCK_N=pow2(problem.NC, 16, 64),
                    BLOCK_K=pow2(problem.KC, 16, 64))
    if problem.kind == "conv3d_dw":
        return dict(BLOCK=pow2(problem.M, 16, 4096))
    if problem.kind == "conv3d_wgrad":
        return dict(BLOCK_CO=pow2(problem.NC, 16, 64), BLOCK_CI=pow2(problem.KC, 16, 64),
                    BLOCK_K=pow2(problem.M, 16, 1024))
    if problem.kind == "conv3d_dw_wgrad":
        return dict(BLOCK_T=pow2(problem.taps, 16, 512), BLOCK_S=pow2(problem.M, 16, 512))
    return dict(BLOCK_S=pow2(problem.M, 16, 4096))


def split(problem, config, device_programs):
    """SPLIT of the reductions over voxels (None for the kinds without one): one program under
    the interpreter (``device_programs`` None), else enough to fill the device."""
    if problem.kind not in _SPLIT_KINDS:
        return None
    block = config.get("BLOCK_K", config.get("BLOCK_S", 128))
    return split_programs(problem.M, block, problem.programs, problem.partial, device_programs)
