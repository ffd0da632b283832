"""``lk3d.nn.BlockSparseConv3d`` against ``torch.nn.Conv3d`` with the dense weight (every
``padding_mode``, groups and depthwise), its initialisation, ``state_dict`` round trips (also
into a module of another pattern), dynamic sparsity (``prune``, ``set_mask``) in a training
loop, ``torch.compile(fullgraph=True)``, ``from_conv`` and ``lk3d.nn.convert(to="block_sparse")``.

As in test_block_sparse.py, the torch path runs (``lk3d.block_sparse.USE_KERNELS`` off).
"""
import math

import pytest
import torch
from torch import nn

import lk3d
from _cases import TOL, assert_close_rel, assert_one_node, raises_naming
from lk3d import block_sparse


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    monkeypatch.setattr(block_sparse, "USE_KERNELS", False)


def _dense_twin(mod):
    """An ``nn.Conv3d`` with ``mod``'s configuration and its dense weight and bias."""
    ref = nn.Conv3d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                    mod.dilation, mod.groups, mod.bias is not None, mod.padding_mode,
                    dtype=mod.values.dtype)
    with torch.no_grad():
        ref.weight.copy_(mod.weight_sparse.to_dense())
        if ref.bias is not None:
            ref.bias.copy_(mod.bias)
    return ref


MODULE_CASES = [  # (module arguments, input shape)
    (dict(in_channels=4, out_channels=6, kernel_size=(3, 5, 3), block_shape=(3, 2, 1, 1, 1),
          density=0.5, padding=(1, 2, 1), dilation=(1, 1, 2)), (2, 4, 7, 5, 6)),
    (dict(in_channels=4, out_channels=6, kernel_size=3, block_shape=(3, 2, 3, 1, 1),
          density=0.4, stride=2, padding=1, groups=2, bias=False), (1, 4, 7, 7, 5)),
    (dict(in_channels=4, out_channels=4, kernel_size=(3, 5, 4), block_shape=(4, 1, 3, 1, 2),
          density=0.5, padding="same", groups=4, padding_mode="reflect"), (2, 4, 5, 7, 6)),
    (dict(in_channels=3, out_channels=6, kernel_size=(5, 3, 3), block_shape=(2, 1, 1, 3, 3),
          density=0.6, stride=2, padding=(2, 1, 1), groups=3, padding_mode="replicate"),
     (1, 3, 7, 6, 5)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, block_shape=(2, 3, 1, 1, 1),
          density=0.3, padding=(1, 1, 2), padding_mode="circular"), (3, 5, 7, 6)),  # unbatched
]


@pytest.mark.parametrize("args, shape", MODULE_CASES,
                         ids=[f"{a.get('padding_mode', 'zeros')}-{a['padding']}"
                              f"-g{a.get('groups', 1)}-dens{a['density']}"
                              for a, _ in MODULE_CASES])
def test_module_matches_torch_conv(args, shape):
    torch.manual_seed(0)
    mod = lk3d.nn.BlockSparseConv3d(**args, dtype=torch.float64)
    grid = [n // b for n, b in zip(mod.weight_shape, mod.block_shape)]
    assert mod.nnz == round(args["density"] * math.prod(grid))
    ref = _dense_twin(mod)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y, y_ref = mod(x), ref(x)
    assert_close_rel("output", y, y_ref, TOL[torch.float64])
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)
    (gx_ref,) = torch.autograd.grad(y_ref, x, gy)
    assert_close_rel("grad input", gx, gx_ref, 1e-10)
    names = [n for n, _ in mod.named_parameters()]
    assert names == ["values"] + (["bias"] if mod.bias is not None else [])
    assert [n for n, _ in mod.named_buffers()] == ["row_ptr", "col"]
    assert repr(mod).startswith("BlockSparseConv3d(")
    assert f"block_shape={mod.block_shape}" in repr(mod)


def test_module_init_matches_conv3d_distribution():
    """Stored values are drawn as nn.Conv3d's weights: variance 1/(3·fan_in)."""
    torch.manual_seed(0)
    mod = lk3d.nn.BlockSparseConv3d(16, 16, 5, (4, 4, 1, 1, 1), density=0.5, groups=2,
                                    dtype=torch.float64)
    fan_in = 8 * 125
    assert mod.values.var().item() == pytest.approx(1 / (3 * fan_in), rel=0.05)
    assert mod.values.abs().max() <= 1 / math.sqrt(fan_in)
    assert mod.bias.abs().max() <= 1 / math.sqrt(fan_in)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    args, shape = MODULE_CASES[0]
    a = lk3d.nn.BlockSparseConv3d(**args, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    state = a.state_dict()
    assert set(state) == {"values", "row_ptr", "col", "bias"}
    # Same pattern size, another pattern and values: all of it is taken.
    b = lk3d.nn.BlockSparseConv3d(**args, dtype=torch.float64)
    values = b.values
    b.load_state_dict(state)
    assert b.values is values
    assert all(torch.equal(b.state_dict()[k], v) for k, v in state.items())
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    # Another nnz: the module takes the stored pattern.
    c = lk3d.nn.BlockSparseConv3d(**{**args, "density": 0.1}, dtype=torch.float64)
    assert c.nnz != a.nnz
    c.load_state_dict(state)
    assert c.nnz == a.nnz
    torch.testing.assert_close(c(x), a(x), rtol=0, atol=0)
    # ... and back, after pruning a.
    a.prune(density=0.2)
    c.load_state_dict(a.state_dict())
    assert c.nnz == a.nnz and torch.equal(c.weight_sparse.to_dense(), a.weight_sparse.to_dense())


def test_state_dict_errors():
    args = MODULE_CASES[0][0]
    mod = lk3d.nn.BlockSparseConv3d(**args)
    state = mod.state_dict()
    bad = {**state, "col": state["col"].flip(0)}  # not ascending within the rows
    with pytest.raises(RuntimeError, match="ascending"):
        mod.load_state_dict(bad)
    other = lk3d.nn.BlockSparseConv3d(**{**args, "block_shape": (6, 2, 1, 1, 1)})
    with pytest.raises(RuntimeError, match="block_shape"):
        mod.load_state_dict(other.state_dict())
    with pytest.raises(RuntimeError, match="values"):
        mod.load_state_dict({k: v for k, v in state.items() if k != "values"})


def test_dynamic_sparsity_in_training():
    """SLaK-style prune-and-regrow between steps at a constant block count: the ``values``
    Parameter (and an optimizer with momentum on it) stays, the pattern follows, and every
    step's output and gradients are those of the masked dense conv."""
    torch.manual_seed(0)
    mod = lk3d.nn.BlockSparseConv3d(4, 4, 5, (2, 2, 1, 1, 1), density=0.5, padding=2,
                                    dtype=torch.float64)
    values = mod.values
    opt = torch.optim.SGD(mod.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 4, 6, 6, 6, dtype=torch.float64)
    for step in range(3):
        ref = _dense_twin(mod)
        y = mod(x)
        assert_close_rel(f"step {step} output", y, ref(x), TOL[torch.float64])
        y.square().mean().backward()
        ref(x).square().mean().backward()
        mask = mod.weight_sparse.block_mask().repeat_interleave(2, 0).repeat_interleave(2, 1)
        dense_grad = torch.zeros(mod.weight_shape, dtype=torch.float64)
        block_grad = lk3d.BlockSparseWeight(mod.weight_shape, mod.block_shape, values.grad,
                                            mod.row_ptr, mod.col).to_dense()
        dense_grad[mask] = ref.weight.grad[mask]
        assert_close_rel(f"step {step} grad values", block_grad, dense_grad, 1e-10)
        opt.step()
        # Drop the weakest fifth of the stored blocks, regrow as many elsewhere at random.
        kept = mod.weight_sparse.prune(density=0.4).block_mask()  # 200 of 500 blocks
        free = (~mod.weight_sparse.block_mask()).flatten().nonzero().flatten()
        grown = torch.zeros(500, dtype=torch.bool)
        grown[free[torch.randperm(free.numel())[:50]]] = True
        new_mask = kept | grown.view(kept.shape)
        dense_kept = mod.weight_sparse.with_mask(kept).to_dense()
        mod.set_mask(new_mask)
        assert mod.values is values and mod.nnz == 250 and values.grad is None
        assert torch.equal(mod.weight_sparse.block_mask(), new_mask)
        assert torch.equal(mod.weight_sparse.to_dense(), dense_kept)  # new blocks start at zero


def test_pattern_changes_of_nnz():
    """``prune`` and ``set_mask`` to another count: a new ``values`` Parameter, and calls made
    before (whose graphs are still alive) and after both differentiate."""
    torch.manual_seed(0)
    mod = lk3d.nn.BlockSparseConv3d(4, 4, 3, (2, 2, 1, 1, 1), density=0.5, padding=1,
                                    dtype=torch.float64)
    x = torch.randn(1, 4, 5, 5, 5, dtype=torch.float64)
    old = mod(x)
    mod.prune(density=0.25)
    assert mod.nnz == 27 and mod.values.requires_grad
    new = mod(x)
    assert_close_rel("output", new, _dense_twin(mod)(x), TOL[torch.float64])
    (old.sum() + new.sum()).backward()
    assert mod.values.grad.shape == (27, 2, 2, 1, 1, 1)
    mod.set_mask(torch.ones(2, 2, 3, 3, 3, dtype=torch.bool))
    assert mod.nnz == 108 and mod.density == 1
    mod.values.requires_grad_(False)
    mod.prune(threshold=0.0)
    assert not mod.values.requires_grad and mod.nnz == 27


def test_module_compiles_to_one_node():
    args, shape = MODULE_CASES[2]  # reflect padding: an F.pad, then lk3d::block_sparse_conv3d
    mod = lk3d.nn.BlockSparseConv3d(**args, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    assert_one_node(mod, x, op="lk3d.block_sparse_conv3d")
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    xg = x.clone().requires_grad_()
    y = compiled(xg)
    assert_close_rel("output", y, mod(x), TOL[torch.float64])
    y.sum().backward()
    assert mod.values.grad.shape == mod.values.shape and xg.grad.shape == x.shape


MODULE_ERRORS = [  # (arguments, error, what the message names)
    (dict(block_shape=(4, 2, 1, 1, 1)), ValueError, ["block_shape", "out_channels 6"]),
    (dict(block_shape=(3, 2, 1, 1)), TypeError, ["block_shape", "5 ints"]),
    (dict(density=0), ValueError, ["density", "(0, 1]"]),
    (dict(density=None), TypeError, ["density", "None"]),
    (dict(groups=3), ValueError, ["groups", "in_channels = 4"]),
    (dict(groups=2, block_shape=(6, 2, 1, 1, 1)), ValueError, ["block_shape", "group of 3"]),
    (dict(padding_mode="mirror"), ValueError, ["padding_mode", "'mirror'"]),
    (dict(stride=2, padding="same"), ValueError, ["padding", "'same'", "stride"]),
]


@pytest.mark.parametrize("changes, error, names", MODULE_ERRORS,
                         ids=["bo", "block-len", "density0", "density-none", "groups",
                              "row-spans-groups", "padding_mode", "same-stride"])
def test_module_argument_errors(changes, error, names):
    args = dict(in_channels=4, out_channels=6, kernel_size=3, block_shape=(3, 2, 1, 1, 1))
    with raises_naming(error, names):
        lk3d.nn.BlockSparseConv3d(**{**args, **changes})


@pytest.mark.parametrize("groups, block", [(1, (2, 3, 1, 1, 1)), (3, (2, 1, 5, 1, 1)),
                                           (3, (6, 1, 1, 3, 3))],
                         ids=["dense", "depthwise", "depthwise-rows-span-groups"])
def test_from_conv(groups, block):
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 6, (5, 3, 3), stride=(1, 2, 1), padding=(2, 1, 1), groups=groups,
                     padding_mode="replicate", dtype=torch.float64)
    conv.eval()
    conv.bias.requires_grad_(False)
    x = torch.randn(2, 3, 6, 7, 5, dtype=torch.float64)
    mod = lk3d.nn.BlockSparseConv3d.from_conv(conv, block)  # nothing pruned: the same conv
    assert mod.density == 1 and mod.groups == groups and mod.padding_mode == "replicate"
    assert not mod.training and not mod.bias.requires_grad and mod.values.requires_grad
    assert_close_rel("output", mod(x), conv(x), TOL[torch.float64])
    assert torch.equal(mod.weight_sparse.to_dense(), conv.weight)
    half = lk3d.nn.BlockSparseConv3d.from_conv(conv, block, density=0.5)
    want = lk3d.BlockSparseWeight.from_dense(conv.weight.detach(), block, density=0.5)
    assert torch.equal(half.weight_sparse.to_dense(), want.to_dense())
    assert_close_rel("output", half(x), _dense_twin(half)(x), TOL[torch.float64])
    assert lk3d.nn.BlockSparseConv3d.from_conv(conv, block, threshold=math.inf).nnz == 0
    with pytest.raises(TypeError, match="conv"):
        lk3d.nn.BlockSparseConv3d.from_conv(nn.Conv2d(3, 6, 3), block)


class Net(nn.Module):
    """A 3³ conv, a shared 5³ conv used twice, a depthwise 7³ conv, a 1-channel 5³ conv (the
    channel block does not divide it) and a lk3d.nn.Conv3d."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(4, 4, 3, padding=1, dtype=torch.float64)
        shared = nn.Conv3d(4, 4, 5, padding=2, dtype=torch.float64)
        self.body = nn.Sequential(shared, nn.ReLU(), shared)
        self.dw = nn.Conv3d(4, 4, 7, padding=3, groups=4, dtype=torch.float64)
        self.odd = nn.Conv3d(4, 1, 5, padding=2, dtype=torch.float64)
        self.head = lk3d.nn.convert(nn.Conv3d(1, 2, (1, 1, 5), padding=(0, 0, 2),
                                              dtype=torch.float64))

    def forward(self, x):
        return self.head(self.odd(self.dw(self.body(self.stem(x)))))


def test_convert_to_block_sparse():
    torch.manual_seed(0)
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = lk3d.nn.convert(net, to="block_sparse", block_shape=(1, 1, 1, 1, 1))
    assert out is not net
    assert type(out.stem) is nn.Conv3d  # 3 < min_kernel_size
    assert type(out.body[0]) is lk3d.nn.BlockSparseConv3d and out.body[0] is out.body[2]
    assert type(out.dw) is lk3d.nn.BlockSparseConv3d and out.dw.groups == 4
    assert type(out.head) is lk3d.nn.BlockSparseConv3d
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    x = torch.randn(1, 4, 6, 5, 7, dtype=torch.float64)
    assert_close_rel("output", out(x), net(x), TOL[torch.float64])

    sparse = lk3d.nn.convert(net, to="block_sparse", block_shape=(2, 2, 1, 1, 1), density=0.5)
    assert type(sparse.body[0]) is lk3d.nn.BlockSparseConv3d
    assert sparse.body[0].density == 0.5
    assert type(sparse.dw) is nn.Conv3d and type(sparse.odd) is nn.Conv3d  # bi=2, bo=2 unfit
    body = sparse.body[0]
    want = lk3d.BlockSparseWeight.from_dense(net.body[0].weight.detach(), (2, 2, 1, 1, 1),
                                             density=0.5)
    assert torch.equal(body.weight_sparse.to_dense(), want.to_dense())
    h = torch.randn(1, 4, 6, 5, 7, dtype=torch.float64)
    assert_close_rel("pruned output", body(h), _dense_twin(body)(h), TOL[torch.float64])

    inplace = lk3d.nn.convert(net, min_kernel_size=3, inplace=True, to="block_sparse",
                              block_shape=(1, 1, 1, 1, 1), threshold=0.0)
    assert inplace is net and type(net.stem) is lk3d.nn.BlockSparseConv3d
    bare = lk3d.nn.convert(nn.Conv3d(2, 2, 5), to="block_sparse", block_shape=(2, 2, 5, 1, 1))
    assert type(bare) is lk3d.nn.BlockSparseConv3d and bare.nnz == 25  # 5 x 5 bricks


@pytest.mark.parametrize("kwargs, error, names", [
    (dict(to="block_sparse"), ValueError, ["block_shape", "to='block_sparse'", "None"]),
    (dict(to="block_sparse", block_shape=(2, 2, 1)), TypeError, ["block_shape", "(2, 2, 1)"]),
    (dict(to="block_sparse", block_shape=(1,) * 5, density=0), ValueError, ["density", "0"]),
    (dict(to="block_sparse", block_shape=(1,) * 5, threshold=-1), ValueError,
     ["threshold", "-1"]),
    (dict(to="block_sparse", block_shape=(1,) * 5, threshold=1, density=0.5), ValueError,
     ["threshold", "density"]),
    (dict(to="block_sparse", block_shape=(1,) * 5, rank=2), ValueError, ["rank", "to='cp'"]),
    (dict(to="dense", block_shape=(1,) * 5), ValueError, ["block_shape", "to='dense'"]),
    (dict(to="cp", rank=2, density=0.5), ValueError, ["density", "to='cp'"]),
], ids=["no-block", "block-len", "density0", "threshold-neg", "both", "rank", "dense-block",
        "cp-density"])
def test_convert_block_sparse_bad_arguments(kwargs, error, names):
    net = Net()
    with raises_naming(error, names):
        lk3d.nn.convert(net, **kwargs)
