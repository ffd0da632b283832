"""The launches lk3d's launchers make, recorded without a GPU, and what they compute.

``record`` calls a launcher (``lk3d.kernels.tiled``, ``depthwise``, ``cp``, ``block_sparse``) on
``device="meta"`` tensors with its module's ``@triton.jit`` kernels swapped for recorders: each
``kernel[grid](...)`` appends a ``Launch`` (kernel, every argument, grid, warps, stages) instead
of running. ``specialize`` types a launch's arguments as the JIT does (ints equal to 1 and None
become constexprs, ints divisible by 16 and 16-byte-aligned pointers are marked so; a meta tensor
counts as a fresh, aligned allocation), and ``compile_launches`` compiles them ahead of time
(``lk3d.tools.aot``). ``interpreted_compile_keys`` records the ``compile_key`` of each launch
the Triton interpreter runs: what a GPU's JIT would compile for the same calls (the tests count
those of the CUDA test subset with it, tests/conftest.py).

``launches(conv, pass_, arch)`` gives the launches of one pass of a convolution (``Conv``: dense,
grouped, depthwise, rank-R CP, block-sparse with channel blocks or depthwise) with the config lk3d
picks on the arch's GPU; ``executed_flops``, ``useful_flops`` and ``launch_bytes`` what each
computes and moves, ``kernel_kind`` the kernel kind the CUDA cost models price it as.
``lk3d.tools.estimate`` turns them into issue ceilings.
"""
import contextlib
import dataclasses
import inspect
import math
from dataclasses import dataclass

import torch

PASSES = ("forward", "grad_input", "grad_weight")
BIAS_PASS = "grad_bias"  # lk3d.conv3d's backward with a bias: its own op and launch
CP_PASSES = ("forward", "backward")
BS_PASSES = ("forward", "grad_input", "grad_values")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
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
    copied: int = 0      # bytes the launcher's own copies move before it (layout, weight packing)


def _raw(kernel):
    return kernel.fn


def _is_constexpr(kernel, name):
    import triton.language as tl

    annotation = inspect.signature(_raw(kernel)).parameters[name].annotation
    return annotation is tl.constexpr or "constexpr" in str(annotation)


def _bind(kernel, args, kwargs):
    """(every argument name -> value, the launch options given) of ``kernel[grid](*args,
    **kwargs)``; ``kwargs`` is left as it is."""
    options = {k: v for k, v in kwargs.items() if k in _LAUNCH_OPTIONS}
    bound = dict(zip(kernel.arg_names, args),
                 **{k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS})
    for name, p in inspect.signature(_raw(kernel)).parameters.items():
        if name not in bound and p.default is not inspect.Parameter.empty:
            bound[name] = p.default
    return bound, options


class _Recorder:
    """Stands in for a kernel in its module: ``kernel[grid](*args, **kwargs)`` appends a Launch."""

    def __init__(self, kernel, name, launches):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            bound, options = _bind(self.kernel, args, kwargs)
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
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
             torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64",
             torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.bool: "u1"}
    if isinstance(value, torch.Tensor):
        aligned = value.device.type == "meta" or value.data_ptr() % 16 == 0
        return f"*{names[value.dtype]}", "D" if aligned else ""
    if hasattr(value, "block_shape") and hasattr(value, "base"):  # a host TensorDescriptor
        return f"tensordesc<{names[value.base.dtype]}{list(value.block_shape)}>", None
    raise TypeError(f"argument: expected a tensor, tensor descriptor, int, float, bool or None, "
                    f"got {type(value).__name__}")


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
    parameters and ints equal to 1 (and None) as constexprs, the others typed by value (a host
    tensor descriptor as ``tensordesc<bf16[1, 1, 8, 16, 64]>``: its dtype and block shape), ints
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


def compile_key(launch, fp_fusion=True):
    """What the JIT compiles ``launch`` as, one binary per distinct key and device: the kernel's
    name, its signature (every argument's type, or constexpr), the constexprs' values, the
    arguments marked divisible by 16 (``specialize``), warps, stages and fp fusion. As a
    JSON-ready dict; ``json.dumps(key, sort_keys=True)`` tells keys apart."""
    signature, constexprs, divisible = specialize(launch)
    return {"kernel": launch.name, "signature": signature,
            "constexprs": {k: repr(v) for k, v in constexprs.items()}, "divisible": divisible,
            "num_warps": launch.num_warps, "num_stages": launch.num_stages,
            "enable_fp_fusion": fp_fusion}


@contextlib.contextmanager
def interpreted_compile_keys():
    """A list that receives the ``compile_key`` of each kernel launch Triton's interpreter runs
    (``TRITON_INTERPRET=1``) while the block runs, in order, repeats included: the kernel binaries
    a GPU's JIT would compile for the same calls, as far as the calls take the same configs and
    specialise alike there (a GPU's default configs and reduction splits can differ from the
    interpreter's, and a dtype the kernels take only there adds its own)."""
    from triton.runtime.interpreter import InterpretedFunction

    keys = []
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            bound, options = _bind(self, args, kwargs)
            launch = Launch(self, self.__name__, bound, (), options.get("num_warps", 4),
                            options.get("num_stages", 3))
            keys.append(compile_key(launch, options.get("enable_fp_fusion", True)))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        yield keys
    finally:
        InterpretedFunction.run = run


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
    bias: bool = False  # lk3d.conv3d with a bias: its backward launches the grad-bias kernel

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
                + (f"-b{'x'.join(map(str, self.block))}-d{self.density:g}" if self.block else "")
                + ("-bias" if self.bias and not (self.rank or self.block) else ""))

    @property
    def passes(self):
        """The passes of the op: CP's backward is one pass (its grad-input and factor kernels);
        lk3d.conv3d's grad-bias one where it has a bias (CP and block-sparse sum their bias
        gradients in torch: no kernel)."""
        if self.rank:
            return CP_PASSES
        if self.block:
            return BS_PASSES
        return PASSES + (BIAS_PASS,) if self.bias else PASSES

    @property
    def nnz(self):
        """Stored blocks of a block-sparse kernel: the density's share of all blocks (Cout/bo
        block rows of (Cin/g)/bi block columns and the taps' bricks; >= 1)."""
        blocks = math.prod(w // b for w, b in zip(self.weight, self.block))
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
    from lk3d.tools.estimate import device_figures
    from lk3d.autotune import configs

    device = device_figures(arch)
    problem = configs.Problem(kind=kind, **problem_fields)
    fam = configs.family(kind)
    config = fam.pick(problem, device["smem_limit"], element_size)
    return config, problem, fam, 4 * device["sms"]


def tiled_launches(conv, pass_, arch, fallback=False):
    """(variant, config, launches) of lk3d's tiled kernels for ``pass_`` of ``conv`` on
    ``sm_<arch>``, recorded from the launchers with the arch's default config. Depthwise
    problems the channels-innermost kernels serve (``lk3d._algos.direct_depthwise``) are the
    variant "channels_last", dense and grouped ones the tensor-descriptor GEMM serves
    (``descriptor_gemm``) the variant "descriptor"; with ``fallback``, the kernel the others
    take instead ("direct", "gather")."""
    from lk3d._algos import descriptor_gemm, direct_depthwise
    from lk3d.kernels import depthwise as dw_cl, tiled

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
        op = "conv3d" if pass_ == "forward" else "conv3d_grad_input"
        if not fallback and direct_depthwise(op, conv.input, conv.weight, spec.stride):
            config, *_ = _default_config("conv3d_dw_cl", dict(M=produced[2], NC=cout, taps=taps),
                                         arch, size)
            if pass_ == "forward":
                return "channels_last", config, record(dw_cl, dw_cl.conv3d_dw_cl_fwd, x, w,
                                                       None, *geometry, config)
            return "channels_last", config, record(dw_cl, dw_cl.conv3d_dw_cl_bwd_input, dy, w,
                                                   conv.input, *geometry, config)
        if depthwise:
            config, *_ = _default_config("conv3d_dw", dict(M=M, taps=taps), arch, size)
            if pass_ == "forward":
                return "direct", config, record(tiled, tiled.conv3d_dw_fwd, x, w, None,
                                                *geometry, config)
            return "direct", config, record(tiled, tiled.conv3d_dw_bwd_input, dy, w, conv.input,
                                            *geometry, config)
        kc, nc = (cig, cout // conv.groups) if pass_ == "forward" else (cout // conv.groups, cig)
        if not fallback and descriptor_gemm(op, conv.input, conv.weight, spec.stride,
                                            conv.groups, x.dtype):
            return descriptor_launches(conv, pass_, arch, x, w, dy, geometry, M, kc, nc)
        config, *_ = _default_config("conv3d_fwd", dict(M=conv.input[0] * M, KC=kc, NC=nc,
                                                        taps=taps), arch, size)
        if pass_ == "forward":
            return "gather", config, record(tiled, tiled.conv3d_fwd, x, w, None, *geometry,
                                            conv.groups, config)
        return "gather", config, record(tiled, tiled.conv3d_bwd_input, dy, w, conv.input,
                                        *geometry, conv.groups, config)
    M = conv.input[0] * math.prod(spec.out_size)
    if pass_ == BIAS_PASS and conv.bias:
        fields = dict(M=M, programs=cout, partial=1)
        config, problem, fam, programs = _default_config("bias_grad", fields, arch, size)
        config["SPLIT"] = fam.split(problem, config, programs)
        return "direct", config, record(tiled, tiled.bias_grad, dy, config)
    if pass_ != "grad_weight":
        raise ValueError(f"pass: expected one of {conv.passes}, got {pass_!r}")
    if not fallback and direct_depthwise("conv3d_grad_weight", conv.input, conv.weight,
                                         spec.stride):
        fields = dict(M=M, NC=cout, taps=taps, partial=cout * taps)
        config, problem, fam, programs = _default_config("conv3d_dw_cl_wgrad", fields, arch, size)
        strips, _ = fam.tap_strip(conv.weight[4], config["KT"])
        fields["programs"] = -(-cout // config["BLOCK_C"]) * math.prod(conv.weight[2:4]) * strips
        config["SPLIT"] = fam.split(dataclasses.replace(problem, programs=fields["programs"]),
                                    config, programs)
        return "channels_last", config, record(dw_cl, dw_cl.conv3d_dw_cl_bwd_weight, x, dy,
                                               conv.weight, *geometry, config)
    if not fallback and descriptor_gemm("conv3d_grad_weight", conv.input, conv.weight,
                                        spec.stride, conv.groups, x.dtype):
        return descriptor_wgrad_launches(conv, arch, x, dy, geometry, M)
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


def descriptor_launches(conv, pass_, arch, x, w, dy, geometry, M, kc, nc):
    """(variant "descriptor", config, launches) of the tensor-descriptor implicit GEMM
    (``lk3d.kernels.implicit_gemm``) for the forward or grad-input of ``conv``, its operands as
    the launcher passes them on the arch (sm_90: descriptors; sm_80: pointers). Grad-input is
    one launch per stride phase with taps (one at stride 1). ``copied`` counts the launcher's
    copies: each launch's packed (sub-)kernel (read and written once), and on the first launch
    the NCDHW operand to NDHWC (likewise) and the zero fill of phases no tap reaches (written
    once)."""
    from lk3d.kernels import implicit_gemm

    fields = dict(M=conv.input[0] * M, KC=kc, NC=nc, taps=math.prod(conv.weight[2:]))
    config, *_ = _default_config("conv3d_desc", fields, arch, x.element_size())
    if pass_ == "forward":
        operand, produced = x, math.prod((conv.input[0], conv.weight[0], *dy.shape[2:]))
        recorded = record(implicit_gemm, implicit_gemm.conv3d_desc_fwd, x, w, None, *geometry,
                          conv.groups, config, tma=arch >= 90)
    else:
        operand, produced = dy, math.prod(conv.input)
        recorded = record(implicit_gemm, implicit_gemm.conv3d_desc_bwd_input, dy, w, conv.input,
                          *geometry, conv.groups, config, tma=arch >= 90)
    size = w.element_size()
    first = (produced - sum(ln.args["y_ptr"].numel() for ln in recorded)) * size
    if not operand.is_contiguous(memory_format=torch.channels_last_3d):
        first += 2 * operand.numel() * size
    return "descriptor", config, [
        dataclasses.replace(ln, copied=2 * getattr(ln.args["w"], "base", ln.args["w"]).numel()
                            * size + (first if i == 0 else 0))
        for i, ln in enumerate(recorded)]


def descriptor_wgrad_launches(conv, arch, x, dy, geometry, M):
    """(variant "descriptor", config, launches) of the tensor-descriptor grad-weight
    (``lk3d.kernels.implicit_gemm.conv3d_desc_wgrad_kernel``) of ``conv`` (``M`` grad-output
    voxels reduced), its operands as the launcher passes them on the arch (sm_90: descriptors;
    sm_80: pointers); each launch's ``copied`` counts the launcher's copies of the NCDHW input
    and grad_output to NDHWC (read and written once)."""
    from lk3d.kernels import implicit_gemm

    cout, cig, *kernel = conv.weight
    fields = dict(M=M, KC=cig, NC=cout // conv.groups, taps=math.prod(kernel),
                  partial=cout * cig * math.prod(kernel))
    config, problem, fam, programs = _default_config("conv3d_desc_wgrad", fields, arch,
                                                     x.element_size())
    strips, _ = fam.tap_strip(kernel[2], config["TAPS"])
    fields["programs"] = (conv.groups * (cout // conv.groups // config["BLOCK_CO"])
                          * (cig // config["BLOCK_CI"]) * kernel[0] * kernel[1] * strips)
    config["SPLIT"] = fam.split(dataclasses.replace(problem, programs=fields["programs"]),
                                config, programs)
    recorded = record(implicit_gemm, implicit_gemm.conv3d_desc_bwd_weight, x, dy, conv.weight,
                      *geometry, conv.groups, config, tma=arch >= 90)
    copied = sum(2 * t.numel() * t.element_size() for t in (x, dy)
                 if not t.is_contiguous(memory_format=torch.channels_last_3d))
    return "descriptor", config, [dataclasses.replace(ln, copied=copied) for ln in recorded]


def cp_launches(conv, pass_, arch, variant="separable"):
    """(variant, config, launches) of lk3d's CP kernels for ``pass_`` ("forward" or "backward")
    of ``conv`` (``conv.rank`` set), recorded from the launchers with the arch's default configs.
    ``variant`` "separable" (what the planner runs on CUDA): the separable sequence of
    ``cp_sep_kernel`` launches (forward: the U_in projection, the W and H passes, the D pass with
    the U_out projection; backward: the forward's intermediates recomputed, the G sums, the
    grad_output projection and the three transposed passes with their tap sums, the last one
    projecting back through U_in); "fused": the k³ fused kernels (backward: grad-input with grad
    U_in, then the factors' sums, each launch carrying its own config: ``Launch.config``)."""
    from lk3d.kernels import cp

    x, _, spec = _checked(conv)
    meta = dict(dtype=x.dtype, device="meta")
    cout, cin, *kernel = conv.weight
    rank, taps, size = conv.rank, math.prod(kernel), x.element_size()
    factors = [torch.empty((n, rank), **meta) for n in (cout, cin, *kernel)]
    geometry = (spec.stride, spec.padding, spec.dilation)
    n = conv.input[0]
    if pass_ not in CP_PASSES:
        raise ValueError(f"pass: expected one of {CP_PASSES}, got {pass_!r}")
    if variant == "separable":
        fields = dict(M=n * math.prod(conv.input[2:]), KC=cin, NC=max(cin, cout),
                      taps=max(kernel), rank=rank, partials=pass_ == "backward")
        config, problem, fam, programs = _default_config("cp_sep", fields, arch, size)
        if pass_ == "forward":
            return variant, config, record(cp, cp.cp_sep_fwd, x, *factors, None, None,
                                           *geometry, config)
        config["SPLIT"] = fam.split(problem, config, programs)
        dy = torch.empty((n, cout, *spec.out_size), **meta)
        return variant, config, record(cp, cp.cp_sep_bwd, dy, x, *factors, None, *geometry,
                                       config, [True] * 7)
    if variant != "fused":
        raise ValueError(f"variant: expected 'separable' or 'fused', got {variant!r}")
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


def block_sparse_launches(conv, pass_, arch, fallback=False):
    """(variant, config, launches) of lk3d's block-sparse kernels for ``pass_`` of ``conv``
    (``conv.block`` and ``conv.density`` set; channel blocks, or depthwise: Cin/g = 1),
    recorded from the launchers with the arch's default config; the block index is a meta
    tensor of ``conv.nnz`` entries (the launches depend on its size, not its values). Problems
    the tensor-descriptor kernel serves (``lk3d._block_sparse_launch.descriptor``) are the
    variant "descriptor" (its launch's ``copied``: the operand to NDHWC and the stored blocks
    repacked, each read and written); with ``fallback`` and the others, "sparse"
    (``lk3d.kernels.block_sparse``)."""
    from lk3d import _block_sparse_launch
    from lk3d.kernels import block_sparse as bs, block_sparse_desc as bsd

    x, _, spec = _checked(conv)
    meta = dict(dtype=x.dtype, device="meta")
    nnz, block = conv.nnz, tuple(conv.block)
    values = torch.empty((nnz, *block), **meta)
    row_ptr = torch.empty(conv.weight[0] // block[0] + 1, dtype=torch.int32, device="meta")
    col = torch.empty(nnz, dtype=torch.int32, device="meta")
    geometry = (spec.stride, spec.padding, spec.dilation)
    if pass_ not in BS_PASSES:
        raise ValueError(f"pass: expected one of {BS_PASSES}, got {pass_!r}")
    desc = not fallback and _block_sparse_launch.descriptor(pass_, x.dtype, conv.weight, block,
                                                            spec.stride, conv.input[1])
    problem = _block_sparse_launch.problem(pass_, conv.input, conv.weight, block, nnz,
                                           *geometry, x.dtype if desc else None)
    fields = {f.name: getattr(problem, f.name) for f in dataclasses.fields(problem)
              if f.name != "kind"}
    config, problem, fam, programs = _default_config(problem.kind, fields, arch,
                                                     x.element_size())
    args = (values, row_ptr, col, conv.weight, block)
    dy = torch.empty((conv.input[0], conv.weight[0], *spec.out_size), **meta)
    if desc:
        operand = x if pass_ == "forward" else dy
        if pass_ == "forward":
            recorded = record(bsd, bsd.block_sparse_desc_fwd, x, *args, None, *geometry,
                              conv.groups, config, tma=arch >= 90)
        elif pass_ == "grad_input":
            recorded = record(bsd, bsd.block_sparse_desc_bwd_input, dy, *args, conv.input,
                              *geometry, conv.groups, config, tma=arch >= 90)
        else:
            config["SPLIT"] = fam.split(problem, config, programs)
            recorded = record(bsd, bsd.block_sparse_desc_bwd_values, dy, x, *args, *geometry,
                              conv.groups, config, tma=arch >= 90)
            copied = 2 * (x.numel() + dy.numel()) * x.element_size()
            return "descriptor", config, [dataclasses.replace(ln, copied=copied)
                                          for ln in recorded]
        copied = 2 * (operand.numel() + values.numel()) * x.element_size()
        return "descriptor", config, [dataclasses.replace(ln, copied=copied) for ln in recorded]
    if pass_ == "forward":
        return "sparse", config, record(bs, bs.block_sparse_fwd, x, *args, None, *geometry,
                                        conv.groups, config)
    if pass_ == "grad_input":
        return "sparse", config, record(bs, bs.block_sparse_bwd_input, dy, *args, conv.input,
                                        *geometry, conv.groups, config)
    config["SPLIT"] = fam.split(problem, config, programs)
    return "sparse", config, record(bs, bs.block_sparse_bwd_values, dy, x, *args, *geometry,
                                    conv.groups, config)


def variants(conv, pass_, arch):
    """Every variant's (variant, config, launches) of ``pass_`` of ``conv`` on ``sm_<arch>``:
    the alternatives the CUDA planner prices (CP: "separable" and "fused"; problems the
    channels-innermost depthwise or the tensor-descriptor kernels serve, block-sparse ones
    included: those and the kernel the other problems take), the first being what ``launches``
    gives."""
    if conv.rank:
        return [cp_launches(conv, pass_, arch, v) for v in ("separable", "fused")]
    first = launches(conv, pass_, arch)
    if conv.block and first[0] == "descriptor":
        return [first, block_sparse_launches(conv, pass_, arch, fallback=True)]
    if not conv.block and first[0] in ("channels_last", "descriptor"):
        return [first, tiled_launches(conv, pass_, arch, fallback=True)]
    return [first]


def launches(conv, pass_, arch):
    """(variant, config, launches) of ``pass_`` of ``conv`` on ``sm_<arch>``."""
    if conv.rank:
        return cp_launches(conv, pass_, arch)
    if conv.block:
        return block_sparse_launches(conv, pass_, arch)
    return tiled_launches(conv, pass_, arch)


def _inside(o, k, size, stride, pad, dil):
    """Whether output ``o``'s tap ``k`` reads inside an input axis of ``size``."""
    return 0 <= o * stride - pad + k * dil < size


def executed_flops(launch):
    """FLOPs a launch computes, masked-off work included (by its kernel's loop structure)."""
    a, programs = launch.args, math.prod(launch.grid)
    if launch.name == "bias_grad_kernel":  # one add per element read
        return programs * -(-a["M_PER_SPLIT"] // a["BLOCK_S"]) * a["BLOCK_S"]
    if launch.name == "cp_sep_kernel":  # [BLOCK_M, R_PAD] tiles: projection, taps, epilogue
        rows = 2 * programs * a["TILES"] * a["BLOCK_M"] * a["R_PAD"]
        if a["PROJECT"]:
            return rows * -(-a["SC"] // a["BLOCK_K"]) * a["BLOCK_K"]
        epilogue = -(-a["NC"] // a["BLOCK_N"]) * a["BLOCK_N"]
        taps = a["K"] * ((a["WRITE"] or a["EMIT_G"]) + a["EMIT_TAPS"])
        return rows * (taps + epilogue * ((a["OUT_PROJ"] and a["WRITE"]) + a["EMIT_G"]))
    if launch.name == "bs_conv3d_desc_wgrad_kernel":  # every group's entries over every brick
        rows = a["NUM_M"] * a["BLOCK_H"] * a["BLOCK_W"]
        return 2 * rows * a["BI"] * a["BO"] * a["GROUPS"] * a["GROUP"]
    if launch.name == "bs_conv3d_desc_kernel":  # every entry of its block over every brick
        entries = launch.args["word_ptr"].shape[0] - 1
        rows = a["NUM_M"] * a["BLOCK_H"] * a["BLOCK_W"] * (2 if a["PAIR"] else 1)
        return 2 * rows * a["BK"] * a["BN"] * entries
    taps = a["KD"] * a["KH"] * a["KW"]
    if launch.name == "conv3d_desc_kernel":  # every tap of every brick, padded channel blocks
        rows = a["NUM_M"] * a["BLOCK_H"] * a["BLOCK_W"]
        n_blocks = launch.grid[0] // a["NUM_M"]  # channel blocks × groups
        return 2 * rows * n_blocks * a["BLOCK_N"] * a["KC"] * taps
    if launch.name == "conv3d_desc_wgrad_kernel":  # every brick, every tap of every strip
        strips = -(-a["KW"] // a["TAPS"])
        tiles = a["G"] * a["COG"] * a["CIG"] * a["KD"] * a["KH"] * strips * a["TAPS"]
        return 2 * tiles * a["BRICKS"] * a["BLOCK_H"] * a["BLOCK_W"]
    if launch.name == "conv3d_igemm_kernel":
        steps = taps * -(-a["KC"] // a["BLOCK_K"])
        return 2 * programs * a["BLOCK_M"] * a["BLOCK_N"] * a["BLOCK_K"] * steps
    if launch.name == "conv3d_dw_cl_kernel":
        return 2 * programs * a["BLOCK_V"] * a["R"] * a["BLOCK_C"] * taps
    if launch.name == "conv3d_dw_cl_wgrad_kernel":  # only the rows whose input row is inside
        rows = [sum(_inside(o, k, a["X" + ax], a["STR_" + ax],
                            a["PAD_" + ax], a["DIL_" + ax]) for o in range(a["Y" + ax])
                    for k in range(a["K" + ax])) for ax in ("D", "H")]
        steps = a["N"] * rows[0] * rows[1] * a["NUM_W"]
        channels = -(-a["C"] // a["BLOCK_C"]) * a["BLOCK_C"]
        taps = -(-a["KW"] // a["KT"]) * a["KT"]
        return 2 * steps * a["BLOCK_V"] * a["R"] * channels * taps
    if launch.name == "conv3d_dw_kernel":
        return 2 * programs * a["BLOCK"] * taps * (a["MULT"] if a["TRANSPOSED"] else 1)
    if launch.name == "conv3d_wgrad_kernel":
        return 2 * programs * a["BLOCK_CO"] * a["BLOCK_CI"] * a["M_PER_SPLIT"]
    if launch.name == "conv3d_dw_wgrad_kernel":
        return 2 * programs * a["BLOCK_T"] * a["M_PER_SPLIT"]
    if launch.name == "bs_conv3d_kernel":  # every M tile walks all blocks
        nnz = launch.args["v_ptr"].shape[0]
        steps = nnz * a["BD"] * a["BH"] * a["BW"]
        reduced = 1 if a["DEPTHWISE"] else a["BLOCK_K"]  # depthwise: one product per channel
        return 2 * a["NUM_M"] * a["BLOCK_M"] * reduced * a["BLOCK_N"] * steps
    if launch.name == "bs_conv3d_wgrad_kernel":  # depthwise: BLOCK_I = 1
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


def useful_flops(conv, pass_):
    """The op's own FLOPs for one pass: 2 · Cin/g · k³ per output element (every pass alike);
    grad-bias: one add per output element; CP: 2 · R · (Cin + kd + kh + kw + Cout) per output
    voxel, the backward twice that; block-sparse: the dense count times the density."""
    x, _, spec = _checked(conv)
    voxels = conv.input[0] * math.prod(spec.out_size)
    if pass_ == BIAS_PASS:
        return conv.weight[0] * voxels
    if conv.rank:
        cout, cin, *kernel = conv.weight
        per = 2 * conv.rank * (cin + sum(kernel) + cout)
        return per * voxels * (2 if pass_ == "backward" else 1)
    dense = 2 * math.prod(conv.weight[1:]) * conv.weight[0] * voxels
    return dense * conv.density if conv.block else dense


def kernel_kind(launch):
    """The kernel kind the CUDA cost models price ``launch`` as (``lk3d._cuda_model``'s
    ``KERNEL_KINDS``), from its kernel and, for block-sparse, its channel blocks:
    ``block_sparse_<bo>x<bi>`` or ``block_sparse_depthwise`` (forward and grad-input), with
    ``_wgrad`` for the grad-values kernel (16x16 are the models'), and ``block_sparse_desc``
    for the tensor-descriptor block-sparse kernel (any channel blocks); the separable CP kernel's
    launches are ``cp_separable_tensor`` (a projection through a factor matrix, or the G sums,
    on the tensor cores) or ``cp_separable_fma`` (a 1-D pass and its tap sums); the grad-bias
    reduction is ``bias_grad`` (no model prices it)."""
    kinds = {"conv3d_igemm_kernel": "implicit_gemm", "conv3d_desc_kernel": "implicit_gemm_desc",
             "conv3d_wgrad_kernel": "implicit_gemm_wgrad",
             "conv3d_desc_wgrad_kernel": "implicit_gemm_desc_wgrad",
             "conv3d_dw_kernel": "depthwise", "conv3d_dw_wgrad_kernel": "depthwise_wgrad",
             "conv3d_dw_cl_kernel": "depthwise_cl",
             "conv3d_dw_cl_wgrad_kernel": "depthwise_cl_wgrad",
             "cp_conv_kernel": "cp_fused", "cp_grad_kernel": "cp_fused",
             "bs_conv3d_desc_kernel": "block_sparse_desc",
             "bs_conv3d_desc_wgrad_kernel": "block_sparse_desc_wgrad",
             "bias_grad_kernel": "bias_grad"}
    if launch.name in kinds:
        return kinds[launch.name]
    if launch.name == "cp_sep_kernel":  # projections (tl.dot) or 1-D passes (FMA)
        a = launch.args
        return "cp_separable_" + ("tensor" if a["PROJECT"] or a["OUT_PROJ"] or a["EMIT_G"]
                                  else "fma")
    if launch.name in ("bs_conv3d_kernel", "bs_conv3d_wgrad_kernel"):
        a = launch.args
        blocks = "depthwise" if a["DEPTHWISE"] else f"{a['BO']}x{a['BI']}"
        return f"block_sparse_{blocks}" + ("_wgrad" if "wgrad" in launch.name else "")
    raise ValueError(f"kernel: no kind for {launch.name!r}")


def launch_bytes(launch):
    """The least bytes a launch moves: each tensor it is passed (a tensor descriptor: the tensor
    it describes), read or written once, and the launcher's own copies before it
    (``Launch.copied``)."""
    tensors = [getattr(v, "base", v) for v in launch.args.values()]
    tensors = {id(t): t for t in tensors if isinstance(t, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in tensors.values()) + launch.copied
