"""lk3d.kernels: the @triton.jit kernels, one family per module, each with thin launchers.

    tiled.py, tiled_configs.py                dense, grouped and depthwise conv3d
    depthwise.py, depthwise_configs.py        depthwise conv3d on channels-innermost tensors
    implicit_gemm.py, implicit_gemm_configs.py
                                              dense and grouped conv3d on channels-innermost
                                              tensors, read through tensor descriptors
    cp.py, cp_configs.py                      rank-R CP conv3d, fused
    block_sparse.py, block_sparse_configs.py  block-sparse conv3d
    block_sparse_desc.py                      ... channel blocks on channels-innermost tensors,
                                              read through tensor descriptors
    common.py                                 what every family shares: the index and load
                                              helpers its kernels call, and its launchers' helpers
    weight_cache.py                           the launchers' weight copies (packed weights),
                                              kept per weight version (no Triton)

A family's ``*_configs`` module holds its launch-config space as data, one ``<KIND>_CONFIGS``
list per kernel kind (``config_spaces`` gathers them into its ``CONFIG_SPACES``), and the few
facts the config choice needs: the default per problem, the shared memory a config takes. It
imports neither Triton nor anything of lk3d but this package, so the planner can name a config
space (hash it into the plan cache key) where Triton does not import. A launcher takes one
explicit config, and padding as six ints ``(d_l, h_l, w_l, d_r, h_r, w_r)``; nothing here imports
``lk3d.autotune`` or the ops layer.

``HAS_TRITON`` says whether Triton is installed here (Linux x86_64 wheels); ``INTERPRETED`` whether
its interpreter runs the kernels on CPU tensors (``TRITON_INTERPRET`` set to a true value when lk3d
is imported). Triton itself is imported only then, or when a kernel module is first imported (the
ops layer does that at a kernel's first launch): ``import lk3d`` on the CPU does not import it.
What this module itself defines needs no Triton.
"""
import importlib.util
import math
import os

import torch

# Voxels of one sample (per channel) the kernels index: in int32, see lk3d.kernels.common.wide.
MAX_VOLUME = 2 ** 31 - 1
# Elements of the fp32 partial sums one launch may write (grad-weight and CP launches split a
# reduction over programs that each write their own partials): a cap on their memory.
MAX_PARTIAL_ELEMS = 1 << 26


def memory_format(t: torch.Tensor):
    """The layout of a result made from ``t``: channels_last_3d when ``t`` is laid out so (and not
    also NCDHW-contiguous), else NCDHW-contiguous; as aten's convolutions do."""
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def out_size(spatial, kernel, stride, padding, dilation):
    """Output extent per axis of a convolution of ``kernel`` over ``spatial``; ``padding`` six
    ints ``(d_l, h_l, w_l, d_r, h_r, w_r)``."""
    return tuple((s + pl + pr - d * (k - 1) - 1) // st + 1 for s, k, st, pl, pr, d in
                 zip(spatial, kernel, stride, padding[:3], padding[3:], dilation))


def pow2(n, lo, hi):
    """The power of two at or above ``n``, clamped to ``[lo, hi]``."""
    return max(lo, min(hi, 1 << max(0, math.ceil(math.log2(max(1, n))))))


def config_spaces(namespace):
    """A family's ``CONFIG_SPACES`` ({kind: configs}) from the globals of its ``*_configs``
    module: each ``<KIND>_CONFIGS`` list there is the space of kernel kind ``<kind>``
    (``CONV3D_FWD_CONFIGS`` that of ``conv3d_fwd``), in the order defined, so a space is named
    once. A ValueError for an empty space or one whose configs name different keys: the first
    config's keys stand for the space's where ``LK3D_CONFIG`` forces keys."""
    spaces = {}
    for name, configs in namespace.items():
        if not name.endswith("_CONFIGS"):
            continue
        if not configs or any(c.keys() != configs[0].keys() for c in configs):
            raise ValueError(f"{name}: expected a non-empty list of configs that all name the "
                             f"same keys, got {configs}")
        spaces[name[:-len("_CONFIGS")].lower()] = configs
    return spaces


def split_programs(M, block, programs, partial, device_programs):
    """How many programs share a reduction of ``M`` voxels (``block`` per step) in a launch of
    ``programs`` programs before splitting, each split writing ``partial`` elements of partial
    sums: enough to fill a device that keeps ``device_programs`` busy, at least 8 reduction steps
    per program, and the partials within ``MAX_PARTIAL_ELEMS``. One under the interpreter
    (``device_programs`` None), which runs programs one after another."""
    if device_programs is None:
        return 1
    want = max(1, device_programs // max(1, programs))
    by_work = max(1, M // (8 * block))
    by_memory = max(1, MAX_PARTIAL_ELEMS // max(1, partial))
    return int(min(want, by_work, by_memory))


def _interpret_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (Triton reads it as a bool)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y")


HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = False
if HAS_TRITON and _interpret_requested():
    try:
        from triton.runtime.interpreter import InterpretedFunction

        from lk3d.kernels import common

        INTERPRETED = isinstance(common.tap_coord, InterpretedFunction)
    except ImportError:  # installed but not importable here: every op takes its torch path
        HAS_TRITON = False


_FAMILIES = ("common", "tiled", "depthwise", "implicit_gemm", "cp", "block_sparse",
             "block_sparse_desc")


def __getattr__(name):
    """A kernel module on first use (``lk3d.kernels.tiled``): Triton is imported then, not with
    this package."""
    if name in _FAMILIES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
