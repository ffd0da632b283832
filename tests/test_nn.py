"""``lk3d.nn.Conv3d`` against ``torch.nn.Conv3d`` (outputs and gradients in float64, every
``padding_mode``), state-dict round trips, ``lk3d.nn.convert`` on nested models, and a 3D
UX-Net-style block trained for a few steps under ``torch.compile(fullgraph=True)``.

Under the interpreter every call runs the real kernels slowly: shapes stay tiny, and the depthwise
7³ cases (343 taps per program) are the expensive ones.
"""
import math
import warnings

import pytest
import torch
from torch import nn

import lk3d
from _cases import Case, assert_close_rel


M = Case.module

CASES = [
    M((2, 3, 7, 5, 6), 5, (3, 5, 3), "zeros", padding=(1, 2, 1), dilation=(1, 1, 2)),
    M((2, 4, 7, 7, 5), 6, 3, "zeros", stride=2, padding=1, groups=2),
    M((2, 4, 7, 5, 6), 6, (3, 5, 3), "reflect", padding=(1, 2, 1), groups=2),
    # padding="same" with an even kernel side: asymmetric reflect padding.
    M((2, 4, 5, 7, 6), 4, (3, 5, 4), "reflect", padding="same", groups=4),
    M((2, 3, 7, 6, 5), 6, (5, 3, 3), "replicate", stride=2, padding=(2, 1, 1), groups=3),
    M((1, 3, 5, 7, 6), 4, (3, 5, 3), "replicate", padding=(0, 2, 1), bias=False),
    M((2, 3, 5, 7, 6), 4, (3, 5, 3), "circular", padding=(1, 2, 1)),
    M((4, 5, 7, 6), 4, (3, 3, 5), "circular", padding=(1, 1, 2), groups=4),  # unbatched
]


def make_pair(args, device, dtype, seed=0):
    """A torch ``nn.Conv3d`` and an ``lk3d.nn.Conv3d`` holding the same state."""
    torch.manual_seed(seed)
    ref = nn.Conv3d(**args, device=device, dtype=dtype)
    mod = lk3d.nn.Conv3d(**args, device=device, dtype=dtype)
    mod.load_state_dict(ref.state_dict())
    return ref, mod


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_conv3d_matches_torch(case, device):
    ref, mod = make_pair(case.module_args(), device, torch.float64)
    torch.manual_seed(1)
    x = torch.randn(case.shape, device=device, dtype=torch.float64, requires_grad=True)
    want = ref(x)
    got = mod(x)
    assert got.shape == want.shape
    assert_close_rel("output", got, want, 1e-10)

    grad = torch.randn_like(want)
    names = ["input", "weight"] + (["bias"] if case.bias else [])
    want_grads = torch.autograd.grad(want, [x, *ref.parameters()], grad)
    got_grads = torch.autograd.grad(got, [x, *mod.parameters()], grad)
    assert len(got_grads) == len(names)
    for name, g, w in zip(names, got_grads, want_grads):
        assert_close_rel(f"grad {name}", g, w, 1e-10)


def test_conv3d_is_torch_conv3d():
    args = dict(in_channels=4, out_channels=6, kernel_size=(3, 5, 3), stride=(1, 2, 1),
                padding="same", dilation=2, groups=2, bias=False, padding_mode="reflect")
    torch.manual_seed(0)
    ref = nn.Conv3d(**{**args, "stride": 1})
    torch.manual_seed(0)
    mod = lk3d.nn.Conv3d(**{**args, "stride": 1})
    assert isinstance(mod, nn.Conv3d)
    assert mod.bias is None
    # Same construction and initialisation, from the same seed.
    assert torch.equal(mod.weight, ref.weight)
    assert repr(mod) == "lk3d.nn." + repr(ref)
    assert "kernel_size=(3, 5, 3)" in repr(mod) and "padding_mode=reflect" in repr(mod)
    # torch's own argument checks apply.
    with pytest.raises(ValueError, match="padding_mode"):
        lk3d.nn.Conv3d(4, 4, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="strided"):
        lk3d.nn.Conv3d(**args)


def test_state_dict_round_trip():
    args = dict(in_channels=4, out_channels=6, kernel_size=(5, 3, 5), groups=2)
    torch.manual_seed(0)
    ref = nn.Conv3d(**args)
    mod = lk3d.nn.Conv3d(**args)
    assert not torch.equal(ref.weight, mod.weight)  # different draws, so loading shows

    assert list(mod.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    mod.load_state_dict(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(mod.state_dict()[key], value), key

    torch.manual_seed(1)
    back = nn.Conv3d(**args)
    back.load_state_dict(mod.state_dict())
    for key, value in mod.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------

class Net(nn.Module):
    """Nested: a 3³ conv (stays), a 5³ conv inside a Sequential and a depthwise 7³ conv."""

    def __init__(self, c=2):
        super().__init__()
        self.stem = nn.Conv3d(c, c, 3, padding=1)
        self.body = nn.Sequential(nn.Conv3d(c, c, 5, padding=2, bias=False), nn.ReLU())
        self.dw = nn.Conv3d(c, c, 7, padding=3, groups=c)

    def forward(self, x):
        return self.dw(self.body(self.stem(x)))


class MyConv3d(nn.Conv3d):
    """A user subclass with its own forward: convert leaves it alone."""

    def forward(self, x):
        return 2 * super().forward(x)


def make_net(device, seed=0):
    torch.manual_seed(seed)
    net = Net().to(device)
    net.body[0].weight.requires_grad_(False)
    net.dw.eval()
    return net


def test_convert_copy(device):
    net = make_net(device)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = lk3d.nn.convert(net)

    assert out is not net
    assert type(out.stem) is nn.Conv3d  # 3 < min_kernel_size=5
    assert type(out.body[0]) is lk3d.nn.Conv3d and type(out.dw) is lk3d.nn.Conv3d
    # The original is untouched and shares nothing with the copy.
    assert all(type(m) is nn.Conv3d for m in (net.stem, net.body[0], net.dw))
    for (name, p), q in zip(net.named_parameters(), out.parameters()):
        assert p is not q and p.data_ptr() != q.data_ptr(), name
    # Same weights, dtype, device, requires_grad and training mode.
    for (name, p), q in zip(net.named_parameters(), out.parameters()):
        assert torch.equal(p, q) and p.dtype == q.dtype and p.device == q.device, name
        assert p.requires_grad == q.requires_grad, name
    assert not out.body[0].weight.requires_grad
    assert [m.training for m in out.modules()] == [m.training for m in net.modules()]
    assert not out.dw.training and out.body[0].training

    torch.manual_seed(1)
    x = torch.randn(1, 2, 5, 6, 5, device=device)
    want = net(x)
    got = out(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        next(out.parameters()).add_(1.0)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_convert_inplace_and_options(device):
    net = make_net(device)
    params = list(net.parameters())
    stem, dw = net.stem, net.dw
    out = lk3d.nn.convert(net, min_kernel_size=3, inplace=True)
    assert out is net
    # Same module objects and the same Parameter objects: an optimizer on them still works.
    assert out.stem is stem and out.dw is dw
    assert type(stem) is lk3d.nn.Conv3d and type(dw) is lk3d.nn.Conv3d
    assert all(p is q for p, q in zip(out.parameters(), params))
    assert len(list(out.parameters())) == len(params)

    # A bare conv, a non-cubic kernel judged by its largest side, with a hook that carries over.
    bare = nn.Conv3d(2, 2, (1, 1, 7), padding=(0, 0, 3), device=device)
    seen = []
    bare.register_forward_hook(lambda module, args, out: seen.append(type(module)))
    converted = lk3d.nn.convert(bare)
    assert type(converted) is lk3d.nn.Conv3d and type(bare) is nn.Conv3d
    assert torch.equal(converted.weight, bare.weight)
    torch.manual_seed(1)
    x = torch.randn(1, 2, 2, 3, 9, device=device)
    torch.testing.assert_close(converted(x), bare(x), rtol=1e-4, atol=1e-5)
    assert seen == [lk3d.nn.Conv3d, nn.Conv3d]
    # Other sizes and user subclasses.
    assert type(lk3d.nn.convert(nn.Conv3d(2, 2, (1, 1, 7)), min_kernel_size=8)) is nn.Conv3d
    assert type(lk3d.nn.convert(MyConv3d(2, 2, 7))) is MyConv3d
    already = lk3d.nn.Conv3d(2, 2, 7)
    assert lk3d.nn.convert(already, inplace=True) is already

    # A module shared at two places stays one module.
    shared = nn.Conv3d(2, 2, 5)
    model = lk3d.nn.convert(nn.Sequential(shared, nn.ReLU(), shared))
    assert model[0] is model[2] and type(model[0]) is lk3d.nn.Conv3d


BAD_ARGUMENTS = [  # (keyword arguments, error, what the message names)
    (dict(model="net"), TypeError, ["model", "str"]),
    (dict(min_kernel_size=0), ValueError, ["min_kernel_size", "0"]),
    (dict(min_kernel_size=-3), ValueError, ["min_kernel_size", "-3"]),
    (dict(min_kernel_size=2.5), TypeError, ["min_kernel_size", "2.5"]),
    (dict(min_kernel_size=True), TypeError, ["min_kernel_size", "True"]),
    (dict(inplace="yes"), TypeError, ["inplace", "'yes'"]),
    (dict(to="cp"), ValueError, ["rank", "to='cp'", "None"]),
    (dict(to="dense", rank=4), ValueError, ["rank"]),
    (dict(to="block_sparse"), ValueError, ["to", "'dense'", "'block_sparse'"]),
    (dict(to=None), ValueError, ["to", "'dense'", "None"]),
]


@pytest.mark.parametrize("kwargs, error, names", BAD_ARGUMENTS,
                         ids=[",".join(f"{k}={v!r}" for k, v in kw.items())
                              for kw, _, _ in BAD_ARGUMENTS])
def test_convert_bad_arguments(kwargs, error, names):
    net = Net()
    kwargs = {"model": net, **kwargs}
    with pytest.raises(error) as info:
        lk3d.nn.convert(**kwargs)
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    assert all(type(m) is nn.Conv3d for m in (net.stem, net.body[0], net.dw))


# ---------------------------------------------------------------------------------------------
# a 3D UX-Net-style block, converted, compiled and trained
# ---------------------------------------------------------------------------------------------

class UXBlock(nn.Module):
    """Depthwise 7³ conv, LayerNorm over channels, pointwise MLP, residual (as in 3D UX-Net)."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv3d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 4, 1)
        y = self.mlp(self.norm(y)).permute(0, 4, 1, 2, 3)
        return x + y


# aot_eager traces the same graph (fullgraph: no break, fake impls, registered autograd) without
# inductor's cold compile of ~20 s on a CPU; the inductor run is the long variant.
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_uxnet_block_trains_like_torch_compiled(backend, device, no_tf32):
    torch.manual_seed(0)
    ref = UXBlock(4).to(device)
    model = UXBlock(4).to(device)
    model.load_state_dict(ref.state_dict())
    model = lk3d.nn.convert(model, inplace=True)
    assert type(model.dw) is lk3d.nn.Conv3d
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    initial = {k: v.clone() for k, v in ref.state_dict().items()}

    torch.manual_seed(1)
    x = torch.randn(2, 4, 6, 6, 6, device=device)
    target = torch.randn(2, 4, 6, 6, 6, device=device)
    runs = {}
    for name, net, params in (("torch", ref, ref.parameters()),
                              ("lk3d", compiled, model.parameters())):
        opt = torch.optim.SGD(params, lr=0.5)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs[name] = losses

    assert runs["torch"][-1] < runs["torch"][0]  # it trains, so the comparison means something
    torch.testing.assert_close(runs["lk3d"], runs["torch"], rtol=1e-4, atol=0)
    for key, value in ref.state_dict().items():
        assert not torch.equal(value, initial[key]), f"{key} did not move"
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, key=key: f"{key}: {m}")


# ---------------------------------------------------------------------------------------------
# CP: a decomposition far from its weight warns
# ---------------------------------------------------------------------------------------------

def _rank_r_conv(cin, cout, k, rank, seed):
    """An ``nn.Conv3d`` whose weight is exactly of CP rank ``rank`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv3d(cin, cout, k, padding=k // 2, dtype=torch.float64)
    factors = [torch.randn(n, rank, generator=g, dtype=torch.float64)
               for n in (cout, cin, *conv.kernel_size)]
    with torch.no_grad():
        conv.weight.copy_(lk3d.CPFactors(*factors).to_dense())
    return conv


def _user_warnings(fn):
    """``(fn()'s result, its UserWarnings' messages)``, every one recorded."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in record if issubclass(w.category, UserWarning)]


@pytest.mark.usefixtures("needs_tensorly")
def test_cp_from_conv_warns_when_far_from_the_weight(monkeypatch):
    torch.manual_seed(0)
    rough = nn.Conv3d(3, 5, 7, padding=3)  # random 7³: rank 1 is nowhere near it
    mod, found = _user_warnings(lambda: lk3d.nn.CPConv3d.from_conv(rough, 1))
    err = mod.decomposition_error
    assert err > lk3d.nn.CP_MAX_REL_ERROR == 0.3
    assert len(found) == 1, found
    assert found[0].startswith("CPConv3d.from_conv: the rank-1 CP form of the (5, 3, 7, 7, 7) "
                               f"weight is {err:.3g} off it") and "max_rel_error=0.3" in found[0]
    # configurable per call and by the module constant; math.inf: never
    assert _user_warnings(lambda: lk3d.nn.CPConv3d.from_conv(rough, 1, math.inf))[1] == []
    assert _user_warnings(lambda: lk3d.nn.CPConv3d.from_conv(
        rough, 1, max_rel_error=1.01 * err))[1] == []
    monkeypatch.setattr(lk3d.nn, "CP_MAX_REL_ERROR", 1.01 * err)
    assert _user_warnings(lambda: lk3d.nn.CPConv3d.from_conv(rough, 1))[1] == []
    monkeypatch.setattr(lk3d.nn, "CP_MAX_REL_ERROR", 0.99 * err)
    assert len(_user_warnings(lambda: lk3d.nn.CPConv3d.from_conv(rough, 1))[1]) == 1

    exact = _rank_r_conv(3, 5, 7, 2, seed=1)  # exactly rank 2: found, no warning
    mod, found = _user_warnings(lambda: lk3d.nn.CPConv3d.from_conv(exact, 2))
    assert found == [] and mod.decomposition_error < 1e-6

    for bad, error in ((-0.1, ValueError), (float("nan"), ValueError), ("0.3", TypeError),
                       (True, TypeError)):
        with pytest.raises(error, match="max_rel_error") as info:
            lk3d.nn.CPConv3d.from_conv(exact, 2, max_rel_error=bad)
        assert repr(bad) in str(info.value)


@pytest.mark.usefixtures("needs_tensorly")
def test_convert_to_cp_warns_naming_the_layer():
    torch.manual_seed(0)
    net = nn.Sequential(_rank_r_conv(2, 3, 5, 2, seed=2),
                        nn.Sequential(nn.ReLU(), nn.Conv3d(3, 3, 7, padding=3)))
    out, found = _user_warnings(lambda: lk3d.nn.convert(net, to="cp", rank=2))
    assert type(out[0]) is type(out[1][1]) is lk3d.nn.CPConv3d
    assert out[0].decomposition_error < 1e-6 and out[1][1].decomposition_error > 0.3
    assert len(found) == 1, found  # the random 7³ layer only, by its name
    assert found[0].startswith("lk3d.nn.convert(to='cp'): 1.1: the rank-2 CP form of the "
                               "(3, 3, 7, 7, 7) weight is ")
    assert _user_warnings(lambda: lk3d.nn.convert(net, to="cp", rank=2,
                                                  max_rel_error=math.inf))[1] == []
    with pytest.raises(ValueError, match="max_rel_error.*to='dense'"):
        lk3d.nn.convert(net, max_rel_error=0.5)
    with pytest.raises(ValueError, match="max_rel_error"):
        lk3d.nn.convert(net, to="cp", rank=2, max_rel_error=-1)
