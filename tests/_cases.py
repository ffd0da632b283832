"""Shared test cases, tolerances and reference for the convolution tests: one ``Case`` type for
every form (dense, CP, block-sparse, module) and one tolerance table."""
import contextlib
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import lk3d

# Relative error ||y - ref|| / ||ref|| against a float64 reference, per dtype of the computation.
TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 3e-3,
    torch.bfloat16: 2e-2,
}


@dataclass(frozen=True)
class Case:
    """One convolution to test: input ``[N, cin, *size]`` (``N`` None: unbatched) in ``layout``
    (see ``with_layout``), ``cout`` output channels, ``kernel``, and the geometry as
    ``F.conv3d`` takes it. The weight's form: dense (the default), rank-``rank`` CP (``rank`` >
    0; ``weights``: per-component weights or none), block-sparse (``block`` given: blocks of that
    shape, ``density`` of them stored, 0: none), or a module's (``padding_mode`` given, e.g.
    "zeros"). ``Case.cp``, ``Case.block_sparse`` and ``Case.module`` build the three."""
    N: object
    cin: int
    cout: int
    size: tuple
    kernel: tuple
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1
    bias: bool = True
    layout: str = "contiguous"
    rank: int = 0
    weights: bool = True
    block: tuple = ()
    density: float = 0.5
    padding_mode: object = None

    @classmethod
    def cp(cls, N, cin, cout, size, kernel, rank, **kwargs):
        return cls(N, cin, cout, size, kernel, rank=rank, **kwargs)

    @classmethod
    def block_sparse(cls, N, cin, cout, size, kernel, block, density=0.5, **kwargs):
        return cls(N, cin, cout, size, kernel, block=block, density=density, **kwargs)

    @classmethod
    def module(cls, shape, cout, kernel, padding_mode, **kwargs):
        """An ``nn.Conv3d``-style module on an input of ``shape`` (4 dims: unbatched)."""
        *n, cin = shape[:-3]
        return cls(n[0] if n else None, cin, cout, tuple(shape[-3:]), kernel,
                   padding_mode=padding_mode, **kwargs)

    @property
    def id(self):
        def j(v):
            return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)
        batch = "unbatched" if self.N is None else f"N{self.N}"
        form = (f"-r{self.rank}" if self.rank else
                f"-b{j(self.block)}-dens{self.density}" if self.block else "")
        return (f"{batch}-C{self.cin}to{self.cout}-D{j(self.size)}-k{j(self.kernel)}{form}"
                f"-s{j(self.stride)}-p{j(self.padding)}-d{j(self.dilation)}"
                f"{'' if self.rank else f'-g{self.groups}'}{'' if self.bias else '-nobias'}"
                f"{'-noweights' if self.rank and not self.weights else ''}"
                f"{'' if self.layout == 'contiguous' else '-' + self.layout}"
                f"{'' if self.padding_mode is None else '-' + self.padding_mode}")

    @property
    def shape(self):
        """The input's shape."""
        return (*(() if self.N is None else (self.N,)), self.cin, *self.size)

    def tensors(self, dtype=torch.float64, device="cpu", seed=0):
        """``(x, weight, bias)`` drawn on the CPU in float64 from ``seed``, then moved to
        ``device`` and ``dtype``; ``weight`` a dense tensor, an ``lk3d.CPFactors`` or an
        ``lk3d.BlockSparseWeight`` by the case's form, ``bias`` None without one."""
        g = torch.Generator().manual_seed(seed)
        f64 = dict(generator=g, dtype=torch.float64)
        x = torch.randn(self.shape, **f64)
        if self.rank:
            mats = [torch.randn(n, self.rank, **f64) for n in (self.cout, self.cin, *self.kernel)]
            scales = torch.rand(self.rank, **f64) + 0.5 if self.weights else None
            weight = lk3d.CPFactors(*mats, scales)
        else:
            weight = torch.randn(self.cout, self.cin // self.groups, *self.kernel, **f64)
            if self.block and self.density == 0:
                weight = lk3d.BlockSparseWeight.from_dense(weight, self.block, threshold=math.inf)
            elif self.block:
                weight = lk3d.BlockSparseWeight.from_dense(weight, self.block,
                                                           density=self.density)
        b = torch.randn(self.cout, **f64) if self.bias else None
        to = dict(dtype=dtype, device=device)
        x = with_layout(x.to(**to), None, self.layout)[0]
        return x, weight.to(**to), None if b is None else b.to(**to)

    def args(self):
        """The geometry as ``F.conv3d`` takes it (a CP convolution takes no groups)."""
        args = dict(stride=self.stride, padding=self.padding, dilation=self.dilation)
        return args if self.rank else {**args, "groups": self.groups}

    def module_args(self):
        """The arguments of an ``nn.Conv3d`` of this case."""
        return dict(in_channels=self.cin, out_channels=self.cout, kernel_size=self.kernel,
                    stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups, bias=self.bias, padding_mode=self.padding_mode)


def draw_geometry(draw, max_kernel, slack):
    """A hypothesis draw of a convolution's geometry, as a dict with ``kernel``, ``stride``,
    ``padding`` (an int, a 3-tuple, "same" (then stride 1) or "valid"), ``dilation`` and an input
    ``size`` that the dilated kernel fits, with up to ``slack`` voxels to spare per axis; stride
    and dilation are sometimes a single int where all three sides agree."""
    kernel = tuple(draw(st.integers(1, max_kernel)) for _ in range(3))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(3))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(3))
    kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if kind == "same":
        stride, padding = (1, 1, 1), "same"
    elif kind == "valid":
        padding = "valid"
    elif kind == "int":
        padding = draw(st.integers(0, 2))
    else:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(3))
    pads = (padding,) * 3 if isinstance(padding, int) else padding
    extent = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    if isinstance(padding, str):
        size = tuple(draw(st.integers(e, e + slack)) for e in extent)
    else:
        size = tuple(draw(st.integers(max(1, e - 2 * p), e + slack))
                     for e, p in zip(extent, pads))
    squeeze = lambda v: v[0] if len(set(v)) == 1 and draw(st.booleans()) else v  # noqa: E731
    return dict(kernel=kernel, stride=squeeze(stride), padding=padding,
                dilation=squeeze(dilation), size=size)


def conv3d_ref(x, w, b, **args):
    """Float64 reference on the CPU."""
    up = (lambda t: None if t is None else t.detach().to("cpu", torch.float64))
    return F.conv3d(up(x), up(w), up(b), **args)


def with_layout(x, w, layout):
    """``x`` (and for "strided" also ``w``) in one of the layouts the kernels read by strides:
    "contiguous", "channels_last_3d", "strided" (every other element of a larger tensor along W)
    or "permuted" (channels and depth swapped in memory)."""
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "strided":
        x = torch.repeat_interleave(x, 2, dim=-1)[..., ::2]
        w = None if w is None else w.transpose(3, 4).contiguous().transpose(3, 4)
    elif layout == "permuted":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout != "contiguous":
        raise ValueError(f"layout: unknown {layout!r}")
    return x, w


def strided_copy(t):
    """A non-contiguous view with ``t``'s values (every other element of a buffer whose gaps hold
    NaN, or 0 for integer tensors): a kernel that ignores the strides reads the gaps."""
    gap = torch.full_like(t, float("nan") if t.is_floating_point() else 0)
    return torch.stack([t, gap], dim=-1)[..., 0]


def assert_layout_kept(case, layout, device):
    """lk3d.conv3d of ``case`` (float32) on a ``layout`` ("channels_last_3d" input, or "strided"
    input, weight and bias) against the float64 reference: the output's strides are
    F.conv3d's, and nothing the caller passed changes."""
    x, w, b = case.tensors(dtype=torch.float32, device=device)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    else:
        x, w, b = strided_copy(x), strided_copy(w), strided_copy(b)
    before = [t.clone() for t in (x, w, b)]
    y = lk3d.conv3d(x, w, b, **case.args())
    assert rel_err(y, conv3d_ref(x, w, b, **case.args())) < TOL[torch.float32]
    want = F.conv3d(x.cpu(), w.cpu(), b.cpu(), **case.args())
    assert y.stride() == want.stride()
    for t, t0 in zip((x, w, b), before):
        assert torch.equal(t, t0)


def leaf_like(t):
    """A fresh leaf requiring grad with ``t``'s values and its strides too (``clone`` makes a
    gapped view contiguous; here the gaps of the new buffer hold NaN or 0 as in
    ``strided_copy``)."""
    reach = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
    fill = float("nan") if t.is_floating_point() else 0
    buffer = torch.full((reach,), fill, dtype=t.dtype, device=t.device)
    leaf = buffer.as_strided(t.shape, t.stride()).copy_(t.detach()).detach()
    return leaf.requires_grad_() if t.is_floating_point() else leaf


def assert_close_rel(name, got, want, tol):
    err = rel_err(got, want)
    assert err < tol, f"{name}: relative error {err:.3g} >= {tol:g}"


@contextlib.contextmanager
def raises_naming(error, names):
    """``pytest.raises(error)`` whose message must also hold each of ``names`` (the argument,
    the expected and the given value an error names)."""
    with pytest.raises(error) as info:
        yield info
    for name in names:
        assert name in str(info.value), f"{name!r} not in {str(info.value)!r}"


def assert_one_node(fn, *args, op):
    """``fn(*args)`` as ``torch._dynamo`` traces it (after a reset): one graph, no graph break,
    and exactly one node of lk3d's ``op`` (its name as it shows, e.g. ``"lk3d.cp_conv3d"``)."""
    torch._dynamo.reset()
    counts = torch._dynamo.explain(fn)(*args)
    assert counts.graph_break_count == 0 and counts.graph_count == 1
    nodes = [str(n.target) for g in counts.graphs for n in g.graph.nodes]
    assert sum(op in n for n in nodes) == 1, nodes


def rel_err(y, ref):
    y = y.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    assert y.shape == ref.shape, f"shape {tuple(y.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(y).all(), "non-finite values (an element the kernel did not write?)"
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def scaled_err(y, x, w, b, **args):
    """``||y - ref|| / ||F.conv3d(|x|, |w|, |b|)||``: the error of ``lk3d.conv3d(x, w, b, **args)``
    relative to the magnitude of the terms it sums, which bounds a float sum's rounding however
    much those terms cancel (a relative error per output does not: a tiny output of large terms,
    e.g. a fuzzed 1x1x1 output, is as far off in fp32 in every implementation, F.conv3d's
    included)."""
    ref = conv3d_ref(x, w, b, **args)
    scale = conv3d_ref(x.abs(), w.abs(), None if b is None else b.abs(), **args)
    rel_err(y, ref)  # its shape and finiteness checks
    y = y.detach().to("cpu", torch.float64)
    return ((y - ref).norm() / scale.norm().clamp_min(1e-30)).item()


# Odd and prime sizes, non-cubic kernels (up to 21 on a side), stride, dilation, every padding
# form, groups (dense, grouped, depthwise, depthwise with multiplier), batch > 1.
CASES = [
    Case(2, 3, 4, (7, 9, 5), (3, 5, 3), padding=(1, 2, 0)),
    Case(1, 6, 4, (9, 7, 8), (3, 3, 2), stride=(2, 1, 3), padding=1, dilation=(1, 2, 1), groups=2),
    Case(2, 4, 4, (9, 7, 8), (5, 3, 3), stride=2, padding=(2, 1, 1), dilation=(1, 2, 2), groups=4),
    Case(1, 3, 6, (11, 7, 5), (7, 3, 5), padding="same", groups=3),
    Case(1, 2, 2, (23, 5, 7), (21, 1, 3), padding="same", groups=2, bias=False),
    Case(1, 2, 3, (5, 23, 6), (1, 21, 3), padding="valid"),
    Case(1, 3, 5, (6, 7, 5), (4, 2, 3), padding="same", dilation=(1, 2, 1)),
    Case(1, 4, 4, (13, 11, 7), (2, 2, 2), stride=3),
    Case(1, 5, 5, (13, 11, 9), (3, 3, 3), padding=3, dilation=3, groups=5),
    Case(1, 1, 4, (7, 5, 6), (3, 3, 3), padding=1),
    Case(2, 20, 24, (5, 3, 5), (3, 1, 3), padding=1, bias=False),
    Case(3, 4, 6, (5, 6, 7), (3, 3, 3), stride=(1, 2, 2), padding=(0, 1, 2), groups=2),
]
