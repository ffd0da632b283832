"""The providers of ``lk3d bench`` and one measurement of a (case, provider, mode): the tensors
of a case, what each provider runs, its timing (``lk3d.autotune.timing``), its peak memory, and the
accuracy check of lk3d's op. These run in the benchmark's worker process (or in this one)."""
import contextlib
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

import lk3d
from lk3d.autotune.timing import call_s, repeat_ms
from lk3d.tools.bench_cases import Case

_DENSE_PROVIDERS = ("lk3d", "lk3d-fft", "lk3d-tiled", "torch", "torch-cl")
OP_PROVIDERS = {
    "dense": _DENSE_PROVIDERS,
    "depthwise": _DENSE_PROVIDERS,
    "cp": ("lk3d", "cp-unfused", "tensorly", "torch", "torch-cl"),
    "block_sparse": ("lk3d", "lk3d-dense", "torch-mask", "torch", "torch-cl"),
}
PROVIDERS = tuple(dict.fromkeys(p for ps in OP_PROVIDERS.values() for p in ps))
FORCED_ALGO = {"lk3d-fft": "fft", "lk3d-tiled": "tiled"}  # providers that force LK3D_ALGO

_INPUTS = {}  # (case, device) -> the case's tensors (``_make_inputs``), reused by its providers


def clear_inputs():
    """Drop the tensors held for the last case (after an error, or when a run ends)."""
    _INPUTS.clear()


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
    algo = FORCED_ALGO.get(provider)
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


def time_case(case: Case, provider: str, mode: str, device: str, budget_s: float,
              min_run_time: float) -> Optional[float]:
    """Median milliseconds of one step, or None when the first calls say it would pass
    ``budget_s``. The first call is not timed (Triton compiles, allocator and oneDNN warm-up);
    on CUDA the budget counts from the second, so a one-time compile does not skip a row (the
    worker's hard limit still bounds it)."""
    fn = _provider_fn(case, provider, mode, device)
    first = call_s(fn, device)
    if device == "cuda":
        steady = call_s(fn, device)
        # do_bench: one call, 5 to estimate, then warm-up and repetitions of ~min_run_time each
        if steady * 8 + 2 * min_run_time > budget_s:
            return None
    # blocked_autorange: one call at least to size its blocks, then calls for min_run_time
    elif 2 * first + max(first, min_run_time) > budget_s:
        return None
    return repeat_ms(fn, device, min_run_time)


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
