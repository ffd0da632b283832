"""Launch-config space of the tensor-descriptor implicit GEMM (``lk3d.kernels.implicit_gemm``), as
data, what the config choice needs to know of it, and which problems the kernel takes (``fits``:
the ops layer's routing, ``lk3d._algos.descriptor_gemm``, asks it). No Triton is imported here.

Each entry is what lk3d ships: run once under the Triton interpreter and compiled ahead of time for
sm_80 and sm_90 by the tests (no spills, shared memory within the limit). A program's output brick
is BLOCK_H × BLOCK_W = 8 × 16 voxels (BLOCK_M = 128 GEMM rows); BLOCK_K must divide the reduction
channels per group (a box never reads the next group's channels).
"""
import torch

from lk3d.kernels import config_spaces, pow2

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

CONFIG_SPACES = config_spaces(globals())  # {kind: <KIND>_CONFIGS above}
RUNTIME_KEYS = ()

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


def shared_bytes(config, problem, element_size):
    """The pipelined operand boxes of one program."""
    rows = config["BLOCK_H"] * config["BLOCK_W"]
    return config["num_stages"] * (rows + config["BLOCK_N"]) * config["BLOCK_K"] * element_size


def usable(config, problem):
    """Whether ``config`` can serve ``problem``: its BLOCK_K divides the reduction channels."""
    return problem.KC % config["BLOCK_K"] == 0


def pick(problem, smem_limit, element_size):
    """A shipped config for a real GPU (a copy): the produced channels' block (up to 128) with the
    widest channel block that divides the reduction channels, within ``smem_limit``."""
    want = pow2(problem.NC, 16, 128)
    fit = [c for c in CONFIG_SPACES[problem.kind] if usable(c, problem)
           and shared_bytes(c, problem, element_size) <= smem_limit]
    fit = fit or [CONFIG_SPACES[problem.kind][-1]]
    return dict(max(fit, key=lambda c: (min(c["BLOCK_N"], want), -c["BLOCK_N"], c["BLOCK_K"])))


def interpreter_config(problem):
    """Few, large programs: the interpreter costs per operation per program."""
    return dict(BLOCK_H=8, BLOCK_W=8, BLOCK_N=pow2(problem.NC, 16, 64),
                BLOCK_K=block_k(problem.KC))


def split(problem, config, device_programs):
    """No reduction is split."""
    return None
