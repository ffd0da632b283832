"""lk3d.kernels: the @triton.jit kernels, one file per algorithm, each with thin launchers.

``HAS_TRITON`` says whether Triton imports here (Linux x86_64 wheels); ``INTERPRETED`` whether its
interpreter runs the kernels on CPU tensors (``TRITON_INTERPRET=1`` set before Triton's import).
"""
import torch

# Voxels of one sample (per channel) the kernels index: in int32, see lk3d.kernels._index.wide.
MAX_VOLUME = 2 ** 31 - 1


def memory_format(t: torch.Tensor):
    """The layout of a result made from ``t``: channels_last_3d when ``t`` is laid out so (and not
    also NCDHW-contiguous), else NCDHW-contiguous; as aten's convolutions do."""
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


try:
    import triton  # noqa: F401
    from triton.runtime.interpreter import InterpretedFunction

    from lk3d.kernels import tiled

    HAS_TRITON = True
    INTERPRETED = isinstance(tiled._conv3d_igemm_kernel, InterpretedFunction)
except ImportError:  # no Triton on this platform: every op takes its torch path
    HAS_TRITON = False
    INTERPRETED = False
