"""``lk3d.nn.CPConv3d`` and ``lk3d.nn.convert(to="cp")``: against ``torch.nn.Conv3d`` with the
reconstructed dense kernel, the initialisation's variance, one node under ``torch.compile``,
``from_conv`` and argument errors. As in test_cp.py, the torch path runs
(``lk3d.cp.USE_KERNELS`` off).
"""
import pytest
import torch
from torch import nn

import lk3d
from _cases import TOL, assert_close_rel, assert_one_node, raises_naming
from lk3d import cp as cp_ops


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    monkeypatch.setattr(cp_ops, "USE_KERNELS", False)


MODULE_CASES = [  # (module arguments, input shape)
    (dict(in_channels=3, out_channels=4, kernel_size=(3, 5, 3), rank=4, padding=(1, 2, 1),
          dilation=(1, 1, 2)), (2, 3, 7, 5, 6)),
    (dict(in_channels=2, out_channels=3, kernel_size=3, rank=2, stride=2, padding=1,
          bias=False), (1, 2, 7, 7, 5)),
    (dict(in_channels=3, out_channels=2, kernel_size=(3, 5, 4), rank=5, padding="same",
          padding_mode="reflect"), (2, 3, 5, 7, 6)),
    (dict(in_channels=2, out_channels=2, kernel_size=(5, 3, 3), rank=3, stride=2,
          padding=(2, 1, 1), padding_mode="replicate"), (1, 2, 7, 6, 5)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, rank=6, padding=(1, 1, 2),
          padding_mode="circular"), (3, 5, 7, 6)),  # unbatched
]


@pytest.mark.parametrize("args, shape", MODULE_CASES,
                         ids=[f"{a.get('padding_mode', 'zeros')}-{a['padding']}-r{a['rank']}"
                              for a, _ in MODULE_CASES])
def test_module_matches_torch_conv(args, shape):
    torch.manual_seed(0)
    mod = lk3d.nn.CPConv3d(**args, dtype=torch.float64)
    ref_args = {k: v for k, v in args.items() if k != "rank"}
    ref = nn.Conv3d(**ref_args, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(mod.factors.to_dense())
        if ref.bias is not None:
            ref.bias.copy_(mod.bias)
    x = torch.randn(shape, dtype=torch.float64)
    assert_close_rel("output", mod(x), ref(x), TOL[torch.float64])
    names = [n for n, _ in mod.named_parameters()]
    assert names == ["U_out", "U_in", "A", "B", "C"] + (["bias"] if mod.bias is not None else [])
    assert f"rank={args['rank']}" in repr(mod) and repr(mod).startswith("CPConv3d(")


@pytest.mark.parametrize("rank", [1, 8, 32])
def test_module_init_variance_matches_conv3d(rank):
    """Dense weight elements and outputs have nn.Conv3d's default variance, 1/(3·fan_in)."""
    torch.manual_seed(0)
    cin, cout, kernel = 6, 5, (3, 5, 2)
    fan_in = cin * 3 * 5 * 2
    x = torch.randn(4, cin, 6, 7, 5, dtype=torch.float64)
    w2 = y2 = y2_ref = 0.0
    draws = 1000  # products of five uniforms are heavy-tailed: ±4% spread at rank 1
    for _ in range(draws):
        mod = lk3d.nn.CPConv3d(cin, cout, kernel, rank, bias=False, dtype=torch.float64)
        ref = nn.Conv3d(cin, cout, kernel, bias=False, dtype=torch.float64)
        with torch.no_grad():
            w2 += mod.factors.to_dense().square().mean().item() / draws
            y2 += mod(x).square().mean().item() / draws
            y2_ref += ref(x).square().mean().item() / draws
    assert w2 == pytest.approx(1 / (3 * fan_in), rel=0.1)
    assert y2 == pytest.approx(y2_ref, rel=0.1)


def test_module_compiles_to_one_node():
    args, shape = MODULE_CASES[2]  # reflect padding: an F.pad, then lk3d::cp_conv3d
    mod = lk3d.nn.CPConv3d(**args, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    assert_one_node(mod, x, op="lk3d.cp_conv3d")
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    assert_close_rel("output", compiled(x), mod(x), TOL[torch.float64])


def test_module_argument_errors():
    with pytest.raises(ValueError, match="rank"):
        lk3d.nn.CPConv3d(2, 2, 3, rank=0)
    with pytest.raises(TypeError, match="rank"):
        lk3d.nn.CPConv3d(2, 2, 3, rank=2.0)
    with pytest.raises(ValueError, match="padding_mode"):
        lk3d.nn.CPConv3d(2, 2, 3, 2, padding_mode="mirror")
    with pytest.raises(ValueError, match="'same' expects stride 1"):
        lk3d.nn.CPConv3d(2, 2, 3, 2, stride=2, padding="same")
    with pytest.raises(TypeError, match="kernel_size"):
        lk3d.nn.CPConv3d(2, 2, (3, 3), 2)
    with pytest.raises(ValueError, match="groups=1"):
        lk3d.nn.CPConv3d.from_conv(nn.Conv3d(4, 4, 3, groups=2), 2)
    with pytest.raises(TypeError, match="conv"):
        lk3d.nn.CPConv3d.from_conv(nn.Conv2d(4, 4, 3), 2)


def _exact_rank_conv(cin, cout, kernel, rank, seed, **kwargs):
    """An nn.Conv3d whose weight has CP rank ``rank`` exactly."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv3d(cin, cout, kernel, **kwargs, dtype=torch.float64)
    mats = [torch.randn(n, rank, generator=g, dtype=torch.float64)
            for n in (cout, cin, *conv.kernel_size)]
    with torch.no_grad():
        conv.weight.copy_(lk3d.CPFactors(*mats).to_dense() / 10)
    return conv


@pytest.mark.usefixtures("needs_tensorly")
def test_from_conv():
    conv = _exact_rank_conv(3, 4, (5, 3, 4), 3, seed=1, padding=(2, 1, 1), stride=(1, 2, 1),
                            padding_mode="replicate")
    conv.eval()
    conv.bias.requires_grad_(False)
    mod = lk3d.nn.CPConv3d.from_conv(conv, 3)
    assert mod.decomposition_error < 1e-6
    assert (mod.stride, mod.padding, mod.padding_mode) == ((1, 2, 1), (2, 1, 1), "replicate")
    assert not mod.training and not mod.bias.requires_grad and mod.U_in.requires_grad
    assert mod.U_out.dtype == torch.float64
    # The component scales are spread evenly: every factor's columns have the same norm.
    norms = torch.stack([getattr(mod, n).norm(dim=0) for n in ("U_out", "U_in", "A", "B", "C")])
    torch.testing.assert_close(norms, norms[:1].expand_as(norms))
    x = torch.randn(2, 3, 6, 7, 5, dtype=torch.float64)
    assert_close_rel("output", mod(x), conv(x), 1e-6)


class Net(nn.Module):
    """A 3³ conv, a shared 5³ conv used twice, a depthwise 7³ conv, a lk3d.nn.Conv3d."""

    def __init__(self):
        super().__init__()
        self.stem = _exact_rank_conv(2, 2, 3, 2, seed=1, padding=1)
        shared = _exact_rank_conv(2, 2, 5, 2, seed=2, padding=2)
        self.body = nn.Sequential(shared, nn.ReLU(), shared)
        self.dw = nn.Conv3d(2, 2, 7, padding=3, groups=2, dtype=torch.float64)
        self.head = lk3d.nn.convert(_exact_rank_conv(2, 3, (1, 1, 5), 2, seed=3,
                                                     padding=(0, 0, 2)))

    def forward(self, x):
        return self.head(self.dw(self.body(self.stem(x))))


@pytest.mark.usefixtures("needs_tensorly")
def test_convert_to_cp():
    torch.manual_seed(0)
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = lk3d.nn.convert(net, to="cp", rank=2)
    assert out is not net
    assert type(out.stem) is nn.Conv3d  # 3 < min_kernel_size
    assert type(out.body[0]) is lk3d.nn.CPConv3d and out.body[0] is out.body[2]
    assert type(out.dw) is nn.Conv3d  # grouped: left alone
    assert type(out.head) is lk3d.nn.CPConv3d and out.head.rank == 2
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    x = torch.randn(1, 2, 6, 5, 7, dtype=torch.float64)
    assert_close_rel("output", out(x), net(x), 1e-6)

    inplace = lk3d.nn.convert(net, min_kernel_size=3, inplace=True, to="cp", rank=2)
    assert inplace is net and type(net.stem) is lk3d.nn.CPConv3d
    with pytest.warns(UserWarning, match="relative error"):  # a random 5³ weight at rank 3
        bare = lk3d.nn.convert(nn.Conv3d(2, 2, 5), to="cp", rank=3)
    assert type(bare) is lk3d.nn.CPConv3d
    assert type(lk3d.nn.convert(nn.Conv3d(4, 4, 5, groups=2), to="cp", rank=3)) is nn.Conv3d


@pytest.mark.parametrize("kwargs, error, names", [
    (dict(to="cp"), ValueError, ["rank", "to='cp'", "None"]),
    (dict(to="cp", rank=0), ValueError, ["rank", "0"]),
    (dict(to="cp", rank=2.5), TypeError, ["rank", "2.5"]),
    (dict(to="dense", rank=4), ValueError, ["rank", "to='dense'"]),
    (dict(to="tucker", rank=4), ValueError, ["to", "'cp'", "'tucker'"]),
], ids=["no-rank", "rank0", "rank-float", "dense-rank", "tucker"])
def test_convert_cp_bad_arguments(kwargs, error, names):
    net = Net()
    with raises_naming(error, names):
        lk3d.nn.convert(net, **kwargs)
