"""Argument checking and normalisation for lk3d's convolutions, done once per call.

Every bad argument raises a ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind,
wrong value) whose message names the argument, what was expected and what was given.
"""
from dataclasses import dataclass
from numbers import Integral

import torch
import torch.nn.functional as F

from lk3d.kernels import out_size  # noqa: F401  (the one output-size formula, re-exported)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Conv3dSpec:
    """A checked convolution: per-axis stride, left/right padding, dilation; groups; shapes."""
    stride: tuple
    pad_left: tuple
    pad_right: tuple
    dilation: tuple
    groups: int
    out_size: tuple

    @property
    def padding(self):
        """The six paddings as the custom ops take them: (d_l, h_l, w_l, d_r, h_r, w_r)."""
        return list(self.pad_left) + list(self.pad_right)


def triple(name, value, minimum=1):
    """``value`` (an int, or a tuple or list of 1 or 3 ints) as a tuple of 3 ints >= ``minimum``,
    else a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (Integral, tuple, list)):
        raise TypeError(f"{name}: expected an int or a tuple of 3 ints, got {value!r} "
                        f"({type(value).__name__})")
    vals = (value,) * 3 if isinstance(value, Integral) else tuple(value)
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or any(isinstance(v, bool) or not isinstance(v, Integral) for v in vals):
        raise TypeError(f"{name}: expected an int or a tuple of 3 ints, got {value!r}")
    if any(v < minimum for v in vals):
        what = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name}: expected {what} values, got {value!r}")
    return tuple(int(v) for v in vals)


def positive_int(name, value):
    """``value`` as an int >= 1, else a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name}: expected a positive int, got {value!r} "
                        f"({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)


def check_tensor(name, t, dims=None, layout=torch.strided):
    """``t`` a tensor of ``layout`` (dense strided unless told) with a floating dtype and, when
    ``dims`` is given, one of those numbers of dimensions; else a TypeError/ValueError naming
    ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.is_nested:
        raise TypeError(f"{name}: expected a tensor of layout {layout}, got a nested tensor")
    if t.layout != layout:
        hint = " (convert it with .to_dense())" if layout == torch.strided else ""
        raise TypeError(f"{name}: expected a tensor of layout {layout}, got layout "
                        f"{t.layout}{hint}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), "
                        f"got {t.dtype}")
    if dims is not None and t.dim() not in dims:
        shape = "or ".join(f"{d}-D " for d in dims)
        raise ValueError(f"{name}: expected a {shape}tensor, got {t.dim()}-D with shape "
                         f"{tuple(t.shape)}")


def batched(input):
    """``(input, unbatched)``: a 4-D or 5-D ``input`` checked and given a batch dim if it had
    none."""
    check_tensor("input", input, (4, 5))
    return (input.unsqueeze(0), True) if input.dim() == 4 else (input, False)


def check_same(name, t, ref, ref_name="input"):
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), "
                        f"got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), "
                         f"got {t.device}")


def extent(kernel, dilation):
    """The dilated kernel's extent per axis: ``d·(k - 1) + 1``."""
    return tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))


def pad_order(padding):
    """``F.pad``'s order (w_l, w_r, h_l, h_r, d_l, d_r) of the six paddings the ops take,
    (d_l, h_l, w_l, d_r, h_r, w_r)."""
    return [v for i in (2, 1, 0) for v in (padding[i], padding[3 + i])]


def zero_pad(x, padding):
    """``x`` zero-padded by the six paddings the ops take, (d_l, h_l, w_l, d_r, h_r, w_r)."""
    return F.pad(x, pad_order(padding))


def empty(shape, like, memory_format=torch.contiguous_format):
    """An uninitialised tensor with ``like``'s dtype and device."""
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)


def check_conv3d(input, weight, bias, stride, padding, dilation, groups) -> Conv3dSpec:
    """Check the arguments of ``conv3d`` (``input`` 5-D here) and return the normalised spec."""
    check_tensor("input", input, (5,))
    check_tensor("weight", weight, (5,))
    check_same("weight", weight, input)
    if bias is not None:
        check_tensor("bias", bias, (1,))
        check_same("bias", bias, input)
    groups = positive_int("groups", groups)
    stride = triple("stride", stride)
    dilation = triple("dilation", dilation)
    check_group_channels(input.shape[1], tuple(weight.shape), groups)
    cout, kernel = weight.shape[0], tuple(weight.shape[2:])
    if min(kernel) < 1 or cout < 1:
        raise ValueError(f"weight: expected non-empty kernel and output channels, got shape "
                         f"{tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f"bias: expected shape ({cout},) to match weight's output channels, "
                         f"got {tuple(bias.shape)}")

    return geometry(input.shape[2:], kernel, stride, padding, dilation, groups)


def check_group_channels(cin, weight_shape, groups):
    """``groups`` (a positive int) divides the input's ``cin`` channels and the ``weight_shape``'s
    output channels, and ``weight_shape[1]`` is ``cin / groups``; else a ValueError."""
    cout = weight_shape[0]
    if cin % groups:
        raise ValueError(f"groups: expected a divisor of the input's {cin} channels, got {groups}")
    if cout % groups:
        raise ValueError(f"groups: expected a divisor of weight's {cout} output channels, "
                         f"got {groups}")
    if weight_shape[1] != cin // groups:
        raise ValueError(f"weight: expected shape[1] = in_channels / groups = {cin} / {groups} = "
                         f"{cin // groups}, got weight of shape {tuple(weight_shape)}")


def check_padding(padding, stride):
    """``padding`` as the user gave it, checked: ``"same"`` (``stride`` a checked triple of ones)
    or ``"valid"`` as they are, else a triple of ints >= 0."""
    if not isinstance(padding, str):
        return triple("padding", padding, 0)
    if padding not in ("same", "valid"):
        raise ValueError(f"padding: expected 'same', 'valid', an int or a tuple of 3 ints, "
                         f"got {padding!r}")
    if padding == "same" and stride != (1, 1, 1):
        raise ValueError(f"padding: 'same' expects stride 1, got stride {stride}")
    return padding


def padding_sides(padding, kernel, dilation):
    """``(pad_left, pad_right)``, a triple each, of a ``check_padding``-ed ``padding``: ``"same"``
    puts the odd voxel of an even extent on the right, as ``F.conv3d`` does."""
    if padding == "valid":
        return (0, 0, 0), (0, 0, 0)
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return tuple(t // 2 for t in total), tuple(t - t // 2 for t in total)
    return tuple(padding), tuple(padding)


def geometry(spatial, kernel, stride, padding, dilation, groups=1, kernel_arg="weight"):
    """The spec of a convolution of ``kernel`` over ``spatial``: ``stride`` and ``dilation``
    already checked triples, ``padding`` as the user gave it (checked here). A kernel that does
    not fit the padded input is an error on ``kernel_arg``."""
    pad_left, pad_right = padding_sides(check_padding(padding, stride), kernel, dilation)
    spatial = tuple(spatial)
    out = out_size(spatial, kernel, stride, pad_left + pad_right, dilation)
    if min(out) < 1:
        padded = tuple(s + pl + pr for s, pl, pr in zip(spatial, pad_left, pad_right))
        raise ValueError(f"{kernel_arg}: kernel extent {extent(kernel, dilation)} (kernel "
                         f"{kernel}, dilation "
                         f"{dilation}) is larger than the padded input {padded}")
    return Conv3dSpec(stride, pad_left, pad_right, dilation, groups, out)
