"""Ahead-of-time compile of every shipped kernel config for real GPUs (sm_80, sm_90), no GPU needed.

``triton.compile`` runs the whole CUDA pipeline (TTIR → TTGIR → LLVM → PTX → ptxas cubin) for a
``GPUTarget`` without a driver; the ``cuobjdump`` bundled in the Triton wheel then reads registers,
stack and static shared memory from the cubin and shows its SASS, where tensor-core work appears
as HMMA (mma.sync, sm_80+) or HGMMA (wgmma, sm_90). This catches what the interpreter cannot:
register spills, shared memory past the per-block opt-in limit, and a ``tl.dot`` that silently
fell off the tensor cores.

Cases are compiled as the runtime would for freshly allocated tensors: pointers 16-byte aligned,
integer sizes and strides unspecialised (the conservative choice). Channel counts are 64 and the
kernel extent 7³ with "same" padding; grad-input paths use stride 2 so that the exact-division
tap map is compiled, the other paths stride 1.

Under the interpreter (``TRITON_INTERPRET=1``) ``@triton.jit`` gives InterpretedFunctions, and an
interpreted run leaves triton.language patched for the interpreter, so the code generator cannot
run in that process: there the compiles go to child Pythons without the variable (one per CPU
core, each with a share of the jobs), which write to the same ``TRITON_CACHE_DIR``, and the
kernels are loaded back from their cache entries.

    python -m lk3d.tools.aot [80 90]     # the table; exit status 1 when a case has a problem
"""
import dataclasses
import importlib
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, CompiledKernel
from triton.runtime.interpreter import InterpretedFunction

from lk3d.kernels.tiled_configs import CONFIG_SPACES

ARCHS = (80, 90)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # opt-in max per block: A100, H100 (bytes)
TENSOR_CORE_OPS = {80: ("HMMA",), 90: ("HGMMA", "HMMA")}  # SASS mnemonics that count, per arch
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

_PARTIAL_PTRS = ("dw_ptr", "db_ptr")  # grad-weight / grad-bias partial sums: always fp32
_GEOMETRY = dict(KD=7, KH=7, KW=7, PAD_D=3, PAD_H=3, PAD_W=3, DIL_D=1, DIL_H=1, DIL_W=1)


def compile_kernel(fn, signature, constexprs, arch, num_warps, num_stages):
    """Compile ``fn`` for ``sm_<arch>``; ``signature`` maps every argument to a type string
    ("*bf16", "i32", "constexpr"), ``constexprs`` the constexpr arguments to values."""
    (result,) = compile_many([(fn, signature, constexprs, arch, num_warps, num_stages)])
    if isinstance(result, Exception):
        raise result
    return result


def compile_many(jobs, processes=None):
    """Compile each ``(fn, signature, constexprs, arch, num_warps, num_stages[, divisible])``
    (``divisible``: see ``_compile_here``); the exception in
    place of the kernel where one fails. Under the interpreter, in child processes (``processes``
    of them, default one per CPU core), each compiling its share of the jobs."""
    jobs = list(jobs)
    if not any(knobs.runtime.interpret or isinstance(job[0], InterpretedFunction) for job in jobs):
        return [_attempt(job) for job in jobs]
    specs = [((job[0].fn.__module__, job[0].fn.__name__), *job[1:]) for job in jobs]
    n = max(1, min(len(specs), processes or os.cpu_count() or 1))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    results = [None] * len(specs)
    with tempfile.TemporaryDirectory(prefix="lk3d-aot-") as tmp:
        children = []
        for i in range(n):
            jobs_path = os.path.join(tmp, f"jobs-{i}.pkl")
            results_path = os.path.join(tmp, f"results-{i}.pkl")
            with open(jobs_path, "wb") as f:
                pickle.dump(specs[i::n], f)
            code = f"from lk3d.tools.aot import _child; _child({jobs_path!r}, {results_path!r})"
            children.append((subprocess.Popen([sys.executable, "-c", code], env=env,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                              text=True), results_path))
        for i, (child, results_path) in enumerate(children):
            stderr = child.communicate()[1]
            if child.returncode:
                raise RuntimeError(f"AOT compile child exited with {child.returncode}:\n"
                                   f"{stderr[-4000:]}")
            with open(results_path, "rb") as f:
                results[i::n] = pickle.load(f)
    # As triton.compile does on a cache hit; the source (None here) is only kept for reference.
    return [CompiledKernel(None, group, key) if ok else RuntimeError(f"compile failed:\n{group}")
            for ok, group, key in results]


def _compile_here(fn, signature, constexprs, arch, num_warps, num_stages, divisible=None):
    """``divisible``: the arguments known divisible by 16 (pointers: 16-byte aligned), as the
    JIT marks them; default every pointer and no int."""
    if divisible is None:
        divisible = [name for name, ty in signature.items() if ty.startswith("*")]
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages,
                                   "enable_fp_fusion": True})  # as the launchers ask


def _attempt(job):
    try:
        return _compile_here(*job)
    except Exception as e:  # reported per job, raised by the caller that wants it
        return e


def _child(jobs_path, results_path):
    """Entry of the compile child: kernels by (module, name), results as cache entries."""
    with open(jobs_path, "rb") as f:
        specs = pickle.load(f)
    results = []
    for (module, name), *rest in specs:
        try:
            kernel = _compile_here(getattr(importlib.import_module(module), name), *rest)
            results.append((True, dict(kernel.metadata_group), kernel.hash))
        except Exception:
            results.append((False, traceback.format_exc(), None))
    with open(results_path, "wb") as f:
        pickle.dump(results, f)


@dataclass(frozen=True)
class ResourceUsage:
    registers: int     # per thread
    spill_bytes: int   # per-thread local memory, STACK + LOCAL: only register spills in Triton code
    spill_ops: int     # STL/LDL instructions in the SASS
    shared_bytes: int  # what Triton requests (metadata.shared) plus the cubin's static shared
    mma_ops: tuple     # tensor-core mnemonics found in the SASS, e.g. ("HGMMA",)
    tensor_cores: bool  # one of TENSOR_CORE_OPS[arch] is present


def resource_usage(compiled):
    """Registers, spills, shared memory and tensor-core use of a compiled kernel's cubin.

    ptxas keeps spills in the stack frame, so ``cuobjdump -res-usage`` shows them as STACK (LOCAL
    stays 0); both count as spill bytes. Static shared memory counts against the opt-in limit
    (Triton's launcher allows ``limit - static`` dynamic bytes), so it is added in.
    """
    arch = compiled.metadata.target.arch
    out = _cuobjdump(compiled, "-res-usage", "-sass")
    line = re.search(r"^\s*(REG:\d+.*)$", out, re.MULTILINE)
    if line is None:
        raise RuntimeError(f"cuobjdump -res-usage: no REG line in\n{out[:2000]}")
    res = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line.group(1))}
    mma = tuple(sorted(set(re.findall(r"\b(HGMMA|HMMA)\.", out))))
    return ResourceUsage(
        registers=res["REG"],
        spill_bytes=res.get("STACK", 0) + res.get("LOCAL", 0),
        spill_ops=len(re.findall(r"\b(?:STL|LDL)\b", out)),
        shared_bytes=compiled.metadata.shared + res.get("SHARED", 0),
        mma_ops=mma,
        tensor_cores=any(op in mma for op in TENSOR_CORE_OPS.get(arch, ())),
    )


def sass(compiled):
    """The SASS of a compiled kernel's cubin, as ``cuobjdump -sass`` prints it (see
    ``lk3d.tools.sass`` for its innermost loop)."""
    return _cuobjdump(compiled, "-sass")


def _cuobjdump(compiled, *flags):
    with tempfile.TemporaryDirectory(prefix="lk3d-aot-") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([CUOBJDUMP, *flags, path], check=True, capture_output=True,
                              text=True).stdout


@dataclass(frozen=True, eq=False)
class Case:
    kernel: object            # the @triton.jit function
    id: str                   # readable, e.g. "igemm-fwd-bf16-M128-N64-K32-w4s3"
    signature: dict           # every argument name -> "*bf16" / "i32" / "constexpr"
    constexprs: dict
    num_warps: int
    num_stages: int
    dtype: str                # element type of the data pointers
    expect_tensor_cores: bool  # its tl.dot must reach the tensor cores
    archs: tuple = ARCHS      # the archs its launches run on (others never launch it)

    def job(self, arch):
        """The arguments of ``compile_kernel`` / one entry of ``compile_many``."""
        return (self.kernel, self.signature, self.constexprs, arch, self.num_warps, self.num_stages)


def _case(kernel, name, dtype, config, constexprs, expect_tensor_cores=False):
    tile = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    constexprs = {**constexprs, "ACC_DTYPE": tl.float32, **tile}
    if "PRECISION" in kernel.arg_names:
        constexprs["PRECISION"] = "tf32" if dtype == "fp32" else "ieee"
    if "WIDE" in kernel.arg_names:
        constexprs.setdefault("WIDE", False)

    def arg_type(arg):
        if arg in constexprs:
            return "constexpr"
        if arg.endswith("_ptr"):
            return "*fp32" if arg in _PARTIAL_PTRS else f"*{dtype}"
        return "i32"

    tile_id = "-".join(f"{k.replace('BLOCK_', '').replace('BLOCK', 'B')}{v}"
                       for k, v in tile.items())
    warps, stages = config["num_warps"], config["num_stages"]
    return Case(kernel=kernel, id=f"{name}-{dtype}-{tile_id}-w{warps}s{stages}",
                signature={a: arg_type(a) for a in kernel.arg_names}, constexprs=constexprs,
                num_warps=warps, num_stages=stages, dtype=dtype,
                expect_tensor_cores=expect_tensor_cores)


def _strides(s):
    return dict(STR_D=s, STR_H=s, STR_W=s)


def shipped_cases():
    """Every config in CONFIG_SPACES on the kernel that takes it, in bf16; the implicit GEMM also
    in fp16 and fp32 (tf32), the other dtypes its launchers feed to ``tl.dot``; then the CP and
    block-sparse kernels' own spaces (``cp_cases``, ``block_sparse_cases``) and the 64-bit index
    variants (``wide_cases``)."""
    from lk3d.kernels import tiled

    cases = []
    for config in CONFIG_SPACES["conv3d_fwd"]:
        for name, transposed, stride in (("igemm-fwd", False, 1), ("igemm-bwd", True, 2)):
            for dtype in ("bf16", "fp16", "fp32"):
                cases.append(_case(tiled.conv3d_igemm_kernel, name, dtype, config, dict(
                    KC=64, NC=64, **_GEOMETRY, **_strides(stride), TRANSPOSED=transposed,
                    HAS_BIAS=not transposed), expect_tensor_cores=True))
    for config in CONFIG_SPACES["conv3d_dw"]:
        for name, transposed, stride in (("dw-fwd", False, 1), ("dw-bwd", True, 2)):
            cases.append(_case(tiled.conv3d_dw_kernel, name, "bf16", config, dict(
                CY=64, MULT=1, **_GEOMETRY, **_strides(stride), TRANSPOSED=transposed,
                HAS_BIAS=not transposed)))
    for config in CONFIG_SPACES["conv3d_wgrad"]:
        cases.append(_case(tiled.conv3d_wgrad_kernel, "wgrad", "bf16", config, dict(
            CIG=64, COG=64, **_GEOMETRY, **_strides(1)), expect_tensor_cores=True))
    for config in CONFIG_SPACES["conv3d_dw_wgrad"]:
        cases.append(_case(tiled.conv3d_dw_wgrad_kernel, "dw_wgrad", "bf16", config, dict(
            CO=64, MULT=1, **_GEOMETRY, **_strides(1))))
    for config in CONFIG_SPACES["bias_grad"]:
        cases.append(_case(tiled.bias_grad_kernel, "bias_grad", "bf16", config, dict(C=64)))
    cases += (depthwise_cases() + descriptor_cases() + descriptor_wgrad_cases() + cp_cases()
              + cp_sep_cases() + block_sparse_cases() + block_sparse_desc_cases()
              + block_sparse_desc_wgrad_cases())
    return cases + wide_cases(cases)


def descriptor_cases():
    """Every config of ``lk3d.kernels.implicit_gemm_configs`` at 64 -> 64 channels, 7³ "same",
    as each arch launches it: tensor descriptors on sm_90 (TMA), pointers on sm_80; forward with
    a bias in bf16, and the first config also in fp16 and fp32 (tf32) and as grad-input."""
    from lk3d.kernels import implicit_gemm
    from lk3d.kernels.implicit_gemm_configs import CONV3D_DESC_CONFIGS

    cases = []
    for i, config in enumerate(CONV3D_DESC_CONFIGS):
        box_x = [1, 1, config["BLOCK_H"], config["BLOCK_W"], config["BLOCK_K"]]
        box_w = [1, 1, config["BLOCK_K"], config["BLOCK_N"]]
        passes = (("desc-fwd", True), ("desc-bwd", False)) if i == 0 else (("desc-fwd", True),)
        for name, bias in passes:
            for dtype in ("bf16", "fp16", "fp32") if i == 0 else ("bf16",):
                for tma, arch in ((False, 80), (True, 90)):  # pointers first: wide_cases
                    case = _case(implicit_gemm.conv3d_desc_kernel,
                                 f"{name}-{'tma' if tma else 'ptr'}", dtype, config,
                                 dict(KC=64, NC=64, G=1, W_ROW=64, **_GEOMETRY, **_strides(1),
                                      HAS_BIAS=bias, TMA=tma), expect_tensor_cores=True)
                    sig = dict(case.signature, bias_ptr=f"*{dtype}", y_ptr=f"*{dtype}")
                    sig["x"] = f"tensordesc<{dtype}{box_x}>" if tma else f"*{dtype}"
                    sig["w"] = f"tensordesc<{dtype}{box_w}>" if tma else f"*{dtype}"
                    cases.append(dataclasses.replace(case, signature=sig, archs=(arch,)))
    return cases


def descriptor_wgrad_cases():
    """Every grad-weight config of ``lk3d.kernels.implicit_gemm_configs`` at 64 -> 64 channels,
    7³ "same" (its TAPS as the launcher fits it to KW = 7), as each arch launches it: tensor
    descriptors on sm_90, pointers on sm_80; bf16, the first config also fp16 and fp32 (tf32)."""
    from lk3d.kernels import implicit_gemm
    from lk3d.kernels.implicit_gemm_configs import CONV3D_DESC_WGRAD_CONFIGS, tap_strip

    cases = []
    for i, config in enumerate(CONV3D_DESC_WGRAD_CONFIGS):
        config = dict(config, TAPS=tap_strip(_GEOMETRY["KW"], config["TAPS"])[1])
        box_x = [1, 1, config["BLOCK_H"], config["BLOCK_W"], config["BLOCK_CI"]]
        box_y = [1, 1, config["BLOCK_H"], config["BLOCK_W"], config["BLOCK_CO"]]
        for dtype in ("bf16", "fp16", "fp32") if i == 0 else ("bf16",):
            for tma, arch in ((False, 80), (True, 90)):  # pointers first: wide_cases
                case = _case(implicit_gemm.conv3d_desc_wgrad_kernel,
                             f"desc-wgrad-{'tma' if tma else 'ptr'}", dtype, config,
                             dict(CIG=64, COG=64, G=1, **_GEOMETRY, **_strides(1), TMA=tma),
                             expect_tensor_cores=True)
                sig = dict(case.signature)
                sig["x"] = f"tensordesc<{dtype}{box_x}>" if tma else f"*{dtype}"
                sig["dy"] = f"tensordesc<{dtype}{box_y}>" if tma else f"*{dtype}"
                cases.append(dataclasses.replace(case, signature=sig, archs=(arch,)))
    return cases


def depthwise_cases():
    """Every config of ``lk3d.kernels.depthwise_configs`` at C = 96 (bf16, read as int32 pairs
    with fp32 taps; fp16; fp32), forward at stride 1 with a bias and, in bf16, stride 2; the
    grad-weight likewise (fp32 partials)."""
    from lk3d.kernels import depthwise
    from lk3d.kernels.depthwise_configs import CONFIG_SPACES as DW_SPACES, tap_strip

    cases = []
    for config in DW_SPACES["conv3d_dw_cl"]:
        for dtype, stride in (("bf16", 1), ("bf16", 2), ("fp16", 1), ("fp32", 1)):
            case = _case(depthwise.conv3d_dw_cl_kernel, f"dw_cl-s{stride}", dtype, config, dict(
                C=96, **_GEOMETRY, **_strides(stride), HAS_BIAS=stride == 1,
                PAIRS=dtype == "bf16"))
            if dtype == "bf16":
                sig = dict(case.signature, x_ptr="*i32", w_ptr="*fp32")
                case = dataclasses.replace(case, signature=sig)
            cases.append(case)
    for config in DW_SPACES["conv3d_dw_cl_wgrad"]:
        # KT as the launcher fits it to the 7 W taps
        config = dict(config, KT=tap_strip(_GEOMETRY["KW"], config["KT"])[1])
        for dtype, stride in (("bf16", 1), ("bf16", 2), ("fp16", 1), ("fp32", 1)):
            case = _case(depthwise.conv3d_dw_cl_wgrad_kernel, f"dw_cl_wgrad-s{stride}", dtype,
                         config, dict(C=96, **_GEOMETRY, **_strides(stride),
                                      PAIRS=dtype == "bf16"))
            if dtype == "bf16":
                sig = dict(case.signature, x_ptr="*i32", dy_ptr="*i32")
                case = dataclasses.replace(case, signature=sig)
            cases.append(case)
    return cases


def cp_cases():
    """Every config of ``lk3d.kernels.cp_configs`` at Cin = Cout = 64, R = 16: forward at stride
    1, grad-input (with its fp32 grad U_in partials) at stride 2, and grad of the factors; bf16,
    fp16 and fp32 (tf32), the dtypes whose ``tl.dot`` must reach the tensor cores; plus one
    few-channel (SPAN) case per kernel."""
    from lk3d.kernels import cp
    from lk3d.kernels.cp_configs import CP_CONV_CONFIGS, CP_GRAD_CONFIGS

    def fp32_partials(case, names):
        sig = {k: ("*fp32" if k in names else v) for k, v in case.signature.items()}
        return dataclasses.replace(case, signature=sig)

    rank = dict(R=16, R_PAD=16)
    taps = _GEOMETRY["KD"] * _GEOMETRY["KH"] * _GEOMETRY["KW"]
    cases = []
    for i, config in enumerate(CP_CONV_CONFIGS):
        for dtype in ("bf16", "fp16", "fp32"):
            for name, transposed, stride in (("cp-fwd", False, 1), ("cp-bwd", True, 2)):
                for channels, spans in ((64, False), (4, True)):
                    if spans and (i or dtype != "bf16"):
                        continue
                    case = _case(cp.cp_conv_kernel, name + ("-span" if spans else ""), dtype,
                                 config, dict(
                                     KC=channels, NC=64, **rank, **_GEOMETRY, **_strides(stride),
                                     TRANSPOSED=transposed, SPAN=spans,
                                     STEPS=cp.steps(taps, channels, config["BLOCK_K"], spans),
                                     HAS_WEIGHTS=True, HAS_BIAS=not transposed, WRITE_Y=True,
                                     EMIT_GQ=transposed),
                                 expect_tensor_cores=True)
                    cases.append(fp32_partials(case, ("gq_ptr",)))
    for i, config in enumerate(CP_GRAD_CONFIGS):
        for dtype in ("bf16", "fp16", "fp32"):
            for channels, spans in ((64, False), (4, True)):
                if spans and (i or dtype != "bf16"):
                    continue
                case = _case(cp.cp_grad_kernel, "cp-grad" + ("-span" if spans else ""), dtype,
                             config, dict(KC=channels, NC=64, **rank, **_GEOMETRY, **_strides(1),
                                          SPAN=spans,
                                          STEPS=cp.steps(taps, channels, config["BLOCK_K"], spans),
                                          HAS_WEIGHTS=True, NEED_TAPS=True, NEED_OUT=True),
                             expect_tensor_cores=True)
                cases.append(fp32_partials(case, ("gt_ptr", "go_ptr")))
    return cases


def cp_sep_cases():
    """Every config of the separable CP kernel (``cp_sep_kernel``) at Cin = Cout = 64, R = 16,
    a 1-D kernel of 21 taps, in each pass shape the launchers make: the U_in projection, a
    forward axis pass, the last forward pass with its U_out projection and bias, the backward's
    G sums (EMIT_G), a transposed pass at stride 2 with its tap sums, and the last grad-input
    pass with every epilogue; bf16, fp16 and fp32 (tf32). Partial sums are fp32."""
    from lk3d.kernels import cp
    from lk3d.kernels.cp_configs import CP_SEP_CONFIGS

    off = dict(PROJECT=False, HAS_WEIGHTS=False, HAS_BIAS=False, OUT_PROJ=False, WRITE=True,
               EMIT_TAPS=False, EMIT_G=False, TRANSPOSED=False, AXIS=2, K=21, STR=1, PAD=10,
               DIL=1)
    # R-channel intermediates are channels-innermost: their channel stride is 1, a constexpr
    # as the JIT specialises it (ss_c of a 1-D pass's source, sh_c, sy_c of an R-channel write).
    inner = dict(ss_c=1, sh_c=1)
    shapes = [("project", dict(PROJECT=True, K=1, PAD=0, sy_c=1), True),
              ("axis", dict(inner, sy_c=1), False),
              ("last", dict(inner, AXIS=0, HAS_WEIGHTS=True, HAS_BIAS=True, OUT_PROJ=True), True),
              ("gsum", dict(inner, AXIS=0, WRITE=False, EMIT_G=True), True),
              ("taps-t", dict(inner, sy_c=1, AXIS=1, TRANSPOSED=True, STR=2, EMIT_TAPS=True),
               False),
              ("first-t", dict(inner, TRANSPOSED=True, OUT_PROJ=True, EMIT_TAPS=True,
                               EMIT_G=True), True)]
    cases = []
    for config in CP_SEP_CONFIGS:
        for dtype in ("bf16", "fp16", "fp32"):
            for name, flags, tensor in shapes:
                case = _case(cp.cp_sep_kernel, f"cp-sep-{name}", dtype, config,
                             dict(SC=64, NC=64, R=16, R_PAD=16, **dict(off, **flags)),
                             expect_tensor_cores=tensor)
                sig = {k: ("*fp32" if k in ("gt_ptr", "ge_ptr") else v)
                       for k, v in case.signature.items()}
                cases.append(dataclasses.replace(case, signature=sig))
    return cases


_INDEX_PTRS = ("ent_ptr", "blk_ptr", "brow_ptr", "col_ptr")  # block-sparse indices: int32


def _bs_case(kernel, name, dtype, config, constexprs, expect_tensor_cores=False):
    """``_case`` with the block-sparse kernels' int32 index pointers typed as such."""
    case = _case(kernel, name, dtype, config, constexprs, expect_tensor_cores)
    signature = {a: "*i32" if a in _INDEX_PTRS else ty for a, ty in case.signature.items()}
    return dataclasses.replace(case, signature=signature)


def _block(bo, bi, bd, bh, bw):
    return dict(BO=bo, BI=bi, BD=bd, BH=bh, BW=bw)


def _block_id(bo, bi, bd, bh, bw):
    return f"b{bo}x{bi}x{bd}x{bh}x{bw}"


def block_sparse_cases():
    """Every config of ``lk3d.kernels.block_sparse_configs`` on the path that takes it: the
    channel-block path at blocks (16,16,1,1,1) in bf16/fp16/fp32 and (64,64,1,1,1) in bf16,
    forward and transposed (stride 2); the depthwise path at a (16,1,4,4,4) brick (kernel 8³, a
    multiple of the brick); grad-values of both at stride 1."""
    from lk3d.kernels import block_sparse as bs
    from lk3d.kernels.block_sparse_configs import (BLOCK_SPARSE_DW_CONFIGS,
                                                   BLOCK_SPARSE_DW_WGRAD_CONFIGS,
                                                   BLOCK_SPARSE_FWD_CONFIGS,
                                                   BLOCK_SPARSE_WGRAD_CONFIGS)

    dense = dict(_GEOMETRY, CIG=64, COG=64, MULT=1, DEPTHWISE=False)
    dw_block = (16, 1, 4, 4, 4)
    dw = dict(_GEOMETRY, KD=8, KH=8, KW=8, CIG=1, COG=1, MULT=1, DEPTHWISE=True)  # brick | kernel
    dense_blocks = [((16, 16, 1, 1, 1), ("bf16", "fp16", "fp32")), ((64, 64, 1, 1, 1), ("bf16",))]
    cases = []
    for config in BLOCK_SPARSE_FWD_CONFIGS:
        for block, dtypes in dense_blocks:
            for tr in (False, True):
                block_k, block_n = bs.tile_channels(block, False, tr)
                constexprs = dict(**_block(*block), **dense, **_strides(2 if tr else 1),
                                  TRANSPOSED=tr, HAS_BIAS=not tr, BLOCK_K=block_k,
                                  BLOCK_N=block_n)
                name = f"bs-{'bwd' if tr else 'fwd'}-{_block_id(*block)}"
                cases += [_bs_case(bs.bs_conv3d_kernel, name, dtype, config, constexprs,
                                   expect_tensor_cores=True) for dtype in dtypes]
    for config in BLOCK_SPARSE_DW_CONFIGS:
        for tr in (False, True):
            block_k, block_n = bs.tile_channels(dw_block, True, tr)
            constexprs = dict(**_block(*dw_block), **dw, **_strides(2 if tr else 1),
                              TRANSPOSED=tr, HAS_BIAS=not tr, BLOCK_K=block_k, BLOCK_N=block_n)
            name = f"bs-dw-{'bwd' if tr else 'fwd'}-{_block_id(*dw_block)}"
            cases.append(_bs_case(bs.bs_conv3d_kernel, name, "bf16", config, constexprs))
    for config in BLOCK_SPARSE_WGRAD_CONFIGS:
        for block, _ in dense_blocks:
            block_i, block_o = bs.wgrad_channels(block, False)
            constexprs = dict(**_block(*block), **dense, **_strides(1), BLOCK_I=block_i,
                              BLOCK_O=block_o)
            cases.append(_bs_case(bs.bs_conv3d_wgrad_kernel, f"bs-wgrad-{_block_id(*block)}",
                                  "bf16", config, constexprs, expect_tensor_cores=True))
    for config in BLOCK_SPARSE_DW_WGRAD_CONFIGS:
        block_i, block_o = bs.wgrad_channels(dw_block, True)
        constexprs = dict(**_block(*dw_block), **dw, **_strides(1), BLOCK_I=block_i,
                          BLOCK_O=block_o)
        cases.append(_bs_case(bs.bs_conv3d_wgrad_kernel, f"bs-dw-wgrad-{_block_id(*dw_block)}",
                              "bf16", config, constexprs))
    return cases


def block_sparse_desc_cases():
    """Every config of the tensor-descriptor block-sparse kernel (``BLOCK_SPARSE_DESC_CONFIGS``)
    at 7³ "same", as each arch launches it (sm_90: descriptors; sm_80: pointers), at the square
    channel blocks and dtypes ``pick`` gives it (``desc_fits``): forward with a bias, at 16x16
    blocks also as grad-input (no bias)."""
    from lk3d.kernels import block_sparse_desc as bsd
    from lk3d.kernels.block_sparse_configs import BLOCK_SPARSE_DESC_CONFIGS as CONFIGS

    # (config, channel block, dtypes, arches): PAIR is sm_90's, the 32 x 32 brick sm_80's; the
    # first is the one compiled again WIDE (pointers)
    both = ((False, 80), (True, 90))
    taken = [(1, 16, ("bf16",), ((False, 80),)), (0, 16, ("bf16", "fp16"), ((True, 90),)),
             (2, 16, ("bf16", "fp16", "fp32"), both), (3, 32, ("bf16",), both),
             (3, 64, ("bf16", "fp32"), both), (4, 128, ("bf16",), both)]
    geo = {k: v for k, v in _GEOMETRY.items() if k not in ("KD", "KH", "KW")}
    cases = []
    for i, ch, dtypes, arches in taken:
        config = CONFIGS[i]
        box_x = [1, 1, config["BLOCK_H"] * (2 if config["PAIR"] else 1), config["BLOCK_W"], ch]
        for name, bias in (("fwd", True), ("bwd", False)) if i < 3 else (("fwd", True),):
            for dtype in dtypes:
                for tma, arch in arches:
                    case = _case(bsd.bs_conv3d_desc_kernel,
                                 f"bs-desc-{name}-b{ch}x{ch}-{'tma' if tma else 'ptr'}", dtype,
                                 config, dict(C=max(64, ch), BK=ch, BN=ch, TB=1, STR_D=1, **geo,
                                              HAS_BIAS=bias, TMA=tma), expect_tensor_cores=True)
                    sig = dict(case.signature, word_ptr="*i32", ptr_ptr="*i32",
                               bias_ptr=f"*{dtype}", y_ptr=f"*{dtype}")
                    sig["x"] = f"tensordesc<{dtype}{box_x}>" if tma else f"*{dtype}"
                    sig["v"] = f"tensordesc<{dtype}[1, {ch}, {ch}]>" if tma else f"*{dtype}"
                    cases.append(dataclasses.replace(case, signature=sig, archs=(arch,)))
    return cases


def block_sparse_desc_wgrad_cases():
    """Every config of the tensor-descriptor block-sparse grad-values kernel at 7³ "same", as
    each arch launches it (sm_90: descriptors; sm_80: pointers), at the blocks ``pick`` gives it:
    16x16 in bf16 and fp16; 16x16 in fp32 (tf32) and 32x32 in bf16; 64x64 in bf16 and fp32
    (wider blocks take the gather kernel)."""
    from lk3d.kernels import block_sparse_desc as bsd
    from lk3d.kernels.block_sparse_configs import BLOCK_SPARSE_DESC_WGRAD_CONFIGS as CONFIGS

    geo = {k: v for k, v in _GEOMETRY.items() if k not in ("KD", "KH", "KW")}
    cases = []
    for config, ch, dtypes in ((CONFIGS[0], 16, ("bf16", "fp16")), (CONFIGS[1], 16, ("fp32",)),
                               (CONFIGS[1], 32, ("bf16",)), (CONFIGS[2], 64, ("bf16", "fp32"))):
        for dtype in dtypes:
            for tma, arch in ((False, 80), (True, 90)):  # pointers first: wide_cases
                case = _case(bsd.bs_conv3d_desc_wgrad_kernel,
                             f"bs-desc-wgrad-b{ch}x{ch}-{'tma' if tma else 'ptr'}", dtype, config,
                             dict(CX=64, CY=64, BI=ch, BO=ch, STR_D=1, **geo, TMA=tma,
                                  GROUP=bsd.wgrad_group(ch)),
                             expect_tensor_cores=True)
                box = [1, 1, config["BLOCK_H"], config["BLOCK_W"], ch]
                sig = dict(case.signature, word_ptr="*i32", grow_ptr="*i32", dv_ptr="*fp32")
                sig["x"] = f"tensordesc<{dtype}{box}>" if tma else f"*{dtype}"
                sig["dy"] = f"tensordesc<{dtype}{box}>" if tma else f"*{dtype}"
                cases.append(dataclasses.replace(case, signature=sig, archs=(arch,)))
    return cases


# What the JIT passes as 64-bit integers when a launch covers 2**31 voxels or more: the voxel
# counts and the batch strides of the activations. Per-split lengths and program counts stay i32.
_WIDE_INTS = ("M", "S", "sa_n", "sx_n", "sy_n", "sw_g")


def wide_cases(cases):
    """The first case of each kernel again with ``WIDE`` (int64 voxel index and weight offsets,
    see ``lk3d.kernels.common.wide``) and its sizes typed as the JIT types them past 2**31."""
    seen, wide = set(), []
    for case in cases:
        if "WIDE" not in case.constexprs or case.kernel in seen:
            continue
        seen.add(case.kernel)
        signature = {a: ("i64" if a in _WIDE_INTS and t == "i32" else t)
                     for a, t in case.signature.items()}
        wide.append(dataclasses.replace(case, id=f"{case.id}-wide", signature=signature,
                                        constexprs={**case.constexprs, "WIDE": True}))
    return wide


def problems(case, arch, usage):
    """What is wrong with ``usage`` for ``case`` on ``sm_<arch>``; empty when all is well."""
    found = []
    if usage.spill_bytes:
        found.append(f"spills {usage.spill_bytes} B ({usage.spill_ops} STL/LDL)")
    if usage.shared_bytes > SHARED_LIMIT[arch]:
        found.append(f"shared {usage.shared_bytes} B > {SHARED_LIMIT[arch]} B")
    if case.expect_tensor_cores and not usage.tensor_cores:
        found.append(f"no {'/'.join(TENSOR_CORE_OPS[arch])} in SASS")
    return found


def main(argv=None):
    archs = [int(a) for a in (sys.argv[1:] if argv is None else argv)] or list(ARCHS)
    print(f"triton {triton.__version__}, cache {knobs.cache.dir}")
    header = (f"{'case':<34} {'sm':>3} {'regs':>5} {'spill':>6} {'stl/ldl':>7} {'shared':>7} "
              f"{'mma':<6} {'secs':>5}  problems")
    print(header)
    print("-" * len(header))
    bad = 0
    for case in shipped_cases():
        for arch in (a for a in archs if a in case.archs):
            t0 = time.perf_counter()
            compiled = compile_kernel(*case.job(arch))
            secs = time.perf_counter() - t0
            usage = resource_usage(compiled)
            found = problems(case, arch, usage)
            bad += bool(found)
            print(f"{case.id:<34} {arch:>3} {usage.registers:>5} {usage.spill_bytes:>6} "
                  f"{usage.spill_ops:>7} {usage.shared_bytes:>7} "
                  f"{'+'.join(usage.mma_ops) or '-':<6} {secs:>5.2f}  {'; '.join(found)}")
    print(f"{bad} problem(s)")
    return int(bad > 0)


if __name__ == "__main__":
    sys.exit(main())
