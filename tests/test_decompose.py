"""``lk3d.decompose`` (CP and Tucker-2 of conv weights, on TensorLy) and ``lk3d.nn.TuckerConv3d``.

Exact-rank weights are recovered, the error falls as the rank grows, results are deterministic,
dtypes come back as given, bad arguments are named, and a 64×64×21³ weight's CP runs within a
small multiple of the weight's memory. ``TuckerConv3d`` runs ``lk3d.conv3d`` (the Triton kernels
under the interpreter): its shapes stay tiny. The tests of the solvers skip where TensorLy does not
import (the ``needs_tensorly`` fixture, tests/conftest.py); the others run without it.
"""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lk3d
from _cases import TOL, raises_naming, rel_err
from lk3d.decompose import TuckerFactors


def exact_cp_weight(shape, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    mats = [torch.randn(n, rank, generator=g, dtype=torch.float64) for n in shape]
    return lk3d.CPFactors(*mats).to_dense()


def exact_tucker_weight(shape, ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(*ranks, *shape[2:], generator=g, dtype=torch.float64)
    u_out = torch.randn(shape[0], ranks[0], generator=g, dtype=torch.float64)
    u_in = torch.randn(shape[1], ranks[1], generator=g, dtype=torch.float64)
    return TuckerFactors(core, u_out, u_in).to_dense()


# ---------------------------------------------------------------------------------------------
# CP
# ---------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("needs_tensorly")
@pytest.mark.parametrize("shape, rank, options", [
    ((8, 6, 5, 3, 4), 1, {}),
    ((8, 6, 5, 3, 4), 3, {}),
    ((6, 5, 3, 3, 3), 8, {}),   # rank above every kernel side
    ((4, 4, 7, 1, 7), 5, {}),   # a kernel side of 1
    # ALS meets a swamp here (error 0.04 after 100 sweeps): more sweeps, or the line search.
    ((16, 8, 5, 5, 5), 12, dict(n_iter_max=500)),
    ((16, 8, 5, 5, 5), 12, dict(linesearch=True)),
], ids=lambda v: ("x".join(map(str, v)) if isinstance(v, tuple) else
                  f"r{v}" if isinstance(v, int)
                  else ",".join(f"{k}={x}" for k, x in v.items()) or "defaults"))
def test_cp_recovers_exact_rank(shape, rank, options):
    weight = exact_cp_weight(shape, rank)
    factors, err = lk3d.decompose.cp(weight, rank, **options)
    assert isinstance(factors, lk3d.CPFactors) and factors.rank == rank
    assert factors.kernel_size == shape[2:] and factors.weights is not None
    assert err < 1e-4
    assert rel_err(factors.to_dense(), weight) == pytest.approx(err, rel=1e-6, abs=1e-12)


@pytest.mark.usefixtures("needs_tensorly")
def test_cp_error_falls_with_rank():
    weight = torch.randn(8, 6, 5, 3, 4, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64)
    errors = [lk3d.decompose.cp(weight, r)[1] for r in (1, 2, 4, 8, 16, 32)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] < 1 and errors[-1] < 0.9 * errors[0]


@pytest.mark.usefixtures("needs_tensorly")
def test_cp_deterministic_and_dtypes():
    weight = exact_cp_weight((6, 4, 3, 5, 3), 4, seed=2).float()
    a, err_a = lk3d.decompose.cp(weight, 6, n_iter_max=20, seed=3)
    b, err_b = lk3d.decompose.cp(weight, 6, n_iter_max=20, seed=3)
    assert err_a == err_b
    assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))
    assert a.dtype == torch.float32 and err_a < 1e-3
    half, err = lk3d.decompose.cp(weight.half().requires_grad_(), 4)
    assert half.dtype == torch.float16 and not half.U_out.requires_grad and err < 1e-2


@pytest.mark.usefixtures("needs_tensorly")
def test_cp_conv_with_decomposed_factors():
    """The decomposition's factors run through cp_conv3d as their dense kernel through F.conv3d."""
    weight = torch.randn(4, 3, 5, 3, 4, dtype=torch.float64)
    factors, _ = lk3d.decompose.cp(weight, 5, n_iter_max=30)
    x = torch.randn(2, 3, 6, 5, 7, dtype=torch.float64)
    want = nn.functional.conv3d(x, factors.to_dense(), padding="same")
    assert rel_err(lk3d.cp_conv3d(x, factors, padding="same"), want) < TOL[torch.float64]


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    import lk3d
    import tensorly.decomposition  # imported before the baseline: its import is not the solver's

    def peak():  # bytes (ru_maxrss is KiB on Linux, bytes on macOS)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024

    torch.linalg.eigh(torch.eye(4))  # load LAPACK before the baseline
    weight = torch.randn(64, 64, 21, 21, 21, generator=torch.Generator().manual_seed(0))
    base, start = peak(), time.perf_counter()
    factors, err = lk3d.decompose.cp(weight, 4, n_iter_max=5)
    print(json.dumps(dict(growth=peak() - base, weight=weight.numel() * weight.element_size(),
                          seconds=time.perf_counter() - start, err=err, rank=factors.rank)))
""")


@pytest.mark.usefixtures("needs_tensorly")
def test_cp_memory_is_a_small_multiple_of_the_weight():
    """A 64×64×21³ float32 weight (145 MiB): the decomposition's peak RSS growth stays under
    2.5× the weight (measured 1.8-2.0×: an unfolded copy, Khatri-Rao products, temporaries).
    In a subprocess, so that the peak is this call's alone; about 4 s."""
    run = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["rank"] == 4 and 0 < result["err"] < 1
    assert result["growth"] < 2.5 * result["weight"], result


# ---------------------------------------------------------------------------------------------
# Tucker-2
# ---------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("needs_tensorly")
@pytest.mark.parametrize("shape, ranks", [((8, 6, 3, 4, 5), (3, 2)), ((5, 7, 3, 3, 1), (5, 4)),
                                          ((4, 4, 3, 3, 3), (2, 2))],
                         ids=["8x6-r3x2", "5x7-r5x4", "4x4-r2x2"])
def test_tucker_recovers_exact_ranks(shape, ranks):
    weight = exact_tucker_weight(shape, ranks)
    factors, err = lk3d.decompose.tucker(weight, ranks)
    assert factors.ranks == ranks and factors.kernel_size == shape[2:]
    assert err < 1e-4
    assert rel_err(factors.to_dense(), weight) == pytest.approx(err, rel=1e-6, abs=1e-12)
    eye = torch.eye(ranks[0], dtype=torch.float64)
    torch.testing.assert_close(factors.U_out.T @ factors.U_out, eye)


@pytest.mark.usefixtures("needs_tensorly")
def test_tucker_error_falls_with_rank():
    weight = torch.randn(8, 6, 5, 3, 4, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64)
    errors = [lk3d.decompose.tucker(weight, r)[1] for r in (1, 2, 4, 6)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert lk3d.decompose.tucker(weight, (8, 6))[1] < 1e-12  # full ranks: exact


def test_tucker_factors_errors():
    core, u_out, u_in = torch.randn(3, 2, 3, 3, 3), torch.randn(5, 3), torch.randn(4, 2)
    TuckerFactors(core, u_out, u_in)
    with pytest.raises(ValueError, match="U_in .4, 3."):
        TuckerFactors(core, u_out, torch.randn(4, 3))
    with pytest.raises(ValueError, match="core"):
        TuckerFactors(core[0], u_out, u_in)
    with pytest.raises(TypeError, match="U_out"):
        TuckerFactors(core, u_out.double(), u_in)


# ---------------------------------------------------------------------------------------------
# argument errors
# ---------------------------------------------------------------------------------------------

W = torch.randn(4, 3, 3, 3, 3)
DECOMPOSE_ERRORS = [  # (function, arguments, error, what the message names)
    ("cp", (W, 0), ValueError, ["rank", "0"]),
    ("cp", (W, 2.0), TypeError, ["rank", "2.0"]),
    ("cp", (W, True), TypeError, ["rank", "True"]),
    ("cp", (W[0], 2), ValueError, ["weight", "5-D", "4-D"]),
    ("cp", (W.long(), 2), TypeError, ["weight", "int64"]),
    ("cp", (W.numpy(), 2), TypeError, ["weight", "ndarray"]),
    ("cp", (W[:0], 2), ValueError, ["weight", "non-empty"]),
    ("cp", (W, 2, 0), ValueError, ["n_iter_max", "0"]),
    ("cp", (W, 2, 10, -1), TypeError, ["seed", "-1"]),
    ("tucker", (W, (5, 2)), ValueError, ["ranks", "<= 4", "(5, 2)"]),
    ("tucker", (W, 0), ValueError, ["ranks", "0"]),
    ("tucker", (W, (2, 2, 2)), TypeError, ["ranks", "(2, 2, 2)"]),
    ("tucker", (W, "2"), TypeError, ["ranks", "'2'"]),
]


@pytest.mark.parametrize("fn, args, error, names", DECOMPOSE_ERRORS,
                         ids=[f"{fn}-{i}" for i, (fn, *_) in enumerate(DECOMPOSE_ERRORS)])
def test_decompose_errors(fn, args, error, names):
    with raises_naming(error, names):
        getattr(lk3d.decompose, fn)(*args)


# ---------------------------------------------------------------------------------------------
# lk3d.nn.TuckerConv3d
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, shape", [
    (dict(kernel_size=(3, 2, 3), padding="same"), (1, 3, 4, 5, 4)),
    (dict(kernel_size=3, stride=2, padding=1, bias=False), (1, 3, 5, 4, 5)),
    (dict(kernel_size=(3, 3, 1), padding=(1, 1, 0), padding_mode="reflect"), (3, 4, 4, 3)),
], ids=["same-even", "stride", "reflect-unbatched"])
def test_tucker_module_matches_torch_conv(args, shape):
    torch.manual_seed(0)
    mod = lk3d.nn.TuckerConv3d(3, 4, ranks=(2, 2), **args, dtype=torch.float64)
    ref = nn.Conv3d(3, 4, **args, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(mod.factors.to_dense())
        if ref.bias is not None:
            ref.bias.copy_(mod.bias)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    got, want = mod(x), ref(x)
    assert rel_err(got, want) < 1e-10
    gx_got, = torch.autograd.grad(got.sum(), x)
    gx_want, = torch.autograd.grad(want.sum(), x)
    assert rel_err(gx_got, gx_want) < 1e-10
    assert [n for n, _ in mod.named_parameters()] == (
        ["U_in", "core", "U_out"] + (["bias"] if mod.bias is not None else []))
    assert "ranks=(2, 2)" in repr(mod)


def test_tucker_module_init_variance_matches_conv3d():
    torch.manual_seed(0)
    cin, cout, kernel, draws = 6, 5, (3, 5, 2), 1000
    w2 = sum(lk3d.nn.TuckerConv3d(cin, cout, kernel, (3, 4), dtype=torch.float64)
             .factors.to_dense().square().mean().item() for _ in range(draws)) / draws
    assert w2 == pytest.approx(1 / (3 * cin * 30), rel=0.1)


@pytest.mark.usefixtures("needs_tensorly")
def test_tucker_module_from_conv():
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 4, (3, 2, 3), padding=(1, 0, 1), dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(exact_tucker_weight(tuple(conv.weight.shape), (2, 2)))
    mod = lk3d.nn.TuckerConv3d.from_conv(conv, (2, 2))
    assert mod.decomposition_error < 1e-6 and mod.ranks == (2, 2)
    x = torch.randn(1, 3, 4, 4, 4, dtype=torch.float64)
    assert rel_err(mod(x), conv(x)) < 1e-6
    with pytest.raises(ValueError, match="groups=1"):
        lk3d.nn.TuckerConv3d.from_conv(nn.Conv3d(4, 4, 3, groups=4), 2)
    with pytest.raises(ValueError, match="ranks"):
        lk3d.nn.TuckerConv3d(3, 4, 3, ranks=(5, 2))
