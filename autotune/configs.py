"""Launch-config choice for every kernel family: the default config of a problem, the configs worth
measuring, and ``LK3D_CONFIG``.

A kernel family (``lk3d.kernels.tiled_configs``, ``cp_configs``, ``block_sparse_configs``) holds its
config spaces as data, and the ops layer registers it here (``register``). A family is any object
(its ``*_configs`` module) with:

    CONFIG_SPACES   {kind: [config, ...]}: the shipped configs of each kernel kind, as data
    RUNTIME_KEYS    keys a launch takes beyond its space's (SPLIT, SPAN), which LK3D_CONFIG may set
    pick(problem, smem_limit, element_size) -> config    the default on a GPU (a copy)
    interpreter_config(problem) -> config                the default under the Triton interpreter
    shared_bytes(config, problem, element_size) -> int   estimated shared memory of a program
    split(problem, config, device_programs) -> int | None
        SPLIT (programs sharing a reduction; None where the kind takes none); ``device_programs``
        is None under the interpreter

This module adds what every family shares: the device's limits, ``LK3D_CONFIG`` (a JSON object,
e.g. ``{"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}``, forcing the keys it names on every launch
whose kernel takes them), and the pruning of a space to the configs worth measuring.
"""
import json
import os
from dataclasses import dataclass

import torch

from lk3d.kernels import pow2

_FAMILIES = {}  # kind -> family
SMEM_LIMIT = {8: 163 * 1024, 9: 227 * 1024}  # opt-in bytes per block by major capability
_SMEM_DEFAULT = 99 * 1024


@dataclass(frozen=True)
class Problem:
    """What the config choice looks at; a family reads the fields it needs, the rest keep their
    defaults."""
    kind: str          # a kernel kind: a key of a registered family's CONFIG_SPACES
    M: int             # rows of the implicit GEMM / voxels produced or reduced over
    KC: int = 1        # reduction (gathered) channels per group
    NC: int = 1        # produced channels per group
    taps: int = 1      # kd * kh * kw
    programs: int = 1  # programs the kernel launches before splitting
    partial: int = 1   # elements of one grad-weight partial (one split)
    rank: int = 1      # CP rank
    partials: bool = False  # CP: whether the launch emits per-program partial sums
    block_shape: tuple = (1, 1, 1, 1, 1)  # block-sparse: (bo, bi, bd, bh, bw)


def register(family):
    """Make ``family``'s config spaces known (see the module docstring); registering the same
    family again is a no-op, another family claiming a registered kind a ValueError."""
    for kind in family.CONFIG_SPACES:
        if _FAMILIES.setdefault(kind, family) is not family:
            raise ValueError(f"register: kernel kind {kind!r} is already registered by "
                             f"{_FAMILIES[kind].__name__}")


def family(kind):
    """The family registered for ``kind``."""
    try:
        return _FAMILIES[kind]
    except KeyError:
        raise ValueError(f"kind: expected one of {sorted(_FAMILIES)}, got {kind!r}") from None


def space(kind):
    """The shipped configs of ``kind`` (the family's list itself: do not change it)."""
    return family(kind).CONFIG_SPACES[kind]


def forced():
    """The keys ``LK3D_CONFIG`` forces ({} when unset)."""
    raw = os.environ.get("LK3D_CONFIG", "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"LK3D_CONFIG: expected a JSON object, got {raw!r} ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"LK3D_CONFIG: expected a JSON object, got {raw!r}")
    return value


def interpreted(device):
    """Whether launches on ``device`` run under the Triton interpreter (every device but CUDA)."""
    return device.type != "cuda"


def smem_limit(device):
    """Shared memory one program may use on a CUDA ``device`` (bytes)."""
    return SMEM_LIMIT.get(torch.cuda.get_device_capability(device)[0], _SMEM_DEFAULT)


def device_programs(device):
    """Programs that keep the device busy: 4 per SM on CUDA; None under the interpreter."""
    if interpreted(device):
        return None
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def default_config(problem: Problem, device, element_size: int = 4) -> dict:
    """The launch config for ``problem`` on ``device`` (a copy; callers may change it).
    ``element_size``: bytes per element of the operands (the shared-memory estimate)."""
    device = torch.device(device)
    fam = family(problem.kind)
    if interpreted(device):
        config = fam.interpreter_config(problem)
    else:
        config = fam.pick(problem, smem_limit(device), element_size)
    keys = fam.CONFIG_SPACES[problem.kind][0]
    config.update({k: v for k, v in forced().items() if k in keys or k in fam.RUNTIME_KEYS})
    if "SPLIT" not in config:
        split = fam.split(problem, config, device_programs(device))
        if split is not None:
            config["SPLIT"] = split
    return config


def candidate_configs(problem: Problem, device, element_size: int) -> list:
    """The shipped configs worth measuring for ``problem`` on ``device``: within the device's
    shared memory, and no tile more than twice the problem's extent along its axis."""
    device = torch.device(device)
    if interpreted(device):
        return [default_config(problem, device, element_size)]
    fam = family(problem.kind)
    keep = prune(fam.CONFIG_SPACES[problem.kind], problem, smem_limit(device), element_size)
    programs = device_programs(device)
    for c in keep:
        split = fam.split(problem, c, programs)
        if split is not None:
            c["SPLIT"] = split
    return keep


def prune(configs, problem: Problem, smem_limit: int, element_size: int) -> list:
    """Copies of the configs within ``smem_limit`` bytes of shared memory whose tiles are at most
    twice the problem's extent along their axis; the default pick when none is left."""
    fam = family(problem.kind)
    extent = {"BLOCK_M": problem.M, "BLOCK_N": problem.NC, "BLOCK_CO": problem.NC,
              "BLOCK_CI": problem.KC, "BLOCK": problem.M, "BLOCK_T": problem.taps}
    keep = [dict(c) for c in configs
            if fam.shared_bytes(c, problem, element_size) <= smem_limit
            and all(c[k] <= 2 * pow2(v, 1, 1 << 30) for k, v in extent.items() if k in c)]
    return keep or [fam.pick(problem, smem_limit, element_size)]
