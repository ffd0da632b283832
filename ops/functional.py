"""``lk3d.conv3d``: ``torch.nn.functional.conv3d`` semantics on lk3d's kernels."""
import torch

from lk3d._conv_ops import conv3d_op
from lk3d._spec import check_conv3d, check_tensor


def conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """3D convolution with exactly the semantics of ``torch.nn.functional.conv3d``.

    ``input`` is ``[N, Cin, D, H, W]`` or unbatched ``[Cin, D, H, W]``; ``weight`` is
    ``[Cout, Cin/groups, kd, kh, kw]``; ``stride``, ``dilation`` and ``padding`` take an int or a
    tuple of 3, and ``padding`` also ``"same"`` (stride 1 only) or ``"valid"``. Dense, grouped and
    depthwise (with channel multiplier) convolutions run on Triton kernels on CUDA; CPU tensors take
    aten (or the kernels under ``TRITON_INTERPRET=1``). The result has the input's dtype and
    memory format. Differentiable in input, weight and bias; one node under ``torch.compile``.
    """
    check_tensor("input", input, (4, 5))
    unbatched = input.dim() == 4
    if unbatched:
        input = input.unsqueeze(0)
    spec = check_conv3d(input, weight, bias, stride, padding, dilation, groups)
    out = conv3d_op(input, weight, bias, list(spec.stride), spec.padding, list(spec.dilation),
                    spec.groups)
    return out.squeeze(0) if unbatched else out
