"""The rank-R CP weight format: ``lk3d.CPFactors``.

A rank-R CP kernel holds a dense weight ``[Cout, Cin, kd, kh, kw]`` as five factor matrices::

    W[o, i, a, b, c] = sum_r  U_out[o, r] * weights[r] * U_in[i, r] * A[a, r] * B[b, r] * C[c, r]

``lk3d.cp`` holds the convolution with such a kernel (``lk3d.cp_conv3d``).
"""
from dataclasses import dataclass
from typing import Optional

import torch

from lk3d._spec import check_same, check_tensor

__all__ = ["CPFactors", "dense_weight"]

_FACTOR_ROWS = (("U_out", "out_channels"), ("U_in", "in_channels"), ("A", "kernel depth kd"),
                ("B", "kernel height kh"), ("C", "kernel width kw"))


@dataclass(frozen=True, eq=False)
class CPFactors:
    """The five factor matrices (and optional per-component weights) of a rank-R CP kernel.

    ``U_out [Cout, R]``, ``U_in [Cin, R]``, ``A [kd, R]``, ``B [kh, R]``, ``C [kw, R]``,
    ``weights [R]`` or None (all ones). All floating tensors of one dtype on one device; checked
    on construction (``TypeError``/``ValueError`` naming the factor). ``to_dense()`` gives the
    full weight ``[Cout, Cin, kd, kh, kw]`` that ``F.conv3d`` would take.
    """
    U_out: torch.Tensor
    U_in: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    weights: Optional[torch.Tensor] = None

    def __post_init__(self):
        for name, what in _FACTOR_ROWS:
            t = getattr(self, name)
            check_tensor(name, t)
            if t.dim() != 2:
                raise ValueError(f"{name}: expected a 2-D tensor [{what}, rank], got {t.dim()}-D "
                                 f"with shape {tuple(t.shape)}")
            if t.shape[0] < 1:
                raise ValueError(f"{name}: expected at least one row ({what}), got shape "
                                 f"{tuple(t.shape)}")
            if name != "U_out":
                check_same(name, t, self.U_out, "U_out")
        ranks = {name: getattr(self, name).shape[1] for name, _ in _FACTOR_ROWS}
        if len(set(ranks.values())) != 1:
            shapes = ", ".join(f"{n} {tuple(getattr(self, n).shape)}" for n, _ in _FACTOR_ROWS)
            raise ValueError(f"factors: expected the same number of columns (the rank) in every "
                             f"factor, got {shapes}")
        if self.U_out.shape[1] < 1:
            raise ValueError(f"rank: expected a rank of at least 1 (factors with one column or "
                             f"more), got factors of shape {tuple(self.U_out.shape)}")
        if self.weights is not None:
            check_tensor("weights", self.weights)
            check_same("weights", self.weights, self.U_out, "U_out")
            if tuple(self.weights.shape) != (self.rank,):
                raise ValueError(f"weights: expected shape ({self.rank},) (one per rank "
                                 f"component), got {tuple(self.weights.shape)}")

    @property
    def rank(self) -> int:
        return self.U_out.shape[1]

    @property
    def kernel_size(self) -> tuple:
        return (self.A.shape[0], self.B.shape[0], self.C.shape[0])

    @property
    def out_channels(self) -> int:
        return self.U_out.shape[0]

    @property
    def in_channels(self) -> int:
        return self.U_in.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.U_out.dtype

    @property
    def device(self) -> torch.device:
        return self.U_out.device

    def tensors(self) -> tuple:
        """``(U_out, U_in, A, B, C, weights)``, the order the custom ops take them in."""
        return (self.U_out, self.U_in, self.A, self.B, self.C, self.weights)

    def scaled_out(self) -> torch.Tensor:
        """``U_out`` with ``weights`` folded in: ``U_out * weights`` (or ``U_out``)."""
        return self.U_out if self.weights is None else self.U_out * self.weights

    def to(self, *args, **kwargs) -> "CPFactors":
        """The factors moved/cast as ``torch.Tensor.to(*args, **kwargs)`` does."""
        return CPFactors(*(None if t is None else t.to(*args, **kwargs) for t in self.tensors()))

    def to_dense(self) -> torch.Tensor:
        """The full weight ``[Cout, Cin, kd, kh, kw]`` (differentiable in every factor)."""
        return dense_weight(self.scaled_out(), self.U_in, self.A, self.B, self.C)

    def __repr__(self):
        kd, kh, kw = self.kernel_size
        return (f"CPFactors(rank={self.rank}, out_channels={self.out_channels}, "
                f"in_channels={self.in_channels}, kernel_size=({kd}, {kh}, {kw}), "
                f"weights={self.weights is not None}, dtype={self.dtype}, device={self.device})")


def dense_weight(u_out, U_in, A, B, C):
    """The dense weight ``[Cout, Cin, kd, kh, kw]`` of the factors (``U_out`` scaled)."""
    return torch.einsum("or,ir,ar,br,cr->oiabc", u_out, U_in, A, B, C)
