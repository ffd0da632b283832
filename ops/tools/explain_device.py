"""The modelled plans of a convolution on a named GPU (``lk3d explain --device h100``), on any
machine: every pass's candidates priced by lk3d's CUDA cost models from the GPU's figures
(``lk3d.autotune.devices``), the cheapest taken. Nothing is looked up (no plan cache: the GPU is
not here) and nothing depends on the host (its CPU threads). ``candidates_ms`` always holds
"aten", what torch alone would do: ``F.conv3d`` (for CP the unfused torch chain of five
convolutions, for block-sparse ``F.conv3d`` of the dense weight)."""
import math

import torch

from lk3d import _algos, cp
from lk3d import _block_sparse_launch as launch
from lk3d._spec import geometry, triple
from lk3d.autotune import devices
from lk3d.kernels import MAX_VOLUME

CONV_PASSES = {"forward": "conv3d", "grad_input": "conv3d_grad_input",
               "grad_weight": "conv3d_grad_weight"}
BLOCK_SPARSE_PASSES = ("forward", "grad_input", "grad_values")


def _plan(times, routes=None):
    """A pass's plan: the cheapest of ``routes`` (default: every candidate) by modelled ms."""
    routes = routes or tuple(times)
    algo = min(routes, key=times.get)
    return {"algorithm": algo, "source": "model",
            "candidates_ms": {name: round(ms, 4) for name, ms in times.items()}}


def _kernels_take(dtype, *volumes):
    return dtype in _algos.KERNEL_DTYPES["cuda"] and max(volumes) <= MAX_VOLUME


def _spec(x_shape, kernel, stride, padding, dilation, groups):
    return geometry(x_shape[2:], tuple(kernel), triple("stride", stride),
                    padding, triple("dilation", dilation), groups)


def conv3d_passes(gpu, x_shape, w_shape, dtype, stride=1, padding=0, dilation=1, groups=1):
    """{pass: plan} of ``lk3d.conv3d`` on the GPU of figures ``gpu``."""
    spec = _spec(x_shape, w_shape[2:], stride, padding, dilation, groups)
    args = (list(x_shape), list(w_shape), spec.stride, spec.padding, spec.dilation, groups,
            dtype, gpu, spec.out_size)
    names = ("tiled", "fft", "aten") if _kernels_take(
        dtype, math.prod(x_shape[2:]), math.prod(spec.out_size)) else ("fft", "aten")
    return {pass_: _plan({a: _algos.model_ms(a, *args, op) for a in names})
            for pass_, op in CONV_PASSES.items()}


def cp_passes(gpu, x_shape, cout, rank, kernel, dtype, stride=1, padding=0, dilation=1):
    """{pass: plan} of ``lk3d.cp_conv3d`` ("separable": the separable kernels, "tiled": the k³
    fused kernels, "aten": the chain)."""
    spec = _spec(x_shape, kernel, stride, padding, dilation, 1)
    names = ("separable", "tiled", "aten") if _kernels_take(dtype, 0) else ("aten",)
    return {pass_: _plan({a: cp.model_ms(a, list(x_shape), cout, rank, list(kernel), spec.stride,
                                         spec.padding, spec.dilation, dtype, gpu, backward)
                          for a in names})
            for pass_, backward in (("forward", False), ("backward", True))}


def block_sparse_passes(gpu, x_shape, w_shape, block_shape, density, dtype, stride=1, padding=0,
                        dilation=1, groups=1):
    """{pass: plan} of ``lk3d.block_sparse_conv3d`` with ``round(density · blocks)`` blocks
    stored: its routes "sparse" (the kernels) and "dense" (lk3d.conv3d's cheaper of fft and aten
    on the dense weight), and "aten" beside them."""
    spec = _spec(x_shape, w_shape[2:], stride, padding, dilation, groups)
    blocks = math.prod(w // b for w, b in zip(w_shape, block_shape))
    nnz = max(1, round(density * blocks))
    stand_in = torch.zeros((), dtype=dtype).expand(x_shape)
    geometry6 = (spec.stride, spec.padding, spec.dilation)
    dense = {a: _algos.model_ms(a, list(x_shape), list(w_shape), *geometry6, groups, dtype, gpu,
                                spec.out_size) for a in ("fft", "aten")}
    plans = {}
    for pass_ in BLOCK_SPARSE_PASSES:
        times = {"dense": min(dense.values()), "aten": dense["aten"]}
        routes = ("dense",)
        if _kernels_take(dtype, math.prod(x_shape[2:]), math.prod(spec.out_size)):
            times["sparse"] = launch.kernels_ms(pass_, stand_in, nnz, list(w_shape),
                                                list(block_shape), *geometry6, groups, gpu)
            routes = ("sparse", "dense")
        plans[pass_] = _plan(times, routes)
    return plans


def case_passes(name, case, dtype=None):
    """{pass: plan} of a case of ``lk3d bench`` (``lk3d.tools.bench_cases.Case``) on the named
    GPU ``name``."""
    gpu = devices.named(name)
    dtype = dtype or case.torch_dtype
    x_shape = (case.N, case.Cin, *case.size)
    if case.op == "cp":
        return cp_passes(gpu, x_shape, case.Cout, case.rank, case.kernel, dtype,
                         padding=case.padding)
    w_shape = (case.Cout, case.Cin // case.groups, *case.kernel)
    if case.op == "block_sparse":
        return block_sparse_passes(gpu, x_shape, w_shape, case.block, case.density, dtype,
                                   padding=case.padding, groups=case.groups)
    return conv3d_passes(gpu, x_shape, w_shape, dtype, padding=case.padding, groups=case.groups)


def table(device, case, passes) -> str:
    """The plans as text: one line per pass, the pick first, then every candidate's ms."""
    lines = [f"{case} on {device} ({devices.named(device).name}), modelled from its figures:"]
    for pass_, plan in passes.items():
        times = "  ".join(f"{a} {ms:.4g}" for a, ms in plan["candidates_ms"].items())
        lines.append(f"  {pass_:<12} {plan['algorithm']:<7} ({plan['source']})  ms: {times}")
    return "\n".join(lines)
