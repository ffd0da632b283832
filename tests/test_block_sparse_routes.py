"""Block-sparse's routes through the planner (``lk3d.autotune.select``): the algorithms its three
passes register ("sparse", "dense"), forcing a route with ``LK3D_ALGO`` or
``lk3d.block_sparse.ROUTE`` (the forced route alone runs, and output and gradients match float64
``F.conv3d`` with the dense weight; on the torch path and where the Triton kernels serve), bad
forced names, an algorithm of another op forced, ``plans`` and the plan cache under ``tune()``,
and the CUDA cost models that make the dense route a candidate there (on a stand-in for a CUDA
tensor: no GPU needed).
"""
import pytest
import torch
import torch.nn.functional as F

import lk3d
from _cases import TOL, Case, assert_close_rel, leaf_like, strided_copy
from lk3d import block_sparse
from lk3d import _block_sparse_launch as launch
from lk3d.autotune import cache, devices, registry, select

ROUTES = ("sparse", "dense")
# Odd sizes, stride and dilation, asymmetric "same" padding of an even kernel, two groups.
CASE = Case.block_sparse(2, 4, 6, (5, 7, 6), (3, 2, 3), (3, 2, 1, 2, 1), 0.5, dilation=(1, 1, 2),
                         padding="same", groups=2)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A fresh plan cache without seeds, nothing forced or tuned from the environment, the torch
    path and no route forced, unless a test says otherwise."""
    monkeypatch.setenv("LK3D_CACHE_DIR", str(tmp_path / "plans"))
    monkeypatch.setattr(cache, "_seed_entries", dict)
    monkeypatch.delenv("LK3D_ALGO", raising=False)
    monkeypatch.delenv("LK3D_AUTOTUNE", raising=False)
    monkeypatch.setattr(select, "_forced_warned", set())
    monkeypatch.setattr(block_sparse, "USE_KERNELS", False)
    monkeypatch.setattr(block_sparse, "ROUTE", "auto")


def _fail(*args, **kwargs):
    raise AssertionError("a route the test does not ask for ran")


def _tensors():
    """Non-contiguous leaves (input, values, bias) of CASE and a weight over them."""
    x, ws, bias = CASE.tensors()
    leaves = [leaf_like(strided_copy(t)) for t in (x, ws.values, bias)]
    return leaves, ws.with_values(leaves[1])


def _check_against_reference(leaves, weight):
    y = lk3d.block_sparse_conv3d(leaves[0], weight, leaves[2], **CASE.args())
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref = F.conv3d(ref_leaves[0], weight.with_values(ref_leaves[1]).to_dense(), ref_leaves[2],
                   **CASE.args())
    assert_close_rel("output", y, ref, TOL[torch.float64])
    gy = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for name, got, want in zip(("input", "values", "bias"), torch.autograd.grad(y, leaves, gy),
                               torch.autograd.grad(ref, ref_leaves, gy)):
        assert_close_rel(f"grad {name}", got, want, 1e-10)


def test_planner_lists_the_routes():
    assert {"sparse", "dense"} <= set(select.ALGOS)
    for pass_, op in block_sparse.OPS.items():
        sparse, dense = registry.algorithms(op)
        assert (sparse.name, dense.name) == ROUTES
        assert sparse.launches and sparse.spaces == launch.SPACES[pass_]
        assert not dense.launches and dense.spaces == ()
    x, ws, bias = CASE.tensors()
    plans = block_sparse.plans(x, ws, bias, **CASE.args())
    assert list(plans) == ["forward", "grad_input", "grad_values"]
    for plan in plans.values():
        assert plan["source"] == "model" and set(plan["times_ms"]) == set(ROUTES)
        assert plan["algo"] == min(plan["times_ms"], key=plan["times_ms"].get)
    text = repr(plans)
    assert text.startswith("lk3d.block_sparse_conv3d on cpu, float64: input (2, 4, 5, 7, 6)")
    assert "\npath: sparse by per-block torch products" in text and "grad_values" in text


@pytest.mark.parametrize("path", ["torch", "kernels"])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("by", ["LK3D_ALGO", "ROUTE"])
def test_forced_route_runs_alone(by, route, path, monkeypatch):
    """The forced route runs every pass, also where the model or the interpreter's preference
    for the kernels would choose the other; the other route's runners fail if called."""
    monkeypatch.setattr(block_sparse, "USE_KERNELS", path == "kernels")
    if by == "ROUTE":
        monkeypatch.setattr(block_sparse, "ROUTE", route)
    else:
        monkeypatch.setenv("LK3D_ALGO", route)
    for op in block_sparse.OPS.values():
        other = registry.get(op, "dense" if route == "sparse" else "sparse")
        monkeypatch.setattr(other, "run", _fail)
    leaves, weight = _tensors()
    x = leaves[0].detach()
    plans = block_sparse.plans(x, weight, None, **CASE.args())
    assert {(p["algo"], p["source"]) for p in plans.values()} == {(route, "forced")}
    want = dict(path="kernels") if (route, path) == ("sparse", "kernels") else dict(
        path="torch", route=route, algo="aten" if route == "dense" else None, times_ms={})
    assert block_sparse.explain(x, weight, None, **CASE.args()) == want
    _check_against_reference(leaves, weight)


def test_route_wins_over_lk3d_algo(monkeypatch):
    monkeypatch.setenv("LK3D_ALGO", "dense")
    monkeypatch.setattr(block_sparse, "ROUTE", "sparse")
    x, ws, _ = CASE.tensors()
    assert block_sparse.explain(x, ws, **CASE.args())["route"] == "sparse"
    monkeypatch.setattr(block_sparse, "ROUTE", "auto")
    assert block_sparse.explain(x, ws, **CASE.args())["route"] == "dense"


@pytest.mark.parametrize("by", ["LK3D_ALGO", "ROUTE"])
def test_bad_forced_name_names_the_choices(by, monkeypatch):
    if by == "ROUTE":
        monkeypatch.setattr(block_sparse, "ROUTE", "sideways")
    else:
        monkeypatch.setenv("LK3D_ALGO", "sideways")
    x, ws, _ = CASE.tensors()
    for call in (lk3d.block_sparse_conv3d, block_sparse.explain, block_sparse.plans):
        with pytest.raises(ValueError) as info:
            call(x, ws, None, **CASE.args())
        for word in (by, "'auto'", "'sparse'", "'dense'", "'sideways'"):
            assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


def test_another_ops_algorithm_forced_warns_and_the_model_chooses(monkeypatch):
    monkeypatch.setenv("LK3D_ALGO", "fft")
    x, ws, _ = CASE.tensors()
    with pytest.warns(RuntimeWarning, match=r"LK3D_ALGO=fft cannot run here: block_sparse_conv3d"
                                            r"\w* on cpu chooses among sparse, dense only"):
        plans = block_sparse.plans(x, ws, None, **CASE.args())
    assert {p["source"] for p in plans.values()} == {"model"}
    assert "LK3D_ALGO=fft cannot run here" in plans["forward"]["note"]


def test_tune_measures_the_routes_and_caches_the_plans():
    leaves, weight = _tensors()
    with select.tune():
        _check_against_reference(leaves, weight)
    plans = block_sparse.plans(leaves[0].detach(), weight, None, **CASE.args())
    for plan in plans.values():
        assert plan["source"] == "cache" and set(plan["times_ms"]) == set(ROUTES)
        assert plan["algo"] == min(plan["times_ms"], key=plan["times_ms"].get)


class _CudaStandIn:
    """What the cost models read of a CUDA tensor (shape, dtype, device), without a GPU."""

    def __init__(self, shape, dtype=torch.bfloat16):
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, torch.device("cuda")

    def dim(self):
        return len(self.shape)


@pytest.mark.parametrize("block,groups,density,fastest", [
    ((16, 16, 1, 1, 1), 1, 0.05, "sparse"),
    ((16, 16, 1, 1, 1), 1, 1.0, "dense"),
    ((4, 4, 1, 1, 1), 1, 0.25, "dense"),
    ((64, 64, 1, 1, 1), 1, 0.2, "sparse"),
    ((8, 1, 1, 1, 1), 64, 0.5, "dense"),  # depthwise kernels at ~8% of FMA peak lose to the FFT
], ids=["16x16-sparse", "16x16-full", "4x4", "64x64", "depthwise"])
def test_cuda_cost_models_weigh_both_routes(block, groups, density, fastest, monkeypatch):
    """On CUDA where the kernels serve, the dense route (cuDNN on the dense weight) is a
    candidate: small channel blocks, padded to 16-wide tiles in the kernels, lose to it at all
    but low densities; wide blocks keep the kernels at 20% (the dense route takes the FFT, which
    an H100's figures price below cuDNN at k = 15); depthwise kernels, at their issue ceiling of
    ~8% of the FMA peak, lose to the FFT at half density."""
    monkeypatch.setattr(block_sparse, "USE_KERNELS", True)
    monkeypatch.setattr(devices, "of", lambda device: devices.named("h100"))
    x = _CudaStandIn((1, 64, 32, 32, 32))
    w_shape = [64, 64 // groups, 15, 15, 15]
    blocks = 1
    for n, b in zip(w_shape, block):
        blocks *= n // b
    col = torch.zeros(round(density * blocks), dtype=torch.int32)
    assert block_sparse._serve(x)
    for pass_, op in block_sparse.OPS.items():
        problem = (pass_, x, None, col, w_shape, list(block), [1, 1, 1], [7] * 6, [1, 1, 1],
                   groups, True)
        times = {a.name: a.cost_ms(*problem) for a in registry.algorithms(op)
                 if a.can_run(*problem)}
        assert set(times) == set(ROUTES) and all(0 < t < float("inf") for t in times.values())
        assert min(times, key=times.get) == fastest, (pass_, times)
