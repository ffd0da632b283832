"""torch.library registration: opcheck of every op, and torch.compile(fullgraph=True) parity."""
import pytest
import torch

import lk3d
from _cases import CASES, TOL, assert_one_node, rel_err

PAD = [1, 0, 1, 1, 2, 1]  # (d_l, h_l, w_l, d_r, h_r, w_r): asymmetric on purpose


def _tensors(device, groups, cin=4, cout=4, kernel=(3, 2, 3)):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, cin, 5, 4, 6, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(cout, cin // groups, *kernel, generator=g, dtype=torch.float64).to(device)
    b = torch.randn(cout, generator=g, dtype=torch.float64).to(device)
    return x, w, b


@pytest.mark.parametrize("groups", [1, 2, 4], ids=["dense", "grouped", "depthwise"])
def test_opcheck(groups, device):
    x, w, b = _tensors(device, groups)
    args = ([1, 2, 1], PAD, [1, 1, 2], groups)
    torch.library.opcheck(torch.ops.lk3d.conv3d.default, (x, w, b, *args))
    torch.library.opcheck(torch.ops.lk3d.conv3d.default,
                          (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), *args))
    y = torch.ops.lk3d.conv3d(x.detach(), w.detach(), b.detach(), *args)
    gy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.lk3d.conv3d_grad_input.default,
                          (gy, w.detach(), list(x.shape), *args))
    torch.library.opcheck(torch.ops.lk3d.conv3d_grad_weight.default,
                          (gy, x.detach(), list(w.shape), *args))
    torch.library.opcheck(torch.ops.lk3d.conv3d_grad_bias.default, (gy,))


class Block(torch.nn.Module):
    """A depthwise large-kernel conv, a pointwise conv and a dense conv, through lk3d."""

    def __init__(self, c=4):
        super().__init__()
        self.dw = torch.nn.Parameter(torch.randn(c, 1, 5, 3, 5, dtype=torch.float64) * 0.2)
        self.pw = torch.nn.Parameter(torch.randn(2 * c, c, 1, 1, 1, dtype=torch.float64) * 0.5)
        self.dense = torch.nn.Parameter(torch.randn(c, 2 * c, 3, 3, 3, dtype=torch.float64) * 0.2)
        self.bias = torch.nn.Parameter(torch.randn(c, dtype=torch.float64))

    def forward(self, x):
        h = lk3d.conv3d(x, self.dw, self.bias, padding="same", groups=x.shape[1])
        h = torch.nn.functional.gelu(lk3d.conv3d(h, self.pw))
        return x + lk3d.conv3d(h, self.dense, None, stride=1, padding=1)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend, device):
    torch._dynamo.reset()
    model = Block().to(device)
    x = torch.randn(2, 4, 5, 6, 7, dtype=torch.float64, device=device, requires_grad=True)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    y_eager, y_comp = model(x), compiled(x)
    assert rel_err(y_comp, y_eager) < TOL[torch.float64]
    gy = torch.randn_like(y_eager)
    g_eager = torch.autograd.grad(y_eager, [x, *model.parameters()], gy)
    g_comp = torch.autograd.grad(y_comp, [x, *model.parameters()], gy)
    for a, b in zip(g_comp, g_eager):
        assert rel_err(a, b) < TOL[torch.float64]


def test_compile_sees_one_node_per_conv(device):
    """The traced graph holds lk3d's ops as single nodes and no graph break."""
    case = CASES[2]
    x, w, b = case.tensors(device=device)
    assert_one_node(lambda x: lk3d.conv3d(x, w, b, **case.args()), x, op="lk3d.conv3d")
