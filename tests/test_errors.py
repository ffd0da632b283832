"""Bad input raises TypeError/ValueError naming the argument, never a Triton error or a crash."""
import pytest
import torch

import lk3d


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


BAD = [
    # (id, args, kwargs, exception, words the message must contain)
    ("input-not-tensor", ([1.0], _x(2, 2, 3, 3, 3)), {}, TypeError, ["input", "Tensor"]),
    ("input-3d", (_x(2, 5, 5), _x(2, 2, 3, 3, 3)), {}, ValueError, ["input", "3-D"]),
    ("input-6d", (_x(1, 1, 2, 5, 5, 5), _x(2, 2, 3, 3, 3)), {}, ValueError, ["input", "6-D"]),
    ("weight-4d", (_x(1, 2, 5, 5, 5), _x(2, 2, 3, 3)), {}, ValueError, ["weight", "4-D"]),
    ("int-input", (torch.ones(1, 2, 5, 5, 5, dtype=torch.int64), _x(2, 2, 3, 3, 3)), {},
     TypeError, ["input", "int64"]),
    ("int-weight", (_x(1, 2, 5, 5, 5), torch.ones(2, 2, 3, 3, 3, dtype=torch.int32)), {},
     TypeError, ["weight", "int32"]),
    ("mixed-dtype", (_x(1, 2, 5, 5, 5), _x(2, 2, 3, 3, 3, dtype=torch.float64)), {},
     TypeError, ["weight", "float64", "float32"]),
    ("bias-dtype", (_x(1, 2, 5, 5, 5), _x(2, 2, 3, 3, 3), _x(2, dtype=torch.float64)), {},
     TypeError, ["bias", "float64"]),
    ("bias-shape", (_x(1, 2, 5, 5, 5), _x(2, 2, 3, 3, 3), _x(3)), {}, ValueError,
     ["bias", "(2,)", "(3,)"]),
    ("channels", (_x(1, 3, 5, 5, 5), _x(2, 2, 3, 3, 3)), {}, ValueError, ["weight", "shape[1]"]),
    ("groups-in", (_x(1, 3, 5, 5, 5), _x(2, 1, 3, 3, 3)), {"groups": 2}, ValueError,
     ["groups", "3"]),
    ("groups-out", (_x(1, 4, 5, 5, 5), _x(3, 2, 3, 3, 3)), {"groups": 2}, ValueError,
     ["groups", "3"]),
    ("groups-zero", (_x(1, 2, 5, 5, 5), _x(2, 2, 3, 3, 3)), {"groups": 0}, ValueError,
     ["groups", "0"]),
    ("groups-float", (_x(1, 2, 5, 5, 5), _x(2, 2, 3, 3, 3)), {"groups": 1.0}, TypeError,
     ["groups", "1.0"]),
    ("kernel-too-big", (_x(1, 2, 5, 5, 5), _x(2, 2, 7, 3, 3)), {}, ValueError,
     ["weight", "larger than the padded input"]),
    ("dilated-too-big", (_x(1, 2, 5, 5, 5), _x(2, 2, 3, 3, 3)), {"dilation": (1, 3, 1)},
     ValueError, ["weight", "dilation"]),
    ("stride-zero", (_x(1, 2, 5, 5, 5), _x(2, 2, 3, 3, 3)), {"stride": 0}, ValueError,
     ["stride", "positive"]),
    ("stride-neg", (_x(1, 2, 5, 5, 5), _x(2, 2, 3, 3, 3)), {"stride": (1, -1, 1)}, ValueError,
     ["stride", "-1"]),
    ("stride-len", (_x(1, 2, 5, 5, 5), _x(2, 2, 3, 3, 3)), {"stride": (1, 1)}, TypeError,
     ["stride", "3 ints"]),
    ("dilation-zero", (_x(1, 2, 5, 5, 5), _x(2, 2, 3, 3, 3)), {"dilation": 0}, ValueError,
     ["dilation", "positive"]),
    ("padding-neg", (_x(1, 2, 5, 5, 5), _x(2, 2, 3, 3, 3)), {"padding": -1}, ValueError,
     ["padding", "non-negative"]),
    ("padding-word", (_x(1, 2, 5, 5, 5), _x(2, 2, 3, 3, 3)), {"padding": "full"}, ValueError,
     ["padding", "'full'"]),
    ("same-stride", (_x(1, 2, 5, 5, 5), _x(2, 2, 3, 3, 3)), {"padding": "same", "stride": 2},
     ValueError, ["padding", "same", "stride"]),
    ("padding-float", (_x(1, 2, 5, 5, 5), _x(2, 2, 3, 3, 3)), {"padding": 1.5}, TypeError,
     ["padding", "1.5"]),
]
if torch.cuda.is_available():
    BAD.append(("mixed-device", (_x(1, 2, 5, 5, 5), _x(2, 2, 3, 3, 3).cuda()), {}, ValueError,
                ["weight", "device"]))


@pytest.mark.parametrize("args,kwargs,exc,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(args, kwargs, exc, words):
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    with pytest.raises(exc) as info:
        lk3d.conv3d(*args, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    after = [a for a in args if isinstance(a, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(after, before)), "an argument was modified"


def test_mixed_device_on_meta():
    """Devices are checked before any kernel runs (meta stands in for a second device)."""
    with pytest.raises(ValueError, match="weight: expected a tensor on cpu"):
        lk3d.conv3d(_x(1, 2, 5, 5, 5), torch.empty(2, 2, 3, 3, 3, device="meta"))


def test_bad_env(monkeypatch):
    monkeypatch.setenv("LK3D_ALGO", "fastest")
    with pytest.raises(ValueError, match="LK3D_ALGO"):
        lk3d.conv3d(_x(1, 2, 5, 5, 5), _x(2, 2, 3, 3, 3))
    monkeypatch.setenv("LK3D_ALGO", "auto")
    monkeypatch.setenv("LK3D_CONFIG", "{BLOCK_M: 1")
    with pytest.raises(ValueError, match="LK3D_CONFIG"):
        lk3d.conv3d(_x(1, 2, 5, 5, 5), _x(2, 2, 3, 3, 3))



LAYOUTS = {  # a converter to a tensor that is not dense strided, and what its message calls it
    "sparse_coo": (lambda t: t.to_sparse(), "torch.sparse_coo"),
    "sparse_csr": (lambda t: t.to_sparse_csr(), "torch.sparse_csr"),
    "mkldnn": (lambda t: t.to_mkldnn(), "torch._mkldnn"),
    "nested": (lambda t: torch.nested.nested_tensor(list(t)), "nested"),
}
LAYOUT_CASES = [(arg, layout) for arg in ("input", "weight", "bias") for layout in LAYOUTS
                if not (arg == "bias" and layout in ("sparse_csr", "nested"))]  # need 2-D+


@pytest.mark.parametrize("arg,layout", LAYOUT_CASES, ids=[f"{a}-{l}" for a, l in LAYOUT_CASES])
def test_layout_named(arg, layout):
    """A sparse, mkldnn or nested tensor raises a TypeError naming the argument, the expected
    layout and the given one (aten would raise a NotImplementedError naming none of them)."""
    convert, given = LAYOUTS[layout]
    args = {"input": _x(1, 2, 5, 5, 5), "weight": _x(3, 2, 3, 3, 3), "bias": _x(3)}
    args[arg] = convert(args[arg])
    with pytest.raises(TypeError) as info:
        lk3d.conv3d(**args)
    for word in (f"{arg}:", "torch.strided", given):
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


def test_layout_named_by_cp_and_block_sparse():
    x, w = _x(1, 2, 5, 5, 5), _x(3, 2, 3, 3, 3)
    factors = lk3d.CPFactors(*(_x(n, 2) for n in (3, 2, 3, 3, 3)))
    ws = lk3d.BlockSparseWeight.from_dense(w, (1, 2, 1, 1, 1))
    calls = [
        (lambda: lk3d.cp_conv3d(x.to_sparse(), factors), "input"),
        (lambda: lk3d.cp_conv3d(x, factors, _x(3).to_sparse()), "bias"),
        (lambda: lk3d.CPFactors(*(_x(n, 2) for n in (3, 2, 3, 3)), _x(3, 2).to_sparse()), "C"),
        (lambda: lk3d.block_sparse_conv3d(x.to_sparse(), ws), "input"),
        (lambda: lk3d.block_sparse_conv3d(x, ws, _x(3).to_sparse()), "bias"),
        (lambda: ws.with_values(ws.values.to_sparse()), "values"),
        (lambda: lk3d.BlockSparseWeight.from_dense(w.to_sparse(), (1, 2, 1, 1, 1)), "weight"),
    ]
    for call, name in calls:
        with pytest.raises(TypeError, match=f"{name}: expected a tensor of layout torch.strided, "
                                            f"got layout torch.sparse_coo"):
            call()


def test_complex_and_meta():
    """Complex tensors are refused by name; meta tensors give a meta output of F.conv3d's shape,
    as F.conv3d does."""
    with pytest.raises(TypeError, match="input: expected a floating dtype .* got torch.complex64"):
        lk3d.conv3d(_x(1, 2, 5, 5, 5).to(torch.complex64), _x(3, 2, 3, 3, 3))
    with pytest.raises(TypeError, match="weight: expected a floating dtype .* torch.complex128"):
        lk3d.conv3d(_x(1, 2, 5, 5, 5), _x(3, 2, 3, 3, 3).to(torch.complex128))
    x, w = _x(1, 2, 5, 6, 7), _x(3, 2, 3, 2, 3)
    y = lk3d.conv3d(x.to("meta"), w.to("meta"), stride=(1, 2, 1), padding="valid")
    assert y.device.type == "meta"
    assert y.shape == torch.nn.functional.conv3d(x, w, stride=(1, 2, 1)).shape
