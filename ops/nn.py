"""``lk3d.nn``: a drop-in ``Conv3d`` module and ``convert``, which swaps one into a model.

    conv = lk3d.nn.Conv3d(32, 32, 7, padding=3, groups=32)       # like torch.nn.Conv3d
    model = lk3d.nn.convert(model, min_kernel_size=5)            # swap the large nn.Conv3d

``Conv3d`` subclasses ``torch.nn.Conv3d``: same constructor, initialisation, parameters
(``weight``, ``bias``), ``state_dict`` keys and ``padding_mode`` handling, and
``isinstance(m, torch.nn.Conv3d)`` holds. Only the convolution itself changes: it runs
``lk3d.conv3d``, so one converted module is one ``lk3d::conv3d`` node under ``torch.compile``
(plus an ``F.pad`` for the ``reflect``/``replicate``/``circular`` padding modes, as in torch).

``convert`` takes the dense form only for now (``to="dense"``); the CP and block-sparse forms of
DESIGN.md will come in as further values of ``to``.
"""
import copy
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import nn

from lk3d.functional import conv3d

__all__ = ["Conv3d", "convert"]

_CONVERT_TO = ("dense",)


class Conv3d(nn.Conv3d):
    """``torch.nn.Conv3d`` running on ``lk3d.conv3d``; see ``torch.nn.Conv3d`` for the arguments.

    Its ``repr`` reads ``lk3d.nn.Conv3d(...)`` so a printed model shows which convolutions were
    converted; everything else (arguments, state, initialisation) is ``torch.nn.Conv3d``'s.
    """

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            # As torch does: pad explicitly (also for padding="same"), then convolve unpadded.
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv3d(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv3d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _get_name(self):
        return "lk3d.nn.Conv3d"


def convert(model, min_kernel_size=5, inplace=False, to="dense"):
    """Swap every ``torch.nn.Conv3d`` in ``model`` whose largest kernel side is at least
    ``min_kernel_size`` for an ``lk3d.nn.Conv3d``, and return the model.

    ``model`` may itself be an ``nn.Conv3d``. A swapped module keeps its configuration, its
    ``Parameter`` objects (so data, device, dtype and ``requires_grad``), training mode, hooks and
    any other attribute: it is the same object with its class changed to ``lk3d.nn.Conv3d`` (a
    subclass adding no state, so the change is exact). Shared modules stay shared. With
    ``inplace=False`` (the default) ``model`` is deep-copied first and left untouched; with
    ``inplace=True`` it is converted in place, and an optimizer built on its parameters still
    holds the right ones. Only modules of type exactly ``nn.Conv3d`` are swapped: subclasses
    (custom ``forward``, parametrized weights) are left as they are. ``to`` picks the form of the
    large kernels; only ``"dense"`` (the same weights on lk3d's kernels) exists so far.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(min_kernel_size, bool) or not isinstance(min_kernel_size, Integral):
        raise TypeError(f"min_kernel_size: expected a positive int, got {min_kernel_size!r} "
                        f"({type(min_kernel_size).__name__})")
    if min_kernel_size < 1:
        raise ValueError(f"min_kernel_size: expected a positive int, got {min_kernel_size}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace: expected a bool, got {inplace!r} ({type(inplace).__name__})")
    if not isinstance(to, str) or to not in _CONVERT_TO:
        supported = ", ".join(repr(t) for t in _CONVERT_TO)
        raise ValueError(f"to: expected one of {supported} (the forms supported so far), "
                         f"got {to!r}")

    if not inplace:
        model = copy.deepcopy(model)
    for module in model.modules():
        if type(module) is nn.Conv3d and max(module.kernel_size) >= min_kernel_size:
            module.__class__ = Conv3d
    return model
