"""``lk3d estimate``: what lk3d's Triton kernels can reach on a GPU, read from their machine code
without one.

For a convolution and each of its passes, the launcher is called on ``device="meta"`` tensors with
its kernels swapped for recorders (``record``): that gives the exact launch it makes (kernel,
arguments, grid, warps, stages) for the default config of the arch. Each launch is compiled ahead
of time for ``sm_<arch>`` with the JIT's specialisation of its arguments (ints equal to 1 become
constexprs, ints divisible by 16 and 16-byte-aligned pointers are marked so: ``specialize``), its
registers, spills and shared memory are read from the cubin (``lk3d.tools.aot``) and the
innermost loop from the SASS (``lk3d.tools.sass``).

The **issue ceiling** (``issue_ceiling``) is the FLOP rate the kernel cannot exceed: an SM issues
at most 4 warp-instructions per clock, so a loop step of I instructions per warp on W warps takes
at least I·W/4 clocks per program, during which the program does the step's FLOPs (read off the
SASS: ``sass.step_flops``). That rate over every SM, capped by the unit's peak (tensor cores or
FP32 FMA) and by the bytes the launch must move at the device's bandwidth, is the ceiling; its
fraction of the peak says how far the kernel's code, not the memory system, keeps it from the
unit. A necessary condition only: latency and occupancy can keep a kernel below its ceiling.

    lk3d estimate --arch 90 --input 1,64,64,64,64 --weight 64,64,7,7,7 --dtype bf16 --padding same
"""
import argparse
import dataclasses
import inspect
import json
import math
from dataclasses import dataclass

import torch

from lk3d.tools import sass

PASSES = ("forward", "grad_input", "grad_weight")
CP_PASSES = ("forward", "backward")
BS_PASSES = ("forward", "grad_input", "grad_values")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Device figures per arch, until a table of named GPUs replaces ``device_figures``.
# H100 SXM (sm_90): 132 SMs; max boost clock 1.98 GHz; dense bf16/fp16 tensor 989.4 TFLOP/s, tf32
# 494.7, fp32 FMA 66.9, HBM3 3.35 TB/s (NVIDIA H100 Tensor Core GPU datasheet, SXM column; the
# datasheet's sparsity figures halved). A100 80GB SXM (sm_80): 108 SMs, boost 1.41 GHz (NVIDIA
# A100 Tensor Core GPU Architecture whitepaper); dense bf16/fp16 tensor 312 TFLOP/s, tf32 156,
# fp32 FMA 19.5, HBM2e 2.039 TB/s (NVIDIA A100 datasheet, 80GB SXM column). Shared memory: the
# per-block opt-in limit (``aot.SHARED_LIMIT``).
_DEVICES = {
    90: dict(name="H100 SXM", sms=132, clock_ghz=1.98, fma_tflops=66.9, bandwidth_tbs=3.35,
             tensor_tflops={"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    80: dict(name="A100 80GB SXM", sms=108, clock_ghz=1.41, fma_tflops=19.5, bandwidth_tbs=2.039,
             tensor_tflops={"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
}
ISSUE_PER_CLOCK = 4  # warp-instructions an SM issues per clock (4 schedulers, 1 each)


def device_figures(arch):
    """SMs, clock (GHz), peaks (TFLOP/s), bandwidth (TB/s) and shared-memory limit (bytes) of the
    GPU the estimate for ``sm_<arch>`` assumes."""
    if arch not in _DEVICES:
        raise ValueError(f"arch: expected one of {sorted(_DEVICES)}, got {arch!r}")
    from lk3d.tools import aot

    return dict(_DEVICES[arch], arch=arch, smem_limit=aot.SHARED_LIMIT[arch])


def peak_tflops(device, unit, dtype):
    """The peak of ``unit`` ("tensor" or "fma") for operands of ``dtype`` ("bf16", ...)."""
    if unit == "tensor":
        return device["tensor_tflops"][dtype]
    if unit == "fma":
        return device["fma_tflops"]
    raise ValueError(f"unit: expected 'tensor' or 'fma', got {unit!r}")


def issue_ceiling(loop_instructions, num_warps, step_flops, unit, device, dtype, flops, nbytes):
    """The FLOP rates (TFLOP/s) a launch cannot exceed, as a dict: ``issue`` (``step_flops`` per
    program every ``loop_instructions`` · ``num_warps`` / 4 clocks, on every SM), ``bandwidth``
    (``flops`` over the time ``nbytes`` take at the device's bandwidth), ``peak`` (the unit's),
    ``ceiling`` (the least of the three) and ``fraction`` (ceiling / peak)."""
    clocks = loop_instructions * num_warps / ISSUE_PER_CLOCK
    issue = step_flops / clocks * device["sms"] * device["clock_ghz"] * 1e9 / 1e12
    seconds = nbytes / (device["bandwidth_tbs"] * 1e12)
    bandwidth = flops / seconds / 1e12 if seconds else math.inf
    peak = peak_tflops(device, unit, dtype)
    ceiling = min(peak, issue, bandwidth)
    return dict(issue=issue, bandwidth=bandwidth, peak=peak, ceiling=ceiling,
                fraction=ceiling / peak)


# ---------------------------------------------------------------------------------------------
# Launches: what a launcher launches, recorded on meta tensors
# ---------------------------------------------------------------------------------------------

_LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")


@dataclass(frozen=True, eq=False)
class Launch:
    kernel: object  # the @triton.jit function (JITFunction, or InterpretedFunction)
    name: str       # its name in its module, e.g. "conv3d_igemm_kernel"
    args: dict      # every argument name -> the value passed (tensors on the meta device)
    grid: tuple
    num_warps: int
    num_stages: int
    config: dict = None  # the launcher's config, where a pass's launches take different ones


def _raw(kernel):
    return kernel.fn


def _is_constexpr(kernel, name):
    import triton.language as tl

    annotation = inspect.signature(_raw(kernel)).parameters[name].annotation
    return annotation is tl.constexpr or "constexpr" in str(annotation)


class _Recorder:
    """Stands in for a kernel in its module: ``kernel[grid](*args, **kwargs)`` appends a Launch."""

    def __init__(self, kernel, name, launches):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
            params = inspect.signature(_raw(self.kernel)).parameters
            bound = dict(zip(self.kernel.arg_names, args), **kwargs)
            for name, p in params.items():
                if name not in bound and p.default is not inspect.Parameter.empty:
                    bound[name] = p.default
            grid_ = tuple(grid(bound) if callable(grid) else grid)
            self.launches.append(Launch(self.kernel, self.name, bound, grid_,
                                        options.get("num_warps", 4),
                                        options.get("num_stages", 3)))
        return launch


def record(module, launcher, *args, **kwargs):
    """The launches ``launcher(*args, **kwargs)`` makes, in order, with the ``@triton.jit``
    kernels of ``module`` swapped for recorders while it runs (its tensors: meta tensors)."""
    kernels = {name: obj for name, obj in vars(module).items()
               if hasattr(obj, "arg_names") and hasattr(obj, "fn")}
    launches = []
    try:
        for name, kernel in kernels.items():
            setattr(module, name, _Recorder(kernel, name, launches))
        launcher(*args, **kwargs)
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)
    return launches


def _fallback_specialize(value):
    """The JIT's specialisation of one argument: (type, "D" where divisible by 16, else "")."""
    if value is None:
        return "constexpr", None
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        kind = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        return kind, "D" if value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    if isinstance(value, torch.Tensor):
        names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                 torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64",
                 torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.bool: "u1"}
        aligned = value.device.type == "meta" or value.data_ptr() % 16 == 0
        return f"*{names[value.dtype]}", "D" if aligned else ""
    raise TypeError(f"argument: expected a tensor, int, float, bool or None, got "
                    f"{type(value).__name__}")


def _specializer():
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl
    except ImportError:  # a Triton without the native binder: the same rules, written out
        return _fallback_specialize

    def specialize(value):
        return tuple(native_specialize_impl(BaseBackend, value, False, True, True)[:2])
    return specialize


def specialize(launch):
    """(signature, constexprs, divisible) of ``launch`` as the JIT compiles it: constexpr
    parameters and ints equal to 1 (and None) as constexprs, the others typed by value, ints
    divisible by 16 and 16-byte-aligned pointers (a meta tensor: a fresh allocation, aligned)
    named in ``divisible``."""
    spec = _specializer()
    signature, constexprs, divisible = {}, {}, []
    for name in launch.kernel.arg_names:
        value = launch.args[name]
        if _is_constexpr(launch.kernel, name):
            signature[name], constexprs[name] = "constexpr", value
            continue
        kind, attr = spec(value)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = value
        elif attr and "D" in attr:
            divisible.append(name)
    return signature, constexprs, divisible


def compile_launches(launches, arch):
    """Each launch compiled for ``sm_<arch>`` (``aot.compile_many``: child processes under the
    interpreter), or the exception its compile raised."""
    from lk3d.tools import aot

    jobs = [(ln.kernel, *specialize(ln)[:2], arch, ln.num_warps, ln.num_stages, specialize(ln)[2])
            for ln in launches]
    return aot.compile_many(jobs, processes=1)


# ---------------------------------------------------------------------------------------------
# Problems: the launches of each pass of a convolution, with the default config of the arch
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Conv:
    """A convolution as ``lk3d.conv3d`` takes it; ``padding`` as the user gives it."""
    input: tuple   # N, Cin, D, H, W
    weight: tuple  # Cout, Cin/groups, kd, kh, kw
    dtype: str = "bf16"
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1
    rank: int = None  # a rank-R CP kernel of the weight's shape (lk3d.cp_conv3d)
    block: tuple = None  # block-sparse: the block shape (bo, bi, bd, bh, bw) ...
    density: float = None  # ... and the fraction of blocks stored (lk3d.block_sparse_conv3d)

    @property
    def op(self):
        cin, cig = self.input[1], self.weight[1]
        if self.rank:
            return "cp"
        if self.block:
            return "block_sparse"
        if cig == 1 and self.groups == cin and cin > 1:
            return "depthwise"
        return "dense" if self.groups == 1 else "grouped"

    @property
    def id(self):
        n, c, *size = self.input
        return (f"N{n}-C{c}-D{'x'.join(map(str, size))}-k{'x'.join(map(str, self.weight[2:]))}"
                f"-o{self.weight[0]}-g{self.groups}" + (f"-R{self.rank}" if self.rank else "")
                + (f"-b{'x'.join(map(str, self.block))}-d{self.density:g}" if self.block else ""))

    @property
    def passes(self):
        """The passes of the op: CP's backward is one pass (its grad-input and factor kernels)."""
        return CP_PASSES if self.rank else BS_PASSES if self.block else PASSES

    @property
    def nnz(self):
        """Stored blocks of a block-sparse kernel: the density's share of all blocks (>= 1)."""
        blocks = self.groups * math.prod(w // b for w, b in zip(self.weight, self.block))
        return max(1, round(self.density * blocks))


def _checked(conv):
    """(meta input, meta weight, spec) of ``conv``: its arguments checked as lk3d.conv3d checks
    them."""
    from lk3d import _spec

    meta = dict(dtype=DTYPES[conv.dtype], device="meta")
    x = torch.empty(conv.input, **meta)
    w = torch.empty(conv.weight, **meta)
    return x, w, _spec.check_conv3d(x, w, None, conv.stride, conv.padding, conv.dilation,
                                    conv.groups)


def _default_config(kind, problem_fields, arch, element_size):
    """(config, problem, family, device programs) for ``kind`` on the arch's GPU: the config is
    the family's pick within the arch's shared memory, as ``lk3d.autotune.configs.default_config``
    picks it on such a GPU (``LK3D_CONFIG`` is not applied); SPLIT, where the kind takes one, is
    the caller's (``family.split`` for the device programs, 4 per SM)."""
    from lk3d import _algos, block_sparse, cp  # noqa: F401  (they register the families)
    from lk3d.autotune import configs

    device = device_figures(arch)
    problem = configs.Problem(kind=kind, **problem_fields)
    fam = configs.family(kind)
    config = fam.pick(problem, device["smem_limit"], element_size)
    return config, problem, fam, 4 * device["sms"]


def tiled_launches(conv, pass_, arch):
    """(variant, config, launches) of lk3d's tiled kernels for ``pass_`` of ``conv`` on
    ``sm_<arch>``, recorded from the launchers with the arch's default config."""
    from lk3d.kernels import tiled

    x, w, spec = _checked(conv)
    meta = dict(dtype=x.dtype, device="meta")
    geometry = (spec.stride, spec.padding, spec.dilation)
    dy = torch.empty((conv.input[0], conv.weight[0], *spec.out_size), **meta)
    depthwise = conv.weight[1] == 1
    taps = math.prod(conv.weight[2:])
    cout, cig = conv.weight[:2]
    size = x.element_size()
    if pass_ in ("forward", "grad_input"):
        produced = spec.out_size if pass_ == "forward" else conv.input[2:]
        M = math.prod(produced)
        if depthwise:
            config, *_ = _default_config("conv3d_dw", dict(M=M, taps=taps), arch, size)
            if pass_ == "forward":
                return "direct", config, record(tiled, tiled.conv3d_dw_fwd, x, w, None,
                                                *geometry, config)
            return "direct", config, record(tiled, tiled.conv3d_dw_bwd_input, dy, w, conv.input,
                                            *geometry, config)
        kc, nc = (cig, cout // conv.groups) if pass_ == "forward" else (cout // conv.groups, cig)
        config, *_ = _default_config("conv3d_fwd", dict(M=conv.input[0] * M, KC=kc, NC=nc,
                                                        taps=taps), arch, size)
        if pass_ == "forward":
            return "gather", config, record(tiled, tiled.conv3d_fwd, x, w, None, *geometry,
                                            conv.groups, config)
        return "gather", config, record(tiled, tiled.conv3d_bwd_input, dy, w, conv.input,
                                        *geometry, conv.groups, config)
    if pass_ != "grad_weight":
        raise ValueError(f"pass: expected one of {PASSES}, got {pass_!r}")
    M = conv.input[0] * math.prod(spec.out_size)
    if depthwise:
        fields = dict(M=M, taps=taps, partial=cout * taps)
        config, problem, fam, programs = _default_config("conv3d_dw_wgrad", fields, arch, size)
        fields["programs"] = cout * -(-taps // config["BLOCK_T"])
        launcher = tiled.conv3d_dw_bwd_weight
        args = (x, dy, conv.weight, *geometry)
    else:
        fields = dict(M=M, KC=cig, NC=cout // conv.groups, taps=taps, partial=cout * cig * taps)
        config, problem, fam, programs = _default_config("conv3d_wgrad", fields, arch, size)
        fields["programs"] = (taps * conv.groups * -(-(cout // conv.groups) // config["BLOCK_CO"])
                              * -(-cig // config["BLOCK_CI"]))
        launcher = tiled.conv3d_bwd_weight
        args = (x, dy, conv.weight, *geometry, conv.groups)
    config["SPLIT"] = fam.split(dataclasses.replace(problem, programs=fields["programs"]),
                                config, programs)
    return "direct" if depthwise else "gather", config, record(tiled, launcher, *args, config)


def cp_launches(conv, pass_, arch):
    """(variant, config, launches) of lk3d's fused CP kernels for ``pass_`` ("forward" or
    "backward": grad-input with grad U_in, then the factors' sums) of ``conv`` (``conv.rank``
    set), recorded from the launchers with the arch's default configs (the backward's two
    launches each carry their own: ``Launch.config``)."""
    from lk3d.kernels import cp

    x, _, spec = _checked(conv)
    meta = dict(dtype=x.dtype, device="meta")
    cout, cin, *kernel = conv.weight
    rank, taps, size = conv.rank, math.prod(kernel), x.element_size()
    factors = [torch.empty((n, rank), **meta) for n in (cout, cin, *kernel)]
    geometry = (spec.stride, spec.padding, spec.dilation)
    n = conv.input[0]
    if pass_ == "forward":
        fields = dict(M=n * math.prod(spec.out_size), KC=cin, NC=cout, taps=taps, rank=rank)
        config, *_ = _default_config("cp_conv", fields, arch, size)
        return "fused", config, record(cp, cp.cp_conv3d_fwd, x, *factors, None, None, *geometry,
                                       config)
    if pass_ != "backward":
        raise ValueError(f"pass: expected one of {CP_PASSES}, got {pass_!r}")
    dy = torch.empty((n, cout, *spec.out_size), **meta)
    launches = []
    for kind, M, kc, nc in (("cp_conv", n * math.prod(conv.input[2:]), cout, cin),
                            ("cp_grad", n * math.prod(spec.out_size), cin, cout)):
        fields = dict(M=M, KC=kc, NC=nc, taps=taps, rank=rank, partials=True)
        config, problem, fam, programs = _default_config(kind, fields, arch, size)
        config["SPLIT"] = fam.split(problem, config, programs)
        if kind == "cp_conv":
            recorded = record(cp, cp.cp_conv3d_bwd_input, dy, x, *factors, None, *geometry,
                              config, need_input=True, need_u_in=True)
        else:
            recorded = record(cp, cp.cp_conv3d_bwd_factors, x, dy, *factors, None, *geometry,
                              config)
        launches += [dataclasses.replace(ln, config=config) for ln in recorded]
    return "fused", config, launches


def block_sparse_launches(conv, pass_, arch):
    """(variant, config, launches) of lk3d's block-sparse kernels for ``pass_`` of ``conv``
    (``conv.block`` and ``conv.density`` set; channel blocks, not depthwise), recorded from the
    launchers with the arch's default config; the block index is a meta tensor of ``conv.nnz``
    entries (the launches depend on its size, not its values)."""
    from lk3d import _block_sparse_launch
    from lk3d.kernels import block_sparse as bs

    if conv.weight[1] == 1:
        raise ValueError("weight: the estimate covers channel-block (not depthwise) block-sparse "
                         f"kernels, got Cin/groups = 1 in {conv.weight}")
    x, _, spec = _checked(conv)
    meta = dict(dtype=x.dtype, device="meta")
    nnz, block = conv.nnz, tuple(conv.block)
    values = torch.empty((nnz, *block), **meta)
    row_ptr = torch.empty(conv.weight[0] // block[0] + 1, dtype=torch.int32, device="meta")
    col = torch.empty(nnz, dtype=torch.int32, device="meta")
    geometry = (spec.stride, spec.padding, spec.dilation)
    if pass_ not in BS_PASSES:
        raise ValueError(f"pass: expected one of {BS_PASSES}, got {pass_!r}")
    problem = _block_sparse_launch.problem(pass_, conv.input, conv.weight, block, nnz,
                                           *geometry)
    fields = {f.name: getattr(problem, f.name) for f in dataclasses.fields(problem)
              if f.name != "kind"}
    config, problem, fam, programs = _default_config(problem.kind, fields, arch,
                                                     x.element_size())
    args = (values, row_ptr, col, conv.weight, block)
    if pass_ == "forward":
        return "sparse", config, record(bs, bs.block_sparse_fwd, x, *args, None, *geometry,
                                        conv.groups, config)
    dy = torch.empty((conv.input[0], conv.weight[0], *spec.out_size), **meta)
    if pass_ == "grad_input":
        return "sparse", config, record(bs, bs.block_sparse_bwd_input, dy, *args, conv.input,
                                        *geometry, conv.groups, config)
    config["SPLIT"] = fam.split(problem, config, programs)
    return "sparse", config, record(bs, bs.block_sparse_bwd_values, dy, x, *args, *geometry,
                                    conv.groups, config)


def launches(conv, pass_, arch):
    """(variant, config, launches) of ``pass_`` of ``conv`` on ``sm_<arch>``."""
    if conv.rank:
        return cp_launches(conv, pass_, arch)
    if conv.block:
        return block_sparse_launches(conv, pass_, arch)
    return tiled_launches(conv, pass_, arch)


def _executed_flops(launch):
    """FLOPs a launch computes, masked-off work included (by its kernel's loop structure)."""
    a, programs = launch.args, math.prod(launch.grid)
    taps = a["KD"] * a["KH"] * a["KW"]
    if launch.name == "conv3d_igemm_kernel":
        steps = taps * -(-a["KC"] // a["BLOCK_K"])
        return 2 * programs * a["BLOCK_M"] * a["BLOCK_N"] * a["BLOCK_K"] * steps
    if launch.name == "conv3d_dw_kernel":
        return 2 * programs * a["BLOCK"] * taps * (a["MULT"] if a["TRANSPOSED"] else 1)
    if launch.name == "conv3d_wgrad_kernel":
        return 2 * programs * a["BLOCK_CO"] * a["BLOCK_CI"] * a["M_PER_SPLIT"]
    if launch.name == "conv3d_dw_wgrad_kernel":
        return 2 * programs * a["BLOCK_T"] * a["M_PER_SPLIT"]
    if launch.name == "bs_conv3d_kernel" and not a["DEPTHWISE"]:  # every M tile walks all blocks
        nnz = launch.args["v_ptr"].shape[0]
        steps = nnz * a["BD"] * a["BH"] * a["BW"]
        return 2 * a["NUM_M"] * a["BLOCK_M"] * a["BLOCK_K"] * a["BLOCK_N"] * steps
    if launch.name == "bs_conv3d_wgrad_kernel" and not a["DEPTHWISE"]:
        return 2 * programs * a["BLOCK_I"] * a["BLOCK_O"] * a["M_PER_SPLIT"]
    tiles = programs * a.get("TILES", 1)
    rows = 2 * tiles * a.get("BLOCK_M", 0) * a.get("R_PAD", 0)  # x columns x reduction
    epilogue = -(-a.get("NC", 0) // a.get("BLOCK_N", 1)) * a.get("BLOCK_N", 0)
    if launch.name == "cp_conv_kernel":
        return rows * (a["BLOCK_K"] * a["STEPS"] + epilogue * (a["WRITE_Y"] + a["EMIT_GQ"]))
    if launch.name == "cp_grad_kernel":
        return rows * (a["BLOCK_K"] * a["STEPS"] * (a["NEED_OUT"] + a["NEED_TAPS"])
                       + epilogue * (a["NEED_OUT"] + a["NEED_TAPS"]))
    raise ValueError(f"kernel: no FLOP count for {launch.name!r}")


def _useful_flops(conv, pass_):
    """The op's own FLOPs for one pass: 2 · Cin/g · k³ per output element (every pass alike);
    CP: 2 · R · (Cin + kd + kh + kw + Cout) per output voxel, the backward twice that;
    block-sparse: the dense count times the density."""
    x, _, spec = _checked(conv)
    voxels = conv.input[0] * math.prod(spec.out_size)
    if conv.rank:
        cout, cin, *kernel = conv.weight
        per = 2 * conv.rank * (cin + sum(kernel) + cout)
        return per * voxels * (2 if pass_ == "backward" else 1)
    dense = 2 * math.prod(conv.weight[1:]) * conv.weight[0] * voxels
    return dense * conv.density if conv.block else dense


def _bytes(launch):
    """The least bytes a launch moves: each tensor it is passed, read or written once."""
    tensors = {id(v): v for v in launch.args.values() if isinstance(v, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _whole(text):
    """The whole kernel as one step, for a kernel whose SASS has no loop."""
    body = tuple(sass.parse(text))
    return sass.Loop(body[0].address, body[-1].address, body)


def estimate(conv, arch, passes=None, case_id=None):
    """One record per launch of lk3d's Triton kernels for each of ``passes`` of ``conv`` (a
    ``Conv``) on ``sm_<arch>``, with the keys ``lk3d estimate --json`` writes."""
    from lk3d.tools import aot

    device = device_figures(arch)
    planned = []
    for pass_ in passes or conv.passes:
        variant, config, recorded = launches(conv, pass_, arch)
        planned += [(pass_, variant, config, ln) for ln in recorded]
    compiled = compile_launches([ln for *_, ln in planned], arch)
    records = []
    for (pass_, variant, config, ln), kernel in zip(planned, compiled):
        if isinstance(kernel, Exception):
            raise kernel
        usage = aot.resource_usage(kernel)
        text = aot.sass(kernel)
        loop = sass.innermost_loop(text) or _whole(text)
        step, unit = sass.step_flops(loop, ln.num_warps)
        executed, nbytes = _executed_flops(ln), _bytes(ln)
        r = issue_ceiling(loop.instructions, ln.num_warps, step, unit, device, conv.dtype,
                          executed, nbytes)
        records.append({
            "case": case_id or conv.id, "op": conv.op, "pass": pass_, "variant": variant,
            "arch": arch, "dtype": conv.dtype, "kernel": ln.name, "config": ln.config or config,
            "grid": list(ln.grid), "registers": usage.registers,
            "spill_bytes": usage.spill_bytes, "shared_bytes": usage.shared_bytes,
            "loop_instructions": loop.instructions, "loop_counts": loop.counts(),
            "executed_flops": executed, "useful_flops": _useful_flops(conv, pass_),
            "bytes": nbytes, "unit": unit,
            "peak_tflops": r["peak"], "issue_ceiling_tflops": r["ceiling"],
            "fraction": r["fraction"], "modelled_ms": executed / (r["ceiling"] * 1e12) * 1e3})
    return records


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def table(records):
    """The records as a text table, one line per launch."""
    header = (f"{'pass':<12} {'kernel':<24} {'grid':>8} {'regs':>4} {'smem':>6} {'loop':>5} "
              f"{'hot':<16} {'unit':<6} {'peak':>7} {'ceiling':>8} {'frac':>6} {'ms':>8}")
    lines = [header, "-" * len(header)]
    for r in records:
        unit_ops = sass.TENSOR_OPS if r["unit"] == "tensor" else sass.FMA_OPS
        hot = ", ".join(f"{n} {op}" for op, n in r["loop_counts"].items() if op in unit_ops)
        lines.append(f"{r['pass']:<12} {r['kernel']:<24} {math.prod(r['grid']):>8} "
                     f"{r['registers']:>4} {r['shared_bytes']:>6} {r['loop_instructions']:>5} "
                     f"{hot:<16} {r['unit']:<6} {r['peak_tflops']:>7.1f} "
                     f"{r['issue_ceiling_tflops']:>8.2f} {r['fraction']:>6.1%} "
                     f"{r['modelled_ms']:>8.2f}")
    return "\n".join(lines)


def run(args, parser):
    conv = Conv(args.input, args.weight, args.dtype,
                1 if args.stride is None else args.stride,
                0 if args.padding is None else args.padding,
                1 if args.dilation is None else args.dilation, args.groups or 1, args.rank,
                args.block, args.density)
    if (args.block is None) != (args.density is None) or (args.block and args.rank):
        parser.error("expected --block and --density together (block-sparse), or --rank (CP), "
                     "or neither")
    passes = tuple(args.passes.split(",")) if args.passes else conv.passes
    if any(p not in conv.passes for p in passes):
        parser.error(f"--passes: expected a comma-separated subset of {','.join(conv.passes)}, "
                     f"got {args.passes!r}")
    try:
        records = estimate(conv, args.arch, passes, args.case_id)
    except (TypeError, ValueError) as e:  # lk3d's argument checks name the argument
        parser.error(str(e))
    device = device_figures(args.arch)
    print(f"{records[0]['case']} ({conv.op}, {conv.dtype}) on sm_{args.arch}: issue ceilings "
          f"for {device['name']} ({device['sms']} SMs, {device['clock_ghz']} GHz, "
          f"{device['bandwidth_tbs']} TB/s), TFLOP/s")
    print(table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


def _density(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def add_parser(sub):
    """The ``estimate`` subcommand of the ``lk3d`` parser's ``sub``."""
    from lk3d.tools.cli_explain import _ints, _one_or_three, _one_positive, _padding

    p = sub.add_parser("estimate", help="issue ceilings of lk3d's Triton kernels on a GPU, from "
                       "their machine code (no GPU needed)",
                       description="Record each launch lk3d's Triton kernels make for each pass "
                       "of a convolution (the arch's default config), compile it ahead of time "
                       "for sm_80 or sm_90, count the innermost loop of its SASS and print the "
                       "issue ceiling: the FLOP/s its instructions per step allow at 4 "
                       "warp-instructions per clock per SM, capped by the unit's peak and the "
                       "bandwidth. E.g. --arch 90 --input 1,64,64,64,64 --weight 64,64,7,7,7 "
                       "--dtype bf16 --padding same.")
    p.add_argument("--arch", type=int, choices=sorted(_DEVICES), default=90,
                   help="the SM version to compile for (default: 90)")
    p.add_argument("--input", type=_ints(5, "N,C,D,H,W"), metavar="N,C,D,H,W", required=True)
    p.add_argument("--weight", type=_ints(5, "Cout,Cin/groups,kd,kh,kw"), required=True,
                   metavar="Cout,Cin/g,kd,kh,kw")
    p.add_argument("--groups", type=_one_positive("groups"), metavar="G", help="default: 1")
    p.add_argument("--stride", type=_one_or_three("stride", 1), metavar="S",
                   help="an int or 3 (default: 1)")
    p.add_argument("--padding", type=_padding, metavar="P",
                   help="same, valid, an int or 3 (default: 0)")
    p.add_argument("--dilation", type=_one_or_three("dilation", 1), metavar="D",
                   help="an int or 3 (default: 1)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="default: bf16")
    p.add_argument("--rank", type=_one_positive("rank"), metavar="R",
                   help="a rank-R CP kernel of the --weight's shape (lk3d.cp_conv3d)")
    p.add_argument("--block", type=_ints(5, "bo,bi,bd,bh,bw"), metavar="bo,bi,bd,bh,bw",
                   help="a block-sparse kernel of these blocks (lk3d.block_sparse_conv3d)")
    p.add_argument("--density", type=_density, metavar="F",
                   help="block-sparse: the fraction of blocks stored, in (0, 1]")
    p.add_argument("--passes", help=f"comma-separated (default: all: {','.join(PASSES)}; CP: "
                   f"{','.join(CP_PASSES)}; block-sparse: {','.join(BS_PASSES)})")
    p.add_argument("--case-id", help="the records' case (default: one made of the shapes)")
    p.add_argument("--json", metavar="PATH", help="write the records here (a JSON list)")
    p.set_defaults(func=run, subparser=p)
