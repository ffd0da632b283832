"""Launch-config spaces for the tiled conv3d kernels, as data, and the default pick.

Each list is what lk3d ships: every entry is run once under the Triton interpreter and compiled
ahead of time for sm_80 and sm_90 by the tests (no spills, shared memory within the limit).
``LK3D_CONFIG`` (a JSON object, e.g. ``{"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}``) forces the
keys it names on every launch whose kernel takes them; the per-device cache and the measured choice
come with the autotune layer.

SPLIT (the number of programs sharing one spatial reduction in the weight/bias gradients) is not a
compile-time setting: it is derived from the problem and the device by ``default_config``.
"""
import json
import math
import os
from dataclasses import dataclass

import torch

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

CONFIG_SPACES = {
    "conv3d_fwd": CONV3D_FWD_CONFIGS,
    "conv3d_dw": CONV3D_DW_CONFIGS,
    "conv3d_wgrad": CONV3D_WGRAD_CONFIGS,
    "conv3d_dw_wgrad": CONV3D_DW_WGRAD_CONFIGS,
    "bias_grad": BIAS_GRAD_CONFIGS,
}

# Grad-weight partials are SPLIT copies of the weight in fp32: cap them at this many elements.
_MAX_PARTIAL_ELEMS = 1 << 26


@dataclass(frozen=True)
class Problem:
    """What the config choice looks at."""
    kind: str          # a key of CONFIG_SPACES
    M: int             # rows of the implicit GEMM / voxels reduced over
    KC: int = 1        # reduction channels per group
    NC: int = 1        # produced channels per group
    taps: int = 1      # kd * kh * kw
    programs: int = 1  # programs the kernel launches before splitting
    partial: int = 1   # elements of one grad-weight partial (one split)


def _pow2(n, lo, hi):
    return max(lo, min(hi, 1 << max(0, math.ceil(math.log2(max(1, n))))))


def _device_programs(device):
    """Programs that keep the device busy: 4 per SM on CUDA."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _interpreted(device):
    return device.type != "cuda"


def _pick(configs, problem):
    """A shipped config for a real GPU, by the channel counts of the problem."""
    if problem.kind == "conv3d_fwd":
        want = _pow2(problem.NC, 16, 128)
        return next((c for c in configs if c["BLOCK_N"] >= want and c["BLOCK_M"] == 128),
                    configs[-2])
    if problem.kind == "conv3d_dw":
        return configs[1] if problem.M >= 4096 else configs[0]
    if problem.kind == "conv3d_wgrad":
        want = max(_pow2(problem.NC, 16, 64), _pow2(problem.KC, 16, 64))
        return next(c for c in configs if c["BLOCK_CO"] >= want)
    return configs[0]


def _interpreter_config(problem):
    """Few, large programs: the interpreter costs per operation per program, not per element."""
    if problem.kind == "conv3d_fwd":
        return dict(BLOCK_M=_pow2(problem.M, 16, 1024), BLOCK_N=_pow2(problem.NC, 16, 64),
                    BLOCK_K=_pow2(problem.KC, 16, 64))
    if problem.kind == "conv3d_dw":
        return dict(BLOCK=_pow2(problem.M, 16, 4096))
    if problem.kind == "conv3d_wgrad":
        return dict(BLOCK_CO=_pow2(problem.NC, 16, 64), BLOCK_CI=_pow2(problem.KC, 16, 64),
                    BLOCK_K=_pow2(problem.M, 16, 1024))
    if problem.kind == "conv3d_dw_wgrad":
        return dict(BLOCK_T=_pow2(problem.taps, 16, 512), BLOCK_S=_pow2(problem.M, 16, 512))
    return dict(BLOCK_S=_pow2(problem.M, 16, 4096))


def _forced():
    raw = os.environ.get("LK3D_CONFIG", "").strip()
    if not raw:
        return {}
    try:
        forced = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"LK3D_CONFIG: expected a JSON object, got {raw!r} ({e})") from None
    if not isinstance(forced, dict):
        raise ValueError(f"LK3D_CONFIG: expected a JSON object, got {raw!r}")
    return forced


_SMEM_LIMIT = {8: 163 * 1024, 9: 227 * 1024}  # opt-in bytes per block by major capability


def shared_bytes(kind: str, config: dict, element_size: int) -> int:
    """Estimated shared memory of one program: the pipelined operand tiles of a tl.dot."""
    stages = config.get("num_stages", 1)
    if kind == "conv3d_fwd":
        return stages * (config["BLOCK_M"] + config["BLOCK_N"]) * config["BLOCK_K"] * element_size
    if kind == "conv3d_wgrad":
        return stages * (config["BLOCK_CO"] + config["BLOCK_CI"]) * config["BLOCK_K"] * element_size
    return 0


def candidate_configs(problem: Problem, device: torch.device, element_size: int) -> list:
    """The shipped configs worth measuring for ``problem`` on ``device``: within the device's
    shared memory, and no tile more than twice the problem's extent along its axis."""
    if _interpreted(device):
        return [default_config(problem, device)]
    major = torch.cuda.get_device_capability(device)[0]
    keep = prune(CONFIG_SPACES[problem.kind], problem, _SMEM_LIMIT.get(major, 99 * 1024),
                 element_size)
    if problem.kind in ("conv3d_wgrad", "conv3d_dw_wgrad", "bias_grad"):
        for c in keep:
            c["SPLIT"] = default_split(problem, c, device)
    return keep


def prune(configs, problem: Problem, smem_limit: int, element_size: int) -> list:
    """Copies of the configs within ``smem_limit`` bytes of shared memory whose tiles are at most
    twice the problem's extent along their axis; the default pick when none is left."""
    extent = {"BLOCK_M": problem.M, "BLOCK_N": problem.NC, "BLOCK_CO": problem.NC,
              "BLOCK_CI": problem.KC, "BLOCK": problem.M, "BLOCK_T": problem.taps}
    keep = [dict(c) for c in configs
            if shared_bytes(problem.kind, c, element_size) <= smem_limit
            and all(c[k] <= 2 * _pow2(v, 1, 1 << 30) for k, v in extent.items() if k in c)]
    return keep or [dict(_pick(configs, problem))]


def default_config(problem: Problem, device: torch.device) -> dict:
    """The launch config for ``problem`` on ``device`` (a copy; callers may change it)."""
    configs = CONFIG_SPACES[problem.kind]
    if _interpreted(device):
        config = _interpreter_config(problem)
    else:
        config = dict(_pick(configs, problem))
    config.update({k: v for k, v in _forced().items() if k in configs[0] or k == "SPLIT"})
    if problem.kind in ("conv3d_wgrad", "conv3d_dw_wgrad", "bias_grad") and "SPLIT" not in config:
        config["SPLIT"] = default_split(problem, config, device)
    return config


def default_split(problem: Problem, config: dict, device: torch.device) -> int:
    """Split a reduction over voxels until the launch fills the device, within the partial cap."""
    if _interpreted(device):
        return 1
    block = config.get("BLOCK_K", config.get("BLOCK_S", 128))
    want = max(1, _device_programs(device) // max(1, problem.programs))
    by_work = max(1, problem.M // (8 * block))  # keep >= 8 reduction steps per program
    by_memory = max(1, _MAX_PARTIAL_ELEMS // max(1, problem.partial))
    return int(min(want, by_work, by_memory))
