"""Launch-config space of the tensor-descriptor implicit GEMM (``lk3d.kernels.implicit_gemm``), as
data, what the config choice needs to know of it, and which problems the kernel takes (``fits``:
the ops layer's routing, ``lk3d._algos.descriptor_gemm``, asks it). No Triton is imported here.

Each entry is what lk3d ships: run once under the Triton interpreter and compiled ahead of time for
sm_80 and sm_90 by the tests (no spills, shared memory within the limit). A program's output brick
is BLOCK_H × BLOCK_W = 8 × 16 voxels (BLOCK_M = 128 GEMM rows); BLOCK_K must divide the reduction
channels per group (a box never reads the next group's channels).
"""
import torch

from lk3d.kernels import config_spaces, pow2, split_programs

# Shared memory ~ num_stages · (BLOCK_H·BLOCK_W + BLOCK_N) · BLOCK_K · element size. The first
# (64 -> 64 channels, bf16) issues 180 instructions a step for 8 HGMMA and 2 UTMALDG on sm_90,
# 299 for 64 HMMA and 12 LDGSTS on sm_80 (pointers): above either GPU's tensor peak.
CONV3D_DESC_CONFIGS = [
    dict(BLOCK_H=8, BLOCK_W=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_H=8, BLOCK_W=16, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_H=8, BLOCK_W=16, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=4),
    dict(BLOCK_H=8, BLOCK_W=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=4),
    dict(BLOCK_H=8, BLOCK_W=16, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=4),  # 16·odd
    dict(BLOCK_H=8, BLOCK_W=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=4),
]
# Grad-weight: a program owns a [BLOCK_CO, BLOCK_CI] tile of a strip of TAPS W taps of one
# (kd, kh), one fp32 accumulator each; a step reads one grad-output box of BLOCK_H × BLOCK_W
# voxels (the GEMM's K) for the strip's TAPS input boxes. Shared memory ~ num_stages ·
# BLOCK_H·BLOCK_W · (BLOCK_CO + TAPS·BLOCK_CI) · element size. The first (64 -> 64 channels, 7³,
# bf16) issues 267 instructions a step for 8 HGMMA and 3 UTMALDG on sm_90 (95 registers), 430
# for 64 HMMA and 8 LDGSTS on sm_80 (pointers, 194 registers): above either GPU's tensor peak.
# Four 64 × 64 accumulators (TAPS=4) spill on sm_80 at 4 and 8 warps; an 8 × 16 brick at 64 × 64
# spills 8 B there with int64 offsets (WIDE).
CONV3D_DESC_WGRAD_CONFIGS = [
    dict(BLOCK_H=4, BLOCK_W=16, BLOCK_CO=64, BLOCK_CI=64, TAPS=2, num_warps=4, num_stages=3),
    dict(BLOCK_H=4, BLOCK_W=16, BLOCK_CO=32, BLOCK_CI=32, TAPS=4, num_warps=4, num_stages=3),
    dict(BLOCK_H=8, BLOCK_W=16, BLOCK_CO=16, BLOCK_CI=16, TAPS=4, num_warps=4, num_stages=3),
]

CONFIG_SPACES = config_spaces(globals())  # {kind: <KIND>_CONFIGS above}
RUNTIME_KEYS = ("SPLIT",)  # the grad-weight's

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Reduction channels per group: a multiple of 16 keeps every descriptor stride 16-byte aligned
# (TMA's rule) for every dtype taken, and lets a BLOCK_K of at least 16 (tl.dot's least) divide
# them.
CHANNEL_MULTIPLE = 16


def fits(kc, dtype, stride):
    """Whether the kernel serves a pass reducing over ``kc`` channels per group of ``dtype`` at
    ``stride`` (stride 1 along H and W: a box is a dense brick)."""
    return (dtype in DTYPES and kc > 0 and kc % CHANNEL_MULTIPLE == 0
            and tuple(stride)[1:] == (1, 1))


def block_k(kc):
    """The widest channel block (64, 32 or 16) dividing ``kc`` reduction channels."""
    return next(b for b in (64, 32, 16) if kc % b == 0)


def tap_strip(kw, taps_max):
    """(programs along the W taps, taps per program) of the grad-weight: the fewest strips of at
    most ``taps_max`` taps that cover ``kw``, each as short as still covers it."""
    num = -(-kw // taps_max)
    return num, -(-kw // num)


def shared_bytes(config, problem, element_size):
    """The pipelined operand boxes of one program."""
    rows = config["BLOCK_H"] * config["BLOCK_W"]
    if problem.kind == "conv3d_desc_wgrad":
        cols = config["BLOCK_CO"] + config["TAPS"] * config["BLOCK_CI"]
        return config["num_stages"] * rows * cols * element_size
    return config["num_stages"] * (rows + config["BLOCK_N"]) * config["BLOCK_K"] * element_size


def usable(config, problem):
    """Whether ``config`` can serve ``problem``: its channel blocks divide the channels per group
    (forward, grad-input: BLOCK_K the reduction channels; grad-weight: BLOCK_CO Cout/g (``NC``),
    BLOCK_CI Cin/g (``KC``))."""
    if problem.kind == "conv3d_desc_wgrad":
        return problem.NC % config["BLOCK_CO"] == 0 and problem.KC % config["BLOCK_CI"] == 0
    return problem.KC % config["BLOCK_K"] == 0


def _rank(problem):
    if problem.kind == "conv3d_desc_wgrad":
        return lambda c: (c["BLOCK_CO"] * c["BLOCK_CI"], c["TAPS"], c["BLOCK_H"] * c["BLOCK_W"])
    want = pow2(problem.NC, 16, 128)
    return lambda c: (min(c["BLOCK_N"], want), -c["BLOCK_N"], c["BLOCK_K"])


def pick(problem, smem_limit, element_size):
    """A shipped config for a real GPU (a copy), within ``smem_limit``: forward and grad-input,
    the produced channels' block (up to 128) with the widest channel block that divides the
    reduction channels; grad-weight, the widest channel tile dividing both channel counts."""
    fit = [c for c in CONFIG_SPACES[problem.kind] if usable(c, problem)
           and shared_bytes(c, problem, element_size) <= smem_limit]
    fit = fit or [CONFIG_SPACES[problem.kind][-1]]
    return dict(max(fit, key=_rank(problem)))


def interpreter_config(problem):
    """Few, large programs: the interpreter costs per operation per program."""
    if problem.kind == "conv3d_desc_wgrad":  # every W tap in one program
        return dict(BLOCK_H=8, BLOCK_W=8, BLOCK_CO=block_k(problem.NC),
                    BLOCK_CI=block_k(problem.KC), TAPS=64)
    return dict(BLOCK_H=8, BLOCK_W=8, BLOCK_N=pow2(problem.NC, 16, 64),
                BLOCK_K=block_k(problem.KC))


def split(problem, config, device_programs):
    """SPLIT of the grad-weight's reduction over ``problem.M`` voxels (None for the forward and
    grad-input, which split none): one program under the interpreter (``device_programs``
    None), else enough to fill the device."""
    if problem.kind != "conv3d_desc_wgrad":
        return None
    return split_programs(problem.M, config["BLOCK_H"] * config["BLOCK_W"], problem.programs,
                          problem.partial, device_programs)
