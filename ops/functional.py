"""``lk3d.conv3d``: ``torch.nn.functional.conv3d`` semantics on lk3d's kernels."""

from lk3d._conv_ops import conv3d_op, plan
from lk3d._spec import batched, check_conv3d
from lk3d.autotune.select import Plans


def conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """3D convolution with exactly the semantics of ``torch.nn.functional.conv3d``.

    ``input`` is ``[N, Cin, D, H, W]`` or unbatched ``[Cin, D, H, W]``; ``weight`` is
    ``[Cout, Cin/groups, kd, kh, kw]``; ``stride``, ``dilation`` and ``padding`` take an int or a
    tuple of 3, and ``padding`` also ``"same"`` (stride 1 only) or ``"valid"``. Dense, grouped and
    depthwise (with channel multiplier) convolutions run on Triton kernels on CUDA; CPU tensors take
    aten (or the kernels under ``TRITON_INTERPRET=1``). The result has the input's dtype and
    memory format. Differentiable in input, weight and bias; one node under ``torch.compile``.
    """
    input, unbatched = batched(input)
    spec = check_conv3d(input, weight, bias, stride, padding, dilation, groups)
    out = conv3d_op(input, weight, bias, list(spec.stride), spec.padding, list(spec.dilation),
                    spec.groups)
    return out.squeeze(0) if unbatched else out


def explain(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """The plans ``conv3d`` would use for these arguments, without running anything.

    Returns an ``lk3d.autotune.select.Plans``: a dict ``{"forward": plan, "grad_input": plan,
    "grad_weight": plan}``, each plan a dict with the algorithm (``tiled``/``fft``/``aten``), the
    launch config (None: the default), where the choice came from
    (``forced``/``cache``/``seed``/``measured``/``model``), the problem key and the measured or
    modelled milliseconds per candidate; printed, it is a table of the three. Only the shapes,
    dtype and device of the tensors matter (``lk3d explain`` passes zero-stride stand-ins).
    """
    input, _ = batched(input)
    spec = check_conv3d(input, weight, bias, stride, padding, dilation, groups)
    geometry = (list(spec.stride), spec.padding, list(spec.dilation), spec.groups)
    x_shape, w_shape = list(input.shape), list(weight.shape)
    title = (f"lk3d.conv3d on {input.device}, {str(input.dtype).removeprefix('torch.')}: input "
             f"{tuple(x_shape)}, weight {tuple(w_shape)}, stride {_text(stride)}, padding "
             f"{_text(padding)}, dilation {_text(dilation)}, groups {spec.groups}")
    return Plans({name: plan(op, input, x_shape, w_shape, *geometry, spec.out_size).as_dict()
                  for name, op in (("forward", "conv3d"), ("grad_input", "conv3d_grad_input"),
                                   ("grad_weight", "conv3d_grad_weight"))}, title)


def _text(value):
    """An argument as the user wrote it: ``same``, ``3``, ``(1, 2, 3)``."""
    return value if isinstance(value, str) else str(tuple(value) if isinstance(value, list)
                                                   else value)
