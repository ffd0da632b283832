"""Benchmarks: lk3d's large-kernel convolutions against what users run today, side by side.

A case (``Case``) is one convolution layer; a result (``Result``) is one (case, provider, mode)
measurement. A case's op decides its providers (``OP_PROVIDERS``):

* dense / depthwise: ``lk3d`` (``lk3d.conv3d``, whatever algorithm lk3d picks), ``lk3d-fft`` and
  ``lk3d-tiled`` (the same op with ``LK3D_ALGO`` forcing one algorithm; tiled only where the
  Triton kernels run), ``torch`` (``F.conv3d`` on NCDHW tensors) and ``torch-cl`` (input and
  weight in ``channels_last_3d``);
* cp (a rank-R CP kernel): ``lk3d`` (``lk3d.cp_conv3d``), ``cp-unfused`` (the chain of five
  convolutions written in plain torch: pointwise Cin->R, three 1-D depthwise convs, pointwise
  R->Cout, each writing its [N, R, ...] intermediate), ``tensorly`` (tensorly-torch's
  ``FactorizedConv`` from the same factors, factorized implementation; only where ``tltorch`` is
  installed: ``pip install tensorly-torch``), and ``torch`` / ``torch-cl`` (dense ``F.conv3d``
  with the same kernel reconstructed, ``factors.to_dense()``);
* block_sparse (a block-sparse kernel of density ``density``): ``lk3d``
  (``lk3d.block_sparse_conv3d``), ``lk3d-dense`` (``lk3d.conv3d`` with the same kernel dense),
  ``torch-mask`` (``F.conv3d`` with a dense weight times its block mask every step, as masked
  sparse training does) and ``torch`` / ``torch-cl`` (``F.conv3d``, the same kernel dense).

The baseline of a (case, mode) is its fastest provider not from lk3d (oneDNN on the CPU is ~5x
faster in channels_last_3d at k=15 and its NCDHW path collapses at k=21), and ``speedup`` is that
baseline's time over the row's time (> 1: faster than everything else measured). Modes: ``fwd``,
``bwd`` (grads of the input, the weight or factors or stored blocks, and the bias, from a graph
built once) and ``fwdbwd`` (both). FLOPs count the least work of the op (``lk3d.tools.roofline``):
``2·N·Cout·OD·OH·OW·(Cin/g)·kd·kh·kw`` for a dense kernel, that times the density for a
block-sparse one, ``2·N·OD·OH·OW·R·(Cin + kd + kh + kw + Cout)`` for a CP one; twice that for
``bwd`` and three times for ``fwdbwd``; TFLOP/s of every provider of a case use that same count.
Bytes are the least traffic of the step (the input, the output and the weight as the op stores
it). ``roofline_fraction`` is the roofline's time over the measured time, with ceilings measured
in the same run and process (a large matmul in the case's dtype, a large tensor copy).
``peak_mem_mb`` (CUDA only; empty on the CPU, which has no allocator statistics) is the most
memory one step allocates above its inputs, in MiB.

Timing is the median of ``triton.testing.do_bench`` on CUDA and of
``torch.utils.benchmark.Timer.blocked_autorange`` on the CPU (all torch threads). Before timing,
lk3d's output is compared with ``F.conv3d``'s of the same (dense) kernel in the same dtype
(relative L2 error, in the lk3d rows, with the algorithm lk3d's planner picked for dense and
depthwise cases, from ``lk3d.explain``).

Time limits: every measurement has a budget (``budget_s``). The first call is timed; when it
predicts the measurement would pass the budget the row is ``skipped (budget)``. A first call can
itself take minutes (CPU NCDHW ``F.conv3d`` at k=21 took > 200 s), so by default the measurements
run in a worker process that is killed at 1.5 x budget + a start-up allowance, and the row is
``skipped (budget)`` too; a new worker takes the next measurement. ``max_time_s`` bounds the whole
run: what is left when it passes is ``skipped (time limit)``.
"""
import contextlib
import csv
import json
import math
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from importlib import resources
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

import lk3d
from lk3d import cpu_memory
from lk3d._algos import allow_tf32
from lk3d.tools import roofline
from lk3d.tools._data import read_data

OPS = ("dense", "depthwise", "cp", "block_sparse")
_DENSE_PROVIDERS = ("lk3d", "lk3d-fft", "lk3d-tiled", "torch", "torch-cl")
OP_PROVIDERS = {
    "dense": _DENSE_PROVIDERS,
    "depthwise": _DENSE_PROVIDERS,
    "cp": ("lk3d", "cp-unfused", "tensorly", "torch", "torch-cl"),
    "block_sparse": ("lk3d", "lk3d-dense", "torch-mask", "torch", "torch-cl"),
}
PROVIDERS = tuple(dict.fromkeys(p for ps in OP_PROVIDERS.values() for p in ps))
_FORCED_ALGO = {"lk3d-fft": "fft", "lk3d-tiled": "tiled"}  # providers that force LK3D_ALGO
MODES = ("fwd", "bwd", "fwdbwd")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}
# lk3d vs F.conv3d in the same dtype, relative L2 error: above this the bench exits non-zero.
# float32 on CUDA is TF32 in both when cuDNN's allow_tf32 is on (the default).
TOLERANCE = {"float16": 5e-3, "bfloat16": 3e-2, "float32": 1e-4, "float64": 1e-9}
TF32_TOLERANCE = 5e-3

# Per-measurement time budget and timed repetitions (seconds), by device type.
DEFAULT_BUDGET_S = {"cpu": 30.0, "cuda": 60.0}
DEFAULT_MIN_RUN_TIME_S = {"cpu": 0.5, "cuda": 0.2}
_START_ALLOWANCE_S = 30.0  # worker start-up (imports, CUDA context) and the first compile

SKIPPED_BUDGET = "skipped (budget)"
SKIPPED_TIME_LIMIT = "skipped (time limit)"


def _triple(name, value):
    vals = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(vals) != 3 or any(not isinstance(v, int) or v < 1 for v in vals):
        raise ValueError(f"{name}: expected a positive int or 3 positive ints, got {value!r}")
    return vals


@dataclass(frozen=True)
class Case:
    """One convolution layer to benchmark; stride and dilation 1."""
    name: str
    op: str          # "depthwise" (groups == Cin), "dense" (dense or grouped), "cp", "block_sparse"
    N: int
    Cin: int
    Cout: int
    groups: int
    size: tuple      # input (D, H, W)
    kernel: tuple    # (kd, kh, kw)
    padding: str = "same"  # "same" or "valid"
    dtype: str = "float32"  # a key of DTYPES
    bias: bool = True
    rank: int = 0          # cp: the CP rank R
    density: float = 1.0   # block_sparse: the fraction of weight blocks stored
    block: tuple = ()      # block_sparse: the block shape (bo, bi, bd, bh, bw)

    def __post_init__(self):
        def bad(what):
            return ValueError(f"Case {self.name!r}: {what}")
        if self.op not in OPS:
            raise bad(f"op: expected one of {OPS}, got {self.op!r}")
        if self.dtype not in DTYPES:
            raise bad(f"dtype: expected one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.padding not in ("same", "valid"):
            raise bad(f"padding: expected 'same' or 'valid', got {self.padding!r}")
        if self.Cin % self.groups or self.Cout % self.groups:
            raise bad(f"groups={self.groups} must divide Cin={self.Cin} and Cout={self.Cout}")
        if self.op == "depthwise" and self.groups != self.Cin:
            raise bad(f"op='depthwise' needs groups == Cin, got groups={self.groups}, "
                      f"Cin={self.Cin}")
        _triple("size", self.size)
        _triple("kernel", self.kernel)
        if self.op == "cp" and (self.groups != 1 or self.rank < 1):
            raise bad(f"op='cp' needs groups=1 and rank >= 1, got groups={self.groups}, "
                      f"rank={self.rank}")
        if self.op == "block_sparse":
            if not 0 < self.density <= 1:
                raise bad(f"density: expected a value in (0, 1], got {self.density}")
            dims = (self.Cout, self.Cin // self.groups, *self.kernel)
            if len(self.block) != 5 or any(d % b for d, b in zip(dims, self.block)):
                raise bad(f"block: expected 5 ints dividing the weight shape {dims}, "
                          f"got {self.block}")

    @classmethod
    def depthwise(cls, name, N, C, size, k, dtype="float32"):
        return cls(name, "depthwise", N, C, C, C, _triple("size", size), _triple("kernel", k),
                   dtype=dtype)

    @classmethod
    def dense(cls, name, N, Cin, Cout, size, k, dtype="float32", groups=1):
        return cls(name, "dense", N, Cin, Cout, groups, _triple("size", size),
                   _triple("kernel", k), dtype=dtype)

    @classmethod
    def cp(cls, name, N, Cin, Cout, size, k, rank, dtype="float32"):
        return cls(name, "cp", N, Cin, Cout, 1, _triple("size", size), _triple("kernel", k),
                   dtype=dtype, rank=rank)

    @classmethod
    def block_sparse(cls, name, N, Cin, Cout, size, k, density, block, dtype="float32",
                     groups=1):
        return cls(name, "block_sparse", N, Cin, Cout, groups, _triple("size", size),
                   _triple("kernel", k), dtype=dtype, density=density, block=tuple(block))

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def out_size(self):
        if self.padding == "same":
            return tuple(self.size)
        return tuple(s - k + 1 for s, k in zip(self.size, self.kernel))

    @property
    def shape(self):
        """The layer in one line: ``N1 C16->16 g16 D32x32x32 k7x7x7 same float32`` (plus
        ``R8`` for CP, ``density0.1 block16x16x1x1x1`` for block-sparse)."""
        extra = {"cp": f" R{self.rank}",
                 "block_sparse": f" density{self.density:g} block{'x'.join(map(str, self.block))}"}
        return (f"N{self.N} C{self.Cin}->{self.Cout} g{self.groups} "
                f"D{'x'.join(map(str, self.size))} k{'x'.join(map(str, self.kernel))} "
                f"{self.padding} {self.dtype}{extra.get(self.op, '')}")

    def flops(self, mode: str) -> int:
        if self.op == "cp":
            return roofline.cp_flops(self.N, self.Cin, self.Cout, self.rank, self.out_size,
                                     self.kernel, mode)
        dense = roofline.conv3d_flops(self.N, self.Cin, self.Cout, self.groups, self.out_size,
                                      self.kernel, mode)
        return round(dense * self.density) if self.op == "block_sparse" else dense

    def weight_elems(self) -> int:
        """Elements of the weight as the op stores it."""
        dense = self.Cout * (self.Cin // self.groups) * math.prod(self.kernel)
        if self.op == "cp":
            return self.rank * (self.Cin + sum(self.kernel) + self.Cout)
        return round(dense * self.density) if self.op == "block_sparse" else dense

    def bytes(self, mode: str) -> int:
        return roofline.conv3d_bytes(self.N, self.Cin, self.Cout, self.groups, self.size,
                                     self.out_size, self.kernel, mode, self.bias,
                                     self.torch_dtype.itemsize, self.weight_elems())


_CASE_KEYS = {f.name for f in fields(Case)} | {"C"}


def parse_cases(items, where) -> list:
    """Cases from a list of dicts with ``Case``'s fields (``where`` names their source in
    errors). ``size`` and ``kernel`` take an int or 3 ints; a ``"depthwise"`` case may give
    ``C`` for its channels (then Cin = Cout = groups = C); ``block`` takes a list; the rest
    keep ``Case``'s defaults. Errors are ``ValueError``s naming the source and the case."""
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ValueError(f"{where}: expected a list of case objects, got "
                         f"{type(items).__name__}")
    cases = []
    for i, item in enumerate(items):
        item = dict(item)
        label = f"{where}: case {item.get('name', i)!r}"
        unknown = sorted(set(item) - _CASE_KEYS)
        if unknown:
            raise ValueError(f"{label}: unknown keys {unknown} (expected some of "
                             f"{sorted(_CASE_KEYS)})")
        if "C" in item:
            if item.get("op") != "depthwise":
                raise ValueError(f"{label}: 'C' is for op 'depthwise' cases; give Cin and Cout")
            c = item.pop("C")
            item.update(Cin=c, Cout=c, groups=c)
        item.setdefault("groups", 1)
        for key in ("size", "kernel"):
            if key in item:
                item[key] = _triple(f"{label}: {key}", item[key])
        if "block" in item:
            item["block"] = tuple(item["block"])
        try:
            cases.append(Case(**item))
        except TypeError as e:
            raise ValueError(f"{label}: {e}") from None
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: case names must be unique, got "
                         f"{sorted({n for n in names if names.count(n) > 1})} more than once")
    return cases


def load_cases(path) -> list:
    """Cases from a JSON (or YAML, with PyYAML) file holding a list of case objects
    (``parse_cases``), e.g. ``[{"name": "my-dw21", "op": "depthwise", "N": 1, "C": 32,
    "size": 64, "kernel": 21, "dtype": "bfloat16"}]``."""
    return parse_cases(read_data(path, "benchmark cases"), str(path))


def _builtin_case_sets() -> dict:
    """The case sets shipped in ``bench_cases.json`` (beside this file): name -> cases."""
    raw = json.loads(resources.files("lk3d.tools").joinpath(CASES_FILE).read_text())
    return {name: parse_cases(s["cases"], f"{CASES_FILE} [{name}]") for name, s in raw.items()}


# The shipped sets (``bench_cases.json`` says why each holds what it holds): "quick", a few
# layers of every op that a 2-core CPU runs in well under two minutes (the README's main job);
# "full", real layers for GPUs (3D UX-Net, RepUX-Net, dense 7³-15³, CP at k = 21,
# block-sparse at 5-100% density); "tiny", seconds under the interpreter (tests).
CASES_FILE = "bench_cases.json"
CASE_SETS = _builtin_case_sets()
QUICK_CASES, FULL_CASES, TINY_CASES = (CASE_SETS[k] for k in ("quick", "full", "tiny"))


@dataclass(frozen=True)
class Result:
    """One measurement; the CSV's columns are these fields (None is written as empty)."""
    case: str
    op: str
    shape: str
    dtype: str
    provider: str
    mode: str
    median_ms: Optional[float]
    tflops: Optional[float]
    speedup: Optional[float]  # baseline's median over this median
    roofline_fraction: Optional[float]  # the roofline's time over median_ms
    peak_mem_mb: Optional[float]  # CUDA: MiB one step allocates above its inputs; CPU: None
    baseline: str             # the fastest non-lk3d provider of this (case, mode), "" if none ran
    rel_err: Optional[float]  # lk3d rows: vs F.conv3d in the same dtype
    algo: str                 # lk3d rows: lk3d's plan, e.g. "fft" (fwd) or "fft/aten/fft"
                              # (forward/grad-input/grad-weight); "" where unknown
    status: str               # "ok", "skipped (budget)", "skipped (time limit)", "error: ..."
    device: str
    torch: str
    triton: str
    lk3d: str
    commit: str
    timestamp: str
    ceiling_tflops: Optional[float] = None  # this run's matmul rate in the case's dtype
    ceiling_gbps: Optional[float] = None    # this run's copy bandwidth (GB/s, read + write)


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------

def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    """Lowercase, every run of non-alphanumerics one '-': ``NVIDIA H100 80GB HBM3`` ->
    ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_slug(device) -> str:
    """A folder name for the device: the GPU's name on CUDA, the CPU's model name and torch's
    thread count on the CPU (``amd-epyc-2t``); trademark marks and clock speeds dropped."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return slug(torch.cuda.get_device_name(index))
    name = re.sub(r"\((R|TM|tm|r)\)|\bCPU\b|@.*$", " ", cpu_name())
    return f"{slug(name)}-{torch.get_num_threads()}t"


def default_report_dir(device, case_set: str, root=None) -> Path:
    """``<root>/<lk3d version>/<device slug>/<case set>``: where ``lk3d bench`` writes its report
    unless ``--out`` says otherwise; ``root`` defaults to ``lk3d.tools.report.reports_root()`` (the
    user's data folder, or ``$LK3D_REPORT_DIR``), never a folder of the checkout."""
    from lk3d.tools.report import reports_root

    root = reports_root() if root is None else Path(root)
    return root / lk3d.__version__ / device_slug(device) / slug(case_set)


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def git_commit() -> str:
    """The commit lk3d's source tree is at (``-dirty`` with uncommitted changes), "unknown" where
    there is no git checkout; ``LK3D_GIT_COMMIT`` overrides (a copied tree without .git)."""
    forced = os.environ.get("LK3D_GIT_COMMIT", "").strip()
    if forced:
        return forced
    root = Path(lk3d.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--"],
                               capture_output=True, timeout=10).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


# ---------------------------------------------------------------------------------------------
# one measurement (runs in the worker process, or in this one)
# ---------------------------------------------------------------------------------------------

_INPUTS = {}  # (case, device) -> the case's tensors (``_make_inputs``), reused by its providers


def _make_inputs(case: Case) -> dict:
    """The case's tensors (float32, CPU, seeded): ``x``, ``b`` (or None), ``w`` (the dense kernel
    the torch providers use), and by op ``factors`` (cp: U_out, U_in, A, B, C), ``sparse`` (a
    ``lk3d.BlockSparseWeight``), ``full`` and ``mask`` (block_sparse: the unpruned weight and
    the 0/1 mask of the stored blocks). Weights have the variance of a fan-in-scaled dense one."""
    g = torch.Generator().manual_seed(0)
    fan_in = case.Cin // case.groups * math.prod(case.kernel)
    t = dict(x=torch.randn(case.N, case.Cin, *case.size, generator=g))
    t["b"] = torch.randn(case.Cout, generator=g) if case.bias else None
    if case.op == "cp":
        # W sums R products of five N(0, s²) entries: variance R·s^10 = 1/fan_in.
        s = (fan_in * case.rank) ** -0.1
        rows = (case.Cout, case.Cin, *case.kernel)
        t["factors"] = [s * torch.randn(n, case.rank, generator=g) for n in rows]
        t["w"] = lk3d.CPFactors(*t["factors"]).to_dense()
        return t
    w = torch.randn(case.Cout, case.Cin // case.groups, *case.kernel, generator=g)
    t["w"] = w / math.sqrt(fan_in)
    if case.op == "block_sparse":
        t["full"] = t["w"]
        t["sparse"] = lk3d.BlockSparseWeight.from_dense(t["full"], case.block,
                                                        density=case.density)
        t["w"] = t["sparse"].to_dense()
        t["mask"] = (t["w"] != 0).to(t["w"].dtype)
    return t


def _inputs(case: Case, device: str) -> dict:
    key = (case, device)
    if key not in _INPUTS:
        _INPUTS.clear()
        moved = {}
        for name, v in _make_inputs(case).items():
            if isinstance(v, list):
                v = [f.to(device, case.torch_dtype) for f in v]
            elif v is not None:
                v = v.to(device, case.torch_dtype)
            moved[name] = v
        _INPUTS[key] = moved
    return _INPUTS[key]


def cp_unfused(x, U_out, U_in, A, B, C, bias, padding):
    """A rank-R CP convolution as five separate convolutions in plain torch (stride and dilation
    1): pointwise Cin->R, 1-D depthwise along D, H and W, pointwise R->Cout; each step writes an
    [N, R, ...] intermediate. The unfused baseline of the cp cases."""
    rank = U_out.shape[1]
    z = F.conv3d(x, U_in.t().reshape(rank, -1, 1, 1, 1))
    for axis, factor in enumerate((A, B, C)):
        shape = [rank, 1, 1, 1, 1]
        shape[2 + axis] = factor.shape[0]
        z = F.conv3d(z, factor.t().reshape(shape), None, 1, padding, 1, rank)
    return F.conv3d(z, U_out.reshape(*U_out.shape, 1, 1, 1), bias)


def _operands(case: Case, provider: str, t: dict):
    """``(x, params)``: the input and what the provider's step differentiates besides it, in its
    layout (None for an absent bias)."""
    x, b = t["x"], t["b"]
    if case.op == "cp" and provider in ("lk3d", "cp-unfused"):
        return x, [*t["factors"], b]
    if provider == "tensorly":  # the module's own parameters (it holds the factors)
        if "tensorly" not in t:
            t["tensorly"] = _tensorly_conv(case, t)
        return x, list(t["tensorly"].parameters())
    if case.op == "block_sparse" and provider == "lk3d":
        return x, [t["sparse"].values, b]
    if case.op == "block_sparse" and provider == "torch-mask":
        return x, [t["full"], b]
    w = t["w"]
    if provider == "torch-cl":
        x = x.contiguous(memory_format=torch.channels_last_3d)
        w = w.contiguous(memory_format=torch.channels_last_3d)
    return x, [w, b]


def _call(case: Case, provider: str, t: dict, x, params):
    """One forward of ``provider`` on operands from ``_operands``."""
    pad, groups = case.padding, case.groups
    if case.op == "cp" and provider == "lk3d":
        *factors, b = params
        return lk3d.cp_conv3d(x, lk3d.CPFactors(*factors), b, 1, pad)
    if provider == "cp-unfused":
        return cp_unfused(x, *params, pad)
    if provider == "tensorly":
        return t["tensorly"](x)
    if case.op == "block_sparse" and provider == "lk3d":
        values, b = params
        weight = t["sparse"].with_values(values)
        return lk3d.block_sparse_conv3d(x, weight, b, 1, pad, 1, groups)
    w, b = params
    if provider == "torch-mask":
        return F.conv3d(x, w * t["mask"], b, 1, pad, 1, groups)
    fn = lk3d.conv3d if provider.startswith("lk3d") else F.conv3d
    return fn(x, w, b, 1, pad, 1, groups)


def _tensorly_conv(case: Case, t: dict):
    """tensorly-torch's ``FactorizedConv`` holding the case's CP factors and bias."""
    from tltorch import FactorizedConv
    from tltorch.factorized_tensors import CPTensor

    factors = t["factors"]
    weights = torch.ones(case.rank, device=factors[0].device, dtype=factors[0].dtype)
    padding = tuple(k // 2 for k in case.kernel) if case.padding == "same" else 0
    conv = FactorizedConv.from_factorization(CPTensor(weights, [f.clone() for f in factors]),
                                             implementation="factorized", padding=padding,
                                             bias=None if t["b"] is None else t["b"].clone())
    return conv.to(factors[0].device)


@contextlib.contextmanager
def _forced_algo(provider: str):
    """``LK3D_ALGO`` set to the algorithm ``provider`` forces (none: unchanged) for the block."""
    algo = _FORCED_ALGO.get(provider)
    old = os.environ.get("LK3D_ALGO")
    if algo is not None:
        os.environ["LK3D_ALGO"] = algo
    try:
        yield
    finally:
        if algo is not None:
            if old is None:
                os.environ.pop("LK3D_ALGO", None)
            else:
                os.environ["LK3D_ALGO"] = old


def available(provider: str, case: Case, device: str) -> bool:
    """Whether ``provider`` measures ``case`` on ``device``: one of its op's providers, and for
    ``lk3d-tiled`` the Triton kernels can run such tensors here."""
    if provider not in OP_PROVIDERS[case.op]:
        return False
    if provider == "tensorly":
        import importlib.util

        return importlib.util.find_spec("tltorch") is not None and all(k % 2 for k in case.kernel)
    if provider == "lk3d-tiled":
        from lk3d._algos import kernels_can_run

        return kernels_can_run(torch.empty(0, dtype=case.torch_dtype, device=device))
    return True


def _provider_fn(case: Case, provider: str, mode: str, device: str):
    """A no-argument callable that runs one (case, provider, mode) step."""
    t = _inputs(case, device)
    x, params = _operands(case, provider, t)

    def forward(x, params):
        with _forced_algo(provider):
            return _call(case, provider, t, x, params)

    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return forward(x, params)
        return fwd
    leaves = [p if isinstance(p, torch.nn.Parameter) else p.detach().requires_grad_()
              for p in [x, *params] if p is not None]
    it = iter(leaves)
    lx = next(it)
    lparams = [None if p is None else next(it) for p in params]
    with torch.no_grad():
        grad = torch.randn_like(forward(x, params))  # in the output's layout
    if mode == "fwdbwd":
        def fwdbwd():
            with _forced_algo(provider):
                return torch.autograd.grad(forward(lx, lparams), leaves, grad)
        return fwdbwd
    y = forward(lx, lparams)

    def bwd():
        with _forced_algo(provider):
            return torch.autograd.grad(y, leaves, grad, retain_graph=True)
    return bwd


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _first_call_s(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def time_case(case: Case, provider: str, mode: str, device: str, budget_s: float,
              min_run_time: float) -> Optional[float]:
    """Median milliseconds of one step, or None when the first calls say it would pass
    ``budget_s``. The first call is not timed (Triton compiles, allocator and oneDNN warm-up);
    on CUDA the budget counts from the second, so a one-time compile does not skip a row (the
    worker's hard limit still bounds it)."""
    fn = _provider_fn(case, provider, mode, device)
    first = _first_call_s(fn, device)
    if device == "cuda":
        import triton.testing

        steady = _first_call_s(fn, device)
        # do_bench: one call, 5 to estimate, then warm-up and repetitions of ~min_run_time each
        if steady * 8 + 2 * min_run_time > budget_s:
            return None
        return float(triton.testing.do_bench(fn, warmup=25, rep=max(1, int(min_run_time * 1e3)),
                                             return_mode="median"))
    # blocked_autorange: one call at least to size its blocks, then calls for min_run_time
    if 2 * first + max(first, min_run_time) > budget_s:
        return None
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def peak_mem_mb(case: Case, provider: str, mode: str, device: str) -> Optional[float]:
    """MiB one step allocates at its peak above what was allocated before it (outputs,
    workspace, saved tensors); None on the CPU (no allocator statistics there)."""
    if device != "cuda":
        return None
    fn = _provider_fn(case, provider, mode, device)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - before) / 2**20


def measure_case(case: Case, provider: str, mode: str, device: str, budget_s: float,
                 min_run_time: float):
    """``(median_ms, peak_mem_mb)`` of one step (``time_case``, ``peak_mem_mb``); ``(None,
    None)`` when the budget skips it."""
    ms = time_case(case, provider, mode, device, budget_s, min_run_time)
    if ms is None:
        return None, None
    return ms, peak_mem_mb(case, provider, mode, device)


def lk3d_plans(case: Case, device: str) -> dict:
    """Which algorithm lk3d picks per pass for a dense or depthwise case ("forward",
    "grad_input", "grad_weight"), from ``lk3d.explain``; empty for other ops or where this lk3d
    cannot tell."""
    explain = getattr(lk3d, "explain", None)
    if explain is None or case.op not in ("dense", "depthwise"):
        return {}
    t = _inputs(case, device)
    try:
        plans = explain(t["x"], t["w"], t["b"], 1, case.padding, 1, case.groups)
        return {name: str(p["algo"]) for name, p in plans.items()}
    except Exception:  # a plan is context for the table, never a reason to fail the run
        return {}


def check_case(case: Case, device: str):
    """``(rel_err, plans)``: relative L2 error of lk3d's op against ``F.conv3d`` with the same
    (dense) kernel, both in the case's dtype, and ``lk3d_plans``. The reference runs
    channels_last_3d on the CPU (oneDNN's fast layout at large k) and NCDHW on CUDA."""
    t = _inputs(case, device)
    ref_provider = "torch-cl" if device == "cpu" else "torch"
    with torch.no_grad():
        y = _call(case, "lk3d", t, *_operands(case, "lk3d", t)).double()
        ref = _call(case, ref_provider, t, *_operands(case, ref_provider, t)).double()
        rel_err = float((y - ref).norm() / ref.norm().clamp_min(1e-30))
    return rel_err, lk3d_plans(case, device)


# ---------------------------------------------------------------------------------------------
# where measurements run: a worker process with a hard time limit, or this process
# ---------------------------------------------------------------------------------------------

def _worker_main(conn, num_threads):
    torch.set_num_threads(num_threads)
    conn.send(("ready", None))
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        fn, args = job
        try:
            conn.send(("ok", fn(*args)))
        except Exception as e:  # reported as the row's status; the worker goes on
            _INPUTS.clear()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            conn.send(("error", f"{type(e).__name__}: {e}".splitlines()[0][:200]))


def worker_env(device_type: str, huge_pages: bool = True) -> dict:
    """The environment a benchmark worker adds: on the CPU, PyTorch's transparent huge pages for
    large tensors (``THP_MEM_ALLOC_ENABLE=1``, see ``lk3d.cpu_memory``) unless ``huge_pages`` is
    False, in which case it is switched off even where this process has it."""
    if device_type != "cpu":
        return {}
    return {cpu_memory.THP_ENV: "1" if huge_pages else "0"}


class Worker:
    """Runs ``fn(*args)`` (importable functions) in a spawned process; a call that outlives its
    timeout kills the process and answers ``("timeout", None)``; the next call starts a new one."""

    def __init__(self, start_timeout: float = 300.0, env: Optional[dict] = None):
        self.start_timeout = start_timeout
        self.env = dict(env or {})  # extra environment of the worker process
        self.proc = None
        self.conn = None

    def _start(self):
        ctx = multiprocessing.get_context("spawn")  # fork would deadlock in OpenMP (libgomp)
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, torch.get_num_threads()),
                                daemon=True, name="lk3d-bench-worker")
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)  # a spawned process takes the environment at start()
        try:
            self.proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        try:
            if not self.conn.poll(self.start_timeout):
                raise RuntimeError(f"the benchmark worker did not start in {self.start_timeout} s")
            self.conn.recv()
        except EOFError:
            self.proc.join(5)
            code = self.proc.exitcode
            self.close()
            raise RuntimeError(f"the benchmark worker exited at start-up (code {code})") from None
        except RuntimeError:
            self.close()
            raise

    def call(self, fn, args, timeout: float):
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send((fn, args))
        if not self.conn.poll(timeout):
            self.close()
            return "timeout", None
        try:
            return self.conn.recv()
        except EOFError:
            self.proc.join(5)
            code = self.proc.exitcode
            self.close()
            return "error", f"worker exited with code {code}"

    def close(self):
        if self.proc is None:
            return
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(0.5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        self.conn.close()
        self.proc = self.conn = None


class InProcess:
    """The same interface as ``Worker`` in this process: no hard time limit."""

    def call(self, fn, args, timeout: float):
        try:
            return "ok", fn(*args)
        except Exception as e:
            _INPUTS.clear()
            return "error", f"{type(e).__name__}: {e}".splitlines()[0][:200]

    def close(self):
        _INPUTS.clear()


# ---------------------------------------------------------------------------------------------
# a run
# ---------------------------------------------------------------------------------------------

def progress_bar(iterable=None, *, enabled: bool = True, **kwargs):
    """A tqdm progress bar on stderr, drawn only where ``enabled`` and stderr is a terminal
    (tqdm's ``disable=None``): a log file, a pipe or a CI job gets none. Where tqdm is missing
    (lk3d installed without its ``bench`` extra), ``iterable`` itself, or None without one; on a
    terminal a note says so."""
    try:
        from tqdm import tqdm
    except ImportError:
        if enabled and sys.stderr.isatty():
            print("no progress bar: it needs tqdm (pip install 'lk3d[bench]')", file=sys.stderr,
                  flush=True)
        return iterable
    return tqdm(iterable, disable=None if enabled else True, file=sys.stderr, dynamic_ncols=True,
                **kwargs)


def run(cases: Sequence[Case], device=None, providers: Sequence[str] = PROVIDERS,
        modes: Optional[Sequence[str]] = None, budget_s: Optional[float] = None,
        min_run_time: Optional[float] = None, max_time_s: Optional[float] = None,
        isolate: bool = True, progress: bool = True, huge_pages: bool = True) -> list:
    """Benchmark ``cases`` on ``device`` (default: cuda if available, else cpu); one ``Result``
    per (case, mode, provider) for the providers of each case's op that are in ``providers``
    and ``available`` here, in that order. ``modes`` defaults to fwd+fwdbwd on CUDA and fwd on
    the CPU (the CPU backward of large kernels takes seconds to minutes per call). With
    ``isolate``, measurements run in a worker process, on the CPU with PyTorch's huge pages for
    large tensors unless ``huge_pages`` is False (``worker_env``, ``lk3d.cpu_memory``)."""
    device = torch.device(device if device is not None else default_device())
    dev = device.type
    if dev not in ("cpu", "cuda"):
        raise ValueError(f"device: expected cpu or cuda, got {device}")
    if dev == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but torch.cuda.is_available() is False")
    modes = tuple(modes) if modes is not None else (("fwd", "fwdbwd") if dev == "cuda"
                                                    else ("fwd",))
    for name, given, allowed in (("providers", providers, PROVIDERS), ("modes", modes, MODES)):
        bad = [v for v in given if v not in allowed]
        if bad or not given:
            raise ValueError(f"{name}: expected a non-empty subset of {allowed}, "
                             f"got {tuple(given)}")
    budget_s = DEFAULT_BUDGET_S[dev] if budget_s is None else float(budget_s)
    min_run_time = DEFAULT_MIN_RUN_TIME_S[dev] if min_run_time is None else float(min_run_time)
    hard_timeout = 1.5 * budget_s + _START_ALLOWANCE_S
    deadline = None if max_time_s is None else time.monotonic() + max_time_s

    env = dict(device=device_name(device), torch=torch.__version__, triton=triton_version(),
               lk3d=lk3d.__version__, commit=git_commit(),
               timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    runner = Worker(env=worker_env(dev, huge_pages)) if isolate else InProcess()
    dtypes = list(dict.fromkeys(c.dtype for c in cases))
    measured = {c: [p for p in OP_PROVIDERS[c.op] if p in providers and available(p, c, dev)]
                for c in cases}
    bar = progress_bar(total=len(dtypes) + sum(1 + len(measured[c]) * len(modes) for c in cases),
                       enabled=progress, unit="step", leave=False)

    def step(label, fn, args):
        if bar is not None:
            bar.set_description(label)
        if deadline is not None and time.monotonic() > deadline:
            outcome = ("skipped", SKIPPED_TIME_LIMIT)
        else:
            outcome = runner.call(fn, args, hard_timeout)
        if bar is not None:
            bar.update()
        return outcome

    results = []
    try:
        ceilings = {}
        for dtype in dtypes:  # first, on an idle machine; None where it fails or times out
            kind, value = step(f"ceilings {dtype}", roofline.measure_ceilings_by_name,
                               (dev, dtype))
            ceilings[dtype] = value if kind == "ok" else None
        for case in cases:
            kind, value = step(f"{case.name} check", check_case, (case, dev))
            rel_err, plans = value if kind == "ok" else (None, {})
            for mode in modes:
                timed = {}
                for provider in measured[case]:
                    kind, value = step(f"{case.name} {provider} {mode}", measure_case,
                                       (case, provider, mode, dev, budget_s, min_run_time))
                    if kind == "ok":
                        ms, mem = value
                        timed[provider] = (ms, mem, "ok" if ms is not None else SKIPPED_BUDGET)
                    elif kind == "timeout":
                        timed[provider] = (None, None, SKIPPED_BUDGET)
                    elif kind == "skipped":
                        timed[provider] = (None, None, value)
                    else:
                        timed[provider] = (None, None, f"error: {value}")
                results += _rows(case, mode, timed, rel_err, _algo(plans, mode),
                                 ceilings[case.dtype], env)
    finally:
        runner.close()
        if bar is not None:
            bar.close()
    return results


def _algo(plans, mode):
    if mode == "fwd":
        return plans.get("forward", "")
    passes = [plans.get(k, "?") for k in ("forward", "grad_input", "grad_weight")]
    return "" if not plans else passes[0] if len(set(passes)) == 1 else "/".join(passes)


def is_baseline(provider: str) -> bool:
    """Providers not from lk3d: the ones a speedup is measured against."""
    return not provider.startswith("lk3d")


def _rows(case, mode, timed, rel_err, algo, ceilings, env):
    ran = {p: ms for p, (ms, _, _) in timed.items() if is_baseline(p) and ms is not None}
    baseline = min(ran, key=ran.get) if ran else ""
    rows = []
    for provider in timed:
        ms, mem, status = timed[provider]
        seconds = None if ms is None else ms * 1e-3
        rows.append(Result(
            case=case.name, op=case.op, shape=case.shape, dtype=case.dtype, provider=provider,
            mode=mode, median_ms=ms,
            tflops=None if ms is None else case.flops(mode) / seconds / 1e12,
            speedup=None if ms is None or not baseline else ran[baseline] / ms,
            roofline_fraction=roofline.roofline_fraction(case.flops(mode), case.bytes(mode),
                                                         seconds, ceilings),
            peak_mem_mb=mem, baseline=baseline, rel_err=rel_err if provider == "lk3d" else None,
            algo=algo if provider == "lk3d" else _FORCED_ALGO.get(provider, ""), status=status,
            ceiling_tflops=None if ceilings is None else ceilings.flops_per_s / 1e12,
            ceiling_gbps=None if ceilings is None else ceilings.bytes_per_s / 1e9, **env))
    return rows


def tolerance(dtype: str, device: str) -> float:
    if dtype == "float32" and device == "cuda" and allow_tf32():
        return TF32_TOLERANCE
    return TOLERANCE[dtype]


def accuracy_failures(results, device: str) -> list:
    """lk3d rows whose error against F.conv3d passes the dtype's tolerance (one per case)."""
    seen, bad = set(), []
    for r in results:
        if r.provider == "lk3d" and r.rel_err is not None and r.case not in seen:
            seen.add(r.case)
            if not r.rel_err <= tolerance(r.dtype, device):  # NaN fails too
                bad.append(r)
    return bad


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------

def _fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(results) -> str:
    """A plain-text table, one line per result; runs of the same case show its name once.
    ``roofline`` is the roofline fraction in percent; a ``peak MB`` column comes where any row
    measured memory (CUDA)."""
    with_mem = any(r.peak_mem_mb is not None for r in results)
    header = ("case", "provider", "mode", "ms", "TFLOP/s", "roofline", "speedup", "rel.err") + \
        (("peak MB",) if with_mem else ()) + ("algo",)
    lines = []
    last = None
    for r in results:
        ms = r.status if r.median_ms is None else f"{r.median_ms:.3f}"
        roof = "-" if r.roofline_fraction is None else f"{100 * r.roofline_fraction:.3g}%"
        mem = (_fmt(r.peak_mem_mb, ".1f"),) if with_mem else ()
        lines.append((r.case if r.case != last else "", r.provider, r.mode, ms,
                      _fmt(r.tflops, ".3g"), roof, _fmt(r.speedup, ".2f", "x"),
                      _fmt(r.rel_err, ".1e"), *mem, r.algo))
        last = r.case
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    right = set(range(3, len(header) - 1))

    def join(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [join(header), join(["-" * w for w in widths])] + [join(line) for line in lines]
    return "\n".join(out)


def describe(results) -> str:
    """The run's context: device, versions, commit, time."""
    if not results:
        return "no results"
    r = results[0]
    ceilings = {x.dtype: (x.ceiling_tflops, x.ceiling_gbps) for x in results
                if x.ceiling_tflops is not None}
    roof = "; ".join(f"{dtype} matmul {tf:.3g} TFLOP/s, copy {gb:.3g} GB/s"
                     for dtype, (tf, gb) in ceilings.items()) or "not measured"
    return (f"device: {r.device}\ntorch {r.torch}, triton {r.triton}, lk3d {r.lk3d}, "
            f"commit {r.commit}, {r.timestamp}\nceilings (this run): {roof}")


CSV_COLUMNS = tuple(f.name for f in fields(Result))


def write_csv(results, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in results:
            writer.writerow({k: "" if v is None else v for k, v in asdict(r).items()})
