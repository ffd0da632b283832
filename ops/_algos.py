"""The three algorithms behind lk3d's dense conv3d ops, one runner per pass, and their cost model,
registered with ``lk3d.autotune.registry`` for the passes ``conv3d``, ``conv3d_grad_input`` and
``conv3d_grad_weight`` (the planner's problem: ``(main tensor, x_shape, w_shape, stride, padding,
dilation, groups, out_size)``, the output's spatial size computed once per call).

    tiled   Triton kernels (lk3d.kernels.tiled): CUDA fp16/bf16/fp32; CPU fp16/fp32/fp64 when
            Triton runs in its interpreter (TRITON_INTERPRET=1).
    fft     overlap-save FFT (lk3d.fft): CPU and CUDA, every float dtype (computed in fp32/fp64).
            A transform mixes every input voxel into every output voxel, so one NaN or Inf would
            spread over the whole result: operands that are not all finite (``finite``) go to
            aten instead, whose NaN/Inf placement is F.conv3d's.
    aten    torch's own convolution (cuDNN, oneDNN), on the input's own layout; on the CPU a dense
            kernel of 15 or more on a side goes through channels_last_3d, since oneDNN's NCDHW
            path collapses there (seconds at k=15, minutes at k=21; converting costs ~ms).

Padding is six ints (d_l, h_l, w_l, d_r, h_r, w_r). Every runner returns its result in the layout
``memory_format`` gives for its main operand, as the fake impls promise.
"""
import math

import torch
import torch.nn.functional as F

from lk3d import _cuda_model as cuda_model
from lk3d import fft
from lk3d._spec import empty, extent, out_size, zero_pad
from lk3d.autotune import configs, devices, registry
from lk3d.autotune.configs import Problem, candidate_configs, default_config
from lk3d import kernels
from lk3d.kernels import HAS_TRITON, INTERPRETED, MAX_VOLUME, memory_format
from lk3d.kernels import depthwise_configs as depthwise_family
from lk3d.kernels import implicit_gemm_configs as descriptor_family
from lk3d.kernels import tiled_configs as tiled_family

configs.register(tiled_family)
configs.register(depthwise_family)
configs.register(descriptor_family)

KERNEL_DTYPES = {
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
    # bf16 tl.dot is wrong in the interpreter (see CPU_FACTS); CPU bf16 goes elsewhere.
    "cpu": (torch.float16, torch.float32, torch.float64),
}


def kernels_take(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels serve tensors of ``dtype`` on devices of ``device_type``
    ("cuda", "cpu"): Triton there (on the CPU: its interpreter) and the dtype one they take.
    Nothing is allocated, so this also answers for a device this machine lacks."""
    if not HAS_TRITON or (device_type == "cpu" and not INTERPRETED):
        return False
    return dtype in KERNEL_DTYPES.get(device_type, ())


def kernels_can_run(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can serve a tensor like ``t`` (device, dtype, interpreter, and
    one sample's volume within what they index: ``lk3d.kernels.MAX_VOLUME`` voxels)."""
    if t.dim() == 5 and math.prod(t.shape[2:]) > MAX_VOLUME:
        return False
    return kernels_take(t.device.type, t.dtype)


def kernels_why_not(device: torch.device) -> str:
    """Why the Triton kernels may not run on ``device`` (LK3D_ALGO=tiled that cannot be obeyed)."""
    if not kernels.HAS_TRITON:
        return "tiled needs Triton, which does not import here"
    if device.type == "cpu" and not kernels.INTERPRETED:
        return ("tiled needs Triton on CUDA, or its interpreter (TRITON_INTERPRET=1) for CPU "
                "tensors")
    return f"the Triton kernels do not take this dtype on {device.type}"


def _fft_can_run(main, *problem):
    return main.device.type in ("cpu", "cuda")


def _aten_can_run(main, *problem):
    return True


def _tiled_can_run(main, x_shape, w_shape, stride, padding, dilation, groups, size):
    """The kernels serve ``main``, and index one sample of input and output in int32."""
    return kernels_can_run(main) and max(math.prod(x_shape[2:]), math.prod(size)) <= MAX_VOLUME


def candidates(t: torch.Tensor):
    """The algorithms that can serve a tensor like ``t``, whatever its convolution's sizes."""
    algos = ["tiled"] if kernels_can_run(t) else []
    if _fft_can_run(t):
        algos.append("fft")
    return algos + ["aten"]


def _sum_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def finite(*tensors) -> bool:
    """Whether every element of ``tensors`` (None skipped) is finite.

    One sum per tensor (fp16/bf16 summed in fp32, so that finite half values cannot overflow it)
    and one host sync for all of them: a NaN or Inf makes the sum NaN or Inf. A sum of finite
    values that overflows reads as not finite; callers then take a direct algorithm, which is
    exact anyway. While a CUDA stream is being captured into a graph no sync is allowed: the
    answer is then True (the chosen algorithm runs as it is)."""
    ts = [t for t in tensors if t is not None and t.numel()]
    if not ts:
        return True
    if ts[0].device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return True
    total = ts[0].sum(dtype=_sum_dtype(ts[0].dtype))
    for t in ts[1:]:
        total = total + t.sum(dtype=_sum_dtype(t.dtype))
    return bool(torch.isfinite(total))


def split_pad(padding):
    return tuple(padding[:3]), tuple(padding[3:])


def allow_tf32():
    """Whether fp32 convolutions may use TF32, as ``F.conv3d`` on cuDNN decides: the precision
    API (``torch.backends.cudnn.conv.fp32_precision``, then its parents) where torch has it and
    it is set, else the legacy flag. Reading ``torch.backends.cudnn.allow_tf32`` raises once a
    user has set the new API's conv precision apart from the RNN one."""
    for backend in (getattr(torch.backends.cudnn, "conv", None), torch.backends.cudnn,
                    torch.backends):
        precision = getattr(backend, "fp32_precision", None)
        if precision not in (None, "none"):
            return precision == "tf32"
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # mixed legacy and new settings with nothing decisive set: torch's default
        return True


class launch_device:
    """Make ``t``'s CUDA device current for a Triton launch (no-op on the CPU)."""

    def __init__(self, t):
        self.ctx = torch.cuda.device(t.device) if t.device.type == "cuda" else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx else False


# ---------------------------------------------------------------------------------------------
# aten
# ---------------------------------------------------------------------------------------------

def aten_layout(t, w_shape):
    """channels_last_3d for CPU dense kernels >= 15 on a side; the given layout otherwise."""
    if t.device.type == "cpu" and w_shape[1] > 1 and max(w_shape[2:]) >= 15:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t


def _aten_padded(x, padding):
    """aten takes symmetric padding only: pad asymmetric cases explicitly (zeros)."""
    left, right = split_pad(padding)
    if left == right:
        return x, list(left)
    return zero_pad(x, padding), [0, 0, 0]


def aten_forward(x, w, bias, stride, padding, dilation, groups):
    xp, pad = _aten_padded(aten_layout(x, w.shape), padding)
    return F.conv3d(xp, w, bias, stride, pad, dilation, groups)


def _stand_in(shape, like, w_shape=None):
    """An uninitialised tensor that tells aten the shape (and layout) of an operand it does not
    read. A stride-0 expand would be cheaper to make, but sends oneDNN down a path ~10x slower."""
    mf = memory_format(aten_layout(like, w_shape)) if w_shape is not None else None
    return empty(shape, like, mf or torch.contiguous_format)


def aten_grad_input(grad, w, input_shape, stride, padding, dilation, groups):
    left, right = split_pad(padding)
    padded = [*input_shape[:2], *(s + pl + pr for s, pl, pr in zip(input_shape[2:], left, right))]
    gx = torch.ops.aten.convolution_backward(
        aten_layout(grad, w.shape), _stand_in(padded, grad, w.shape), w, None, stride,
        [0, 0, 0], dilation, False, [0, 0, 0], groups, [True, False, False])[0]
    return gx[:, :, left[0]:left[0] + input_shape[2], left[1]:left[1] + input_shape[3],
              left[2]:left[2] + input_shape[4]]


def aten_grad_weight(grad, x, weight_shape, stride, padding, dilation, groups):
    xp, pad = _aten_padded(aten_layout(x, weight_shape), padding)
    return torch.ops.aten.convolution_backward(
        aten_layout(grad, weight_shape), xp, _stand_in(weight_shape, grad), None,
        stride, pad, dilation, False, [0, 0, 0], groups, [False, True, False])[1]


# ---------------------------------------------------------------------------------------------
# fft: the transforms of lk3d.fft, or aten where an operand is not finite
# ---------------------------------------------------------------------------------------------

def fft_forward(x, w, bias, stride, padding, dilation, groups):
    if not finite(x, w):  # the bias is added elementwise: exact as it is
        return aten_forward(x, w, bias, stride, padding, dilation, groups)
    return fft.conv3d_forward(x, w, bias, stride, padding, dilation, groups)


def fft_grad_input(grad, w, input_shape, stride, padding, dilation, groups):
    if not finite(grad, w):
        return aten_grad_input(grad, w, input_shape, stride, padding, dilation, groups)
    return fft.conv3d_grad_input(grad, w, input_shape, stride, padding, dilation, groups)


def fft_grad_weight(grad, x, weight_shape, stride, padding, dilation, groups):
    if not finite(grad, x):
        return aten_grad_weight(grad, x, weight_shape, stride, padding, dilation, groups)
    return fft.conv3d_grad_weight(grad, x, weight_shape, stride, padding, dilation, groups)


# ---------------------------------------------------------------------------------------------
# tiled (Triton)
# ---------------------------------------------------------------------------------------------

def _taps(shape):
    return shape[2] * shape[3] * shape[4]


def direct_depthwise(op, x_shape, w_shape, stride):
    """Whether the channels-innermost depthwise kernels (``lk3d.kernels.depthwise``) serve pass
    ``op`` ("conv3d", "conv3d_grad_input", "conv3d_grad_weight") of a convolution of input
    ``x_shape`` and weight ``w_shape``: depthwise of channel multiplier 1 over a multiple of 8
    channels (a thread's 16-byte load of channels, every dtype), and for grad-input stride 1."""
    cin, cout, cig = x_shape[1], w_shape[0], w_shape[1]
    if cig != 1 or cout != cin or cin % depthwise_family.CHANNEL_MULTIPLE:
        return False
    return op != "conv3d_grad_input" or tuple(stride) == (1, 1, 1)


def dw_cl_wgrad_problem(x_shape, w_shape, size, device):
    """The config-choice problem of the channels-innermost depthwise grad-weight: ``M`` grad-output
    voxels reduced, ``NC`` channels, ``programs`` before the split (channel blocks x (kd, kh) x
    strips of W taps, by the config the device would take)."""
    cout, (kd, kh, kw) = w_shape[0], w_shape[2:]
    base = dict(kind="conv3d_dw_cl_wgrad", M=x_shape[0] * math.prod(size), NC=cout,
                taps=kd * kh * kw, partial=cout * kd * kh * kw)
    probe = default_config(Problem(**base), device)
    strips, _ = depthwise_family.tap_strip(kw, probe["KT"])
    programs = -(-cout // probe["BLOCK_C"]) * kd * kh * strips
    return Problem(**base, programs=programs)


def descriptor_gemm(op, x_shape, w_shape, stride, groups, dtype):
    """Whether the tensor-descriptor implicit GEMM (``lk3d.kernels.implicit_gemm``) serves pass
    ``op`` ("conv3d", "conv3d_grad_input", "conv3d_grad_weight") of a dense or grouped
    convolution of input ``x_shape`` and weight ``w_shape`` in ``dtype``: fp16/bf16/fp32,
    reduction channels per group (Cin/g forward, Cout/g grad-input, both grad-weight) a multiple
    of 16; the forward and grad-weight at stride 1 along H and W, grad-input at any stride (one
    stride-1 launch per stride phase). The gather kernels (``lk3d.kernels.tiled``) serve the
    others."""
    if w_shape[1] == 1 or dtype not in descriptor_family.DTYPES:
        return False
    if op == "conv3d_grad_input":
        kcs, strides_taken = (w_shape[0] // groups,), True
    elif op == "conv3d":
        kcs, strides_taken = (w_shape[1],), tuple(stride)[1:] == (1, 1)
    elif op == "conv3d_grad_weight":
        kcs, strides_taken = (w_shape[1], w_shape[0] // groups), tuple(stride)[1:] == (1, 1)
    else:
        return False
    return strides_taken and all(kc > 0 and kc % descriptor_family.CHANNEL_MULTIPLE == 0
                                 for kc in kcs)


def desc_wgrad_problem(x_shape, w_shape, size, groups, device):
    """The config-choice problem of the tensor-descriptor grad-weight: ``M`` grad-output voxels
    reduced, ``KC`` = Cin/g, ``NC`` = Cout/g, ``programs`` before the split (channel tiles x
    (kd, kh) x strips of W taps x groups, by the config the device would take)."""
    cout, cig, (kd, kh, kw) = w_shape[0], w_shape[1], w_shape[2:]
    base = dict(kind="conv3d_desc_wgrad", M=x_shape[0] * math.prod(size), KC=cig,
                NC=cout // groups, taps=kd * kh * kw, partial=cout * cig * kd * kh * kw)
    probe = default_config(Problem(**base), device)
    strips, _ = descriptor_family.tap_strip(kw, probe["TAPS"])
    programs = (groups * (cout // groups // probe["BLOCK_CO"]) * (cig // probe["BLOCK_CI"])
                * kd * kh * strips)
    return Problem(**base, programs=programs)


def tiled_problem(op, x_shape, w_shape, stride, padding, dilation, groups, device, size=None,
                  dtype=None):
    """What the config choice of the Triton kernel serving pass ``op`` looks at (``size``: the
    output's spatial size where the caller has it; ``dtype``: the operands', which decides
    whether the tensor-descriptor kernel serves)."""
    taps, cout, cig = _taps(w_shape), w_shape[0], w_shape[1]
    size = size or out_size(x_shape[2:], w_shape[2:], stride, padding, dilation)
    if op in ("conv3d", "conv3d_grad_input"):
        produced = size if op == "conv3d" else x_shape[2:]
        if direct_depthwise(op, x_shape, w_shape, stride):
            return Problem("conv3d_dw_cl", M=produced[2], NC=cout, taps=taps)
        if cig == 1:
            return Problem("conv3d_dw", M=math.prod(produced), taps=taps)
        kc, nc = (cig, cout // groups) if op == "conv3d" else (cout // groups, cig)
        kind = ("conv3d_desc" if dtype is not None
                and descriptor_gemm(op, x_shape, w_shape, stride, groups, dtype)
                else "conv3d_fwd")
        return Problem(kind, M=x_shape[0] * math.prod(produced), KC=kc, NC=nc, taps=taps)
    if direct_depthwise(op, x_shape, w_shape, stride):
        return dw_cl_wgrad_problem(x_shape, w_shape, size, device)
    if dtype is not None and descriptor_gemm(op, x_shape, w_shape, stride, groups, dtype):
        return desc_wgrad_problem(x_shape, w_shape, size, groups, device)
    M = x_shape[0] * math.prod(size)
    if cig == 1:
        base = dict(kind="conv3d_dw_wgrad", M=M, taps=taps, partial=cout * taps)
        probe = default_config(Problem(**base), device)
        return Problem(**base, programs=cout * -(-taps // probe["BLOCK_T"]))
    base = dict(kind="conv3d_wgrad", M=M, KC=cig, NC=cout // groups, taps=taps,
                partial=cout * cig * taps)
    probe = default_config(Problem(**base), device)
    return Problem(**base, programs=taps * groups * -(-(cout // groups) // probe["BLOCK_CO"])
                   * -(-cig // probe["BLOCK_CI"]))


def tiled_configs(op, x_shape, w_shape, stride, padding, dilation, groups, dtype, device,
                  size=None):
    """Launch configs worth measuring for pass ``op`` on ``device``."""
    problem = tiled_problem(op, x_shape, w_shape, stride, padding, dilation, groups, device, size,
                            dtype)
    found = candidate_configs(problem, device, torch.empty((), dtype=dtype).element_size())
    if problem.kind in ("conv3d_desc", "conv3d_desc_wgrad"):
        found = [c for c in found if descriptor_family.usable(c, problem)] or [
            default_config(problem, device, torch.empty((), dtype=dtype).element_size())]
    return found


def _config(config, op, x_shape, w_shape, geometry, t):
    if config:
        return config
    problem = tiled_problem(op, x_shape, w_shape, *geometry, t.device, dtype=t.dtype)
    return default_config(problem, t.device, t.element_size())


def _tiled():
    return kernels.tiled  # imported (with Triton) at the first launch


def _depthwise():
    return kernels.depthwise


def _descriptor():
    return kernels.implicit_gemm


def tiled_forward(x, w, bias, stride, padding, dilation, groups, config=None):
    geometry = (stride, padding, dilation, groups)
    cfg = _config(config, "conv3d", x.shape, w.shape, geometry, x)
    with launch_device(x):
        if direct_depthwise("conv3d", x.shape, w.shape, stride):
            return _depthwise().conv3d_dw_cl_fwd(x, w, bias, stride, padding, dilation, cfg)
        if w.shape[1] == 1:  # depthwise, with channel multiplier cout / cin
            return _tiled().conv3d_dw_fwd(x, w, bias, stride, padding, dilation, cfg)
        if descriptor_gemm("conv3d", x.shape, w.shape, stride, groups, x.dtype):
            return _descriptor().conv3d_desc_fwd(x, w, bias, stride, padding, dilation, groups,
                                                 cfg, allow_tf32=allow_tf32())
        return _tiled().conv3d_fwd(x, w, bias, stride, padding, dilation, groups, cfg,
                                allow_tf32=allow_tf32())


def tiled_grad_input(grad, w, input_shape, stride, padding, dilation, groups, config=None):
    if not finite(w):
        # The kernels add 0·w for a tap off the stride grid or past the border: NaN for an Inf
        # weight, where aten sums nothing (masking those taps in the kernels cost ~220 of ~500
        # instructions a step of the implicit GEMM on sm_90). The check is one sum of the weight.
        return aten_grad_input(grad, w, input_shape, stride, padding, dilation, groups)
    geometry = (stride, padding, dilation, groups)
    cfg = _config(config, "conv3d_grad_input", input_shape, w.shape, geometry, grad)
    with launch_device(grad):
        if direct_depthwise("conv3d_grad_input", input_shape, w.shape, stride):
            return _depthwise().conv3d_dw_cl_bwd_input(grad, w, input_shape, stride, padding,
                                                       dilation, cfg)
        if w.shape[1] == 1:
            return _tiled().conv3d_dw_bwd_input(grad, w, input_shape, stride, padding, dilation,
                                                cfg)
        if descriptor_gemm("conv3d_grad_input", input_shape, w.shape, stride, groups, grad.dtype):
            return _descriptor().conv3d_desc_bwd_input(grad, w, input_shape, stride, padding,
                                                       dilation, groups, cfg,
                                                       allow_tf32=allow_tf32())
        return _tiled().conv3d_bwd_input(grad, w, input_shape, stride, padding, dilation, groups,
                                      cfg, allow_tf32=allow_tf32())


def tiled_grad_weight(grad, x, weight_shape, stride, padding, dilation, groups, config=None):
    geometry = (stride, padding, dilation, groups)
    cfg = _config(config, "conv3d_grad_weight", x.shape, weight_shape, geometry, x)
    with launch_device(x):
        if direct_depthwise("conv3d_grad_weight", x.shape, weight_shape, stride):
            if not finite(grad, x):
                # A padded tap or a strip's tail adds x·0 or 0·dy: NaN for an Inf operand
                # where aten adds nothing. The check is one sum of each operand.
                return aten_grad_weight(grad, x, weight_shape, stride, padding, dilation, groups)
            return _depthwise().conv3d_dw_cl_bwd_weight(x, grad, weight_shape, stride, padding,
                                                        dilation, cfg)
        if weight_shape[1] == 1:
            return _tiled().conv3d_dw_bwd_weight(x, grad, weight_shape, stride, padding, dilation,
                                              cfg)
        if descriptor_gemm("conv3d_grad_weight", x.shape, weight_shape, stride, groups, x.dtype):
            if not finite(grad, x):
                # A padded tap adds dy·0, a brick's rows past the border 0·x: NaN for an Inf
                # operand where aten adds nothing. The check is one sum of each operand.
                return aten_grad_weight(grad, x, weight_shape, stride, padding, dilation, groups)
            return _descriptor().conv3d_desc_bwd_weight(x, grad, weight_shape, stride, padding,
                                                        dilation, groups, cfg,
                                                        allow_tf32=allow_tf32())
        return _tiled().conv3d_bwd_weight(x, grad, weight_shape, stride, padding, dilation, groups,
                                       cfg, allow_tf32=allow_tf32())


def tiled_grad_bias(grad):
    M = grad.numel() // grad.shape[1]
    with launch_device(grad):
        cfg = default_config(Problem("bias_grad", M=M, programs=grad.shape[1], partial=1),
                             grad.device)
        return _tiled().bias_grad(grad, cfg)


# ---------------------------------------------------------------------------------------------
# cost model
# ---------------------------------------------------------------------------------------------

# Sustained rates the CPU model assumes (FLOP/s), fitted to `lk3d bench --dispatch` on a 2-core
# Intel Xeon (oneDNN, [1,16,48³], k=3..21; per thread; an AVX-512 AMD EPYC ran aten ~3x and the FFT
# ~2x faster) plus the time to stream input and output once. CUDA candidates are priced from the
# device's figures (lk3d._cuda_model), never from the host, until `lk3d tune` measures (or a
# shipped seed covers) the device.
CPU_ATEN_PER_THREAD = {"dense": 90e9, "depthwise": 60e9}
CPU_BYTES_PER_S = 10e9
_FFT_CALIBRATION = 1.35   # measured / modelled seconds of conv3d by lk3d.fft (with pad and crop)
_FFT_OVERHEAD_MS = 0.3    # its ~40 torch calls, whatever the size

# lk3d's kernel kind of each pass on CUDA (lk3d._cuda_model.KERNEL_KINDS), dense / depthwise
TILED_KINDS = {"conv3d": ("implicit_gemm", "depthwise"),
               "conv3d_grad_input": ("implicit_gemm", "depthwise"),
               "conv3d_grad_weight": ("implicit_gemm_wgrad", "depthwise_wgrad")}


def _fft_geometry(x_shape, w_shape, padding, dilation):
    K = tuple(w_shape[2:])
    E = extent(K, dilation)
    Q = tuple(s + pl + pr - e + 1 for s, pl, pr, e in zip(x_shape[2:], *split_pad(padding), E))
    return Q, E, K


def model_ms(algo, x_shape, w_shape, stride, padding, dilation, groups, dtype, device,
             size=None, op="conv3d", gathered=False):
    """Modelled milliseconds of one forward-sized pass ``op`` of ``algo`` (``size``: the output's
    spatial size where the caller has it). ``device``: a ``torch.device``, or the figures of a GPU
    (``lk3d.autotune.devices.Figures``, e.g. ``devices.named("h100")``) to price a CUDA plan
    without that GPU. ``gathered``: "tiled" at the rates of the kernels that gather their
    operands (the by-voxel depthwise kernel, the gather implicit GEMM: the block-sparse kernels'
    form), not those of the channels-innermost and tensor-descriptor ones."""
    size = size or out_size(x_shape[2:], w_shape[2:], stride, padding, dilation)
    flops = 2 * x_shape[0] * w_shape[0] * math.prod(size) * w_shape[1] * _taps(w_shape)
    form = "depthwise" if w_shape[1] == 1 else "dense"
    gpu = devices.figures(device)
    if gpu is not None:
        return _cuda_ms(algo, x_shape, w_shape, stride, padding, dilation, groups, dtype, gpu,
                        size, op, flops, form, gathered)
    if algo == "fft":
        Q, E, K = _fft_geometry(x_shape, w_shape, padding, dilation)
        secs = fft.plan_tiles(Q, E, K, x_shape[0], x_shape[1], w_shape[0], groups)[1]
        secs *= _FFT_CALIBRATION * 2 / max(1, torch.get_num_threads())
        return 1e3 * secs + _FFT_OVERHEAD_MS
    if algo == "aten":
        moved = 4 * x_shape[0] * (x_shape[1] * math.prod(x_shape[2:])
                                  + w_shape[0] * math.prod(size))
        return 1e3 * (flops / (CPU_ATEN_PER_THREAD[form] * torch.get_num_threads())
                      + moved / CPU_BYTES_PER_S) + 0.05
    return math.inf  # the interpreter is for checking kernels, not for speed


def _cuda_ms(algo, x_shape, w_shape, stride, padding, dilation, groups, dtype, gpu, size, op,
             flops, form, gathered=False):
    """``model_ms`` on a GPU of figures ``gpu``: from its rates alone."""
    elem = torch.empty((), dtype=dtype).element_size()
    inputs = x_shape[0] * x_shape[1] * math.prod(x_shape[2:])
    outputs = x_shape[0] * w_shape[0] * math.prod(size)
    activations = inputs + outputs
    moved = elem * (activations + math.prod(w_shape))
    if algo == "fft":
        Q, E, K = _fft_geometry(x_shape, w_shape, padding, dilation)
        if op == "conv3d_grad_weight":  # whole-volume transforms, no tiling
            P = [q + e - 1 for q, e in zip(Q, E)]
            L, f = fft.grad_weight_features(P, E, K, x_shape[0], x_shape[1], w_shape[0], groups)
            return cuda_model.features_ms(f, L, (elem + 8) * activations, gpu)
        L = fft.plan_tiles(Q, E, K, x_shape[0], x_shape[1], w_shape[0], groups, gpu)[0]
        return cuda_model.fft_ms(L, Q, E, K, x_shape[0], x_shape[1], w_shape[0], groups,
                                 (elem + 8) * activations, gpu)
    if algo == "tiled":
        # The channels-innermost kernels (depthwise, tensor descriptors) copy an NCDHW caller's
        # operands they read once, read and written: the input forward, grad_output grad-input,
        # both grad-weight.
        read = {"conv3d": inputs, "conv3d_grad_input": outputs}.get(op, activations)
        if form == "depthwise" and not gathered and direct_depthwise(op, x_shape, w_shape,
                                                                    stride):
            kind = "depthwise_cl_wgrad" if op == "conv3d_grad_weight" else "depthwise_cl"
            return (cuda_model.kernel_ms(kind, flops, moved, gpu, dtype, allow_tf32())
                    + cuda_model.copy_ms(2 * elem * read, gpu))
        if (form == "dense" and not gathered
                and descriptor_gemm(op, x_shape, w_shape, stride, groups, dtype)):
            if op == "conv3d_grad_weight":  # fp32 partials, summed and cast: a few weights
                return (cuda_model.kernel_ms("implicit_gemm_desc_wgrad", flops, moved, gpu,
                                             dtype, allow_tf32())
                        + cuda_model.copy_ms(2 * elem * read, gpu))
            # ... and the tensor-descriptor forward and grad-input pack the weight likewise
            return (cuda_model.kernel_ms("implicit_gemm_desc", flops, moved, gpu, dtype,
                                         allow_tf32())
                    + cuda_model.copy_ms(2 * elem * (read + math.prod(w_shape)), gpu))
        kind = TILED_KINDS[op][form == "depthwise"]
        return cuda_model.kernel_ms(kind, flops, moved, gpu, dtype, allow_tf32())
    return cuda_model.aten_ms(form, flops, moved, gpu, dtype, allow_tf32())


# ---------------------------------------------------------------------------------------------
# the registry entries of the three passes, and their runners by algorithm
# ---------------------------------------------------------------------------------------------

def _cost(algo, op):
    def cost_ms(main, x_shape, w_shape, stride, padding, dilation, groups, size):
        return model_ms(algo, x_shape, w_shape, stride, padding, dilation, groups, main.dtype,
                        main.device, size, op)
    return cost_ms


def _launch_configs(op):
    def launch_configs(main, x_shape, w_shape, stride, padding, dilation, groups, size):
        return tiled_configs(op, x_shape, w_shape, stride, padding, dilation, groups, main.dtype,
                             main.device, size)
    return launch_configs


def _config_problem(op):
    def config_problem(main, x_shape, w_shape, stride, padding, dilation, groups, size):
        return tiled_problem(op, x_shape, w_shape, stride, padding, dilation, groups, main.device,
                             size, main.dtype)
    return config_problem


for _op, _runners, _kinds in (
        ("conv3d", (tiled_forward, fft_forward, aten_forward),
         ("conv3d_fwd", "conv3d_desc", "conv3d_dw", "conv3d_dw_cl")),
        ("conv3d_grad_input", (tiled_grad_input, fft_grad_input, aten_grad_input),
         ("conv3d_fwd", "conv3d_desc", "conv3d_dw", "conv3d_dw_cl")),
        ("conv3d_grad_weight", (tiled_grad_weight, fft_grad_weight, aten_grad_weight),
         ("conv3d_wgrad", "conv3d_desc_wgrad", "conv3d_dw_wgrad",
          "conv3d_dw_cl_wgrad"))):
    registry.register(registry.Algorithm(
        _op, "tiled", _runners[0], _tiled_can_run, _cost("tiled", _op), spaces=_kinds,
        configs=_launch_configs(_op), why_not=kernels_why_not, launches=True,
        config_problem=_config_problem(_op)))
    registry.register(registry.Algorithm(_op, "fft", _runners[1], _fft_can_run,
                                         _cost("fft", _op)))
    registry.register(registry.Algorithm(_op, "aten", _runners[2], _aten_can_run,
                                         _cost("aten", _op)))

FORWARD = registry.Runners("conv3d")
GRAD_INPUT = registry.Runners("conv3d_grad_input")
GRAD_WEIGHT = registry.Runners("conv3d_grad_weight")
