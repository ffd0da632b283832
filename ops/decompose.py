"""``lk3d.decompose``: low-rank forms of a dense conv weight ``[Cout, Cin, kd, kh, kw]``.

    factors, err = lk3d.decompose.cp(weight, rank=16)            # CP: lk3d.CPFactors
    tucker, err = lk3d.decompose.tucker(weight, ranks=(16, 8))   # Tucker-2 over the channels

Both run TensorLy's own solvers (``parafac``: alternating least squares; ``partial_tucker``:
higher-order orthogonal iteration) on its PyTorch backend, set for the calling thread only while
they run, from an SVD initialisation and a fixed ``seed`` (so a call is deterministic). ``err`` is
the relative Frobenius error ``||W - W_approx|| / ||W||``. Half-precision weights are decomposed
in float32, float64 ones in float64; the factors come back in the weight's dtype and device.

Memory: besides the weight, the solvers hold one unfolded copy of it and, for CP, Khatri-Rao
products of up to ``numel(W)·R / min(Cout, Cin, kd, kh, kw)`` elements: on a 64×64×21³ float32
weight at rank 4 the peak RSS grows by 1.8-2.0× the weight (measured), and the Khatri-Rao part
grows with the rank. The SVD initialisation uses the Gram matrix of each unfolding (rows × rows)
instead of TensorLy's default full SVD, whose right singular vectors are as large as the weight
and which takes ~20 s on that weight; the reconstruction error is computed in slices of ``Cout``.

TensorLy is an optional dependency (``pip install 'lk3d[decompose]'``), imported on the first
decomposition; without it ``cp`` and ``tucker`` raise an ImportError that names the extra.
"""
import math
from dataclasses import dataclass
from numbers import Integral

import torch

from lk3d._spec import check_same, check_tensor
from lk3d.cp_factors import CPFactors
from lk3d._spec import positive_int

__all__ = ["cp", "tucker", "TuckerFactors"]


@dataclass(frozen=True, eq=False)
class TuckerFactors:
    """A Tucker-2 form of a conv weight: ``W[o, i, ...] = sum_{p,q} U_out[o, p] core[p, q, ...]
    U_in[i, q]``, with ``core [R_out, R_in, kd, kh, kw]``, ``U_out [Cout, R_out]``,
    ``U_in [Cin, R_in]``; checked on construction."""
    core: torch.Tensor
    U_out: torch.Tensor
    U_in: torch.Tensor

    def __post_init__(self):
        check_tensor("core", self.core, (5,))
        check_tensor("U_out", self.U_out, (2,))
        check_tensor("U_in", self.U_in, (2,))
        check_same("U_out", self.U_out, self.core, "core")
        check_same("U_in", self.U_in, self.core, "core")
        if self.U_out.shape[1] != self.core.shape[0] or self.U_in.shape[1] != self.core.shape[1]:
            raise ValueError(f"factors: expected U_out [Cout, R_out], U_in [Cin, R_in] and core "
                             f"[R_out, R_in, kd, kh, kw], got U_out {tuple(self.U_out.shape)}, "
                             f"U_in {tuple(self.U_in.shape)}, core {tuple(self.core.shape)}")
        if min(self.core.shape) < 1 or min(self.U_out.shape) < 1 or min(self.U_in.shape) < 1:
            raise ValueError(f"factors: expected non-empty factors, got U_out "
                             f"{tuple(self.U_out.shape)}, U_in {tuple(self.U_in.shape)}, core "
                             f"{tuple(self.core.shape)}")

    @property
    def ranks(self) -> tuple:
        return (self.core.shape[0], self.core.shape[1])

    @property
    def kernel_size(self) -> tuple:
        return tuple(self.core.shape[2:])

    def to_dense(self) -> torch.Tensor:
        """The full weight ``[Cout, Cin, kd, kh, kw]``."""
        return torch.einsum("op,pqabc,iq->oiabc", self.U_out, self.core, self.U_in)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _check_common(weight, n_iter_max, seed):
    check_tensor("weight", weight, (5,))
    if min(weight.shape) < 1:
        raise ValueError(f"weight: expected a non-empty weight, got shape {tuple(weight.shape)}")
    positive_int("n_iter_max", n_iter_max)
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise TypeError(f"seed: expected a non-negative int, got {seed!r} "
                        f"({type(seed).__name__})")


def _compute_dtype(weight):
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _gram_left_svd(matrix, n_eigenvecs=None, **kwargs):
    """Leading left singular vectors and values of ``matrix`` from the eigenvectors of its Gram
    matrix ``M Mᵀ`` (rows × rows: small for a weight's unfoldings), with the signature TensorLy's
    ``svd_interface`` takes a callable in. TensorLy's CP and Tucker initialisations use ``U`` and
    ``S`` only, so ``V`` is an empty ``[k, 0]`` stand-in: the real one is as large as the weight.

    Singular values are floored at ``sqrt(eps)·S[0]`` (below it the Gram matrix cannot resolve
    them anyway): CP's initialisation scales its first factor by ``S``, and a zero column there
    (a rank above the weight's own) makes every ALS solve singular.
    """
    rows, cols = matrix.shape
    k = min(rows, cols) if n_eigenvecs is None else min(n_eigenvecs, rows, cols)
    gram = matrix @ matrix.T if rows <= cols else matrix.T @ matrix
    s2, vecs = torch.linalg.eigh(gram)
    vecs = vecs.flip(1)[:, :k]
    s = s2.flip(0)[:k].clamp_min(0).sqrt()
    s = s.clamp_min(s[0] * math.sqrt(torch.finfo(s.dtype).eps) + torch.finfo(s.dtype).tiny)
    u = vecs if rows <= cols else (matrix @ vecs) / s  # tall: U = M V / S
    return u, s, matrix.new_empty(k, 0)


def _relative_error(weight, dense_rows, dtype):
    """``||W - approx|| / ||W||`` with ``dense_rows(slice)`` giving ``approx[slice]``, computed
    one slice of output channels at a time (a few MB each), never the whole approximation."""
    per_row = math.prod(weight.shape[1:])
    step = max(1, (1 << 22) // per_row)
    diff2 = norm2 = 0.0
    for start in range(0, weight.shape[0], step):
        rows = slice(start, start + step)
        w = weight[rows].to(dtype)
        diff2 += (w - dense_rows(rows)).square().sum().item()
        norm2 += w.square().sum().item()
    return math.sqrt(diff2 / norm2) if norm2 > 0 else math.sqrt(diff2)


def _decomposition():
    """``tensorly.decomposition``; an ImportError naming the ``decompose`` extra where TensorLy
    does not import."""
    try:
        import tensorly.decomposition
    except ImportError as e:
        raise ImportError(f"lk3d.decompose needs TensorLy: pip install 'lk3d[decompose]' ({e})",
                          name="tensorly") from e
    return tensorly.decomposition


class _pytorch_backend:
    """TensorLy's PyTorch backend for the calling thread, while the solver runs."""

    def __enter__(self):
        import tensorly
        self.ctx = tensorly.backend_context("pytorch", local_threadsafe=True)
        return self.ctx.__enter__()

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# CP
# ---------------------------------------------------------------------------------------------

def cp(weight, rank, n_iter_max=100, seed=0, tol=1e-8, linesearch=False):
    """Rank-``rank`` CP decomposition of a conv weight ``[Cout, Cin, kd, kh, kw]``.

    Returns ``(factors, relative_error)``: an ``lk3d.CPFactors`` whose ``to_dense()``
    approximates ``weight`` (columns of unit norm, their scales in ``factors.weights``) and
    ``||weight - factors.to_dense()|| / ||weight||``. Runs TensorLy's ``parafac`` (ALS) from an
    SVD initialisation for at most ``n_iter_max`` sweeps, stopping early once the error changes
    by less than ``tol``; ``seed`` fixes the random columns the initialisation adds when ``rank``
    exceeds a side of the weight. ``linesearch=True`` turns on TensorLy's line search, which
    gets through ALS's slow stretches in far fewer sweeps but builds the full reconstruction
    (twice the weight's memory more) every other sweep.
    """
    _check_common(weight, n_iter_max, seed)
    rank = positive_int("rank", rank)
    parafac = _decomposition().parafac

    dtype = _compute_dtype(weight)
    with torch.no_grad(), _pytorch_backend():
        w = weight.detach().to(dtype)
        weights, (u_out, u_in, a, b, c) = parafac(
            w, rank, n_iter_max=n_iter_max, init="svd", svd=_gram_left_svd, tol=tol,
            random_state=seed, normalize_factors=True, linesearch=bool(linesearch))
        found = CPFactors(u_out, u_in, a, b, c, weights)
        scaled = found.scaled_out()
        err = _relative_error(w, lambda rows: torch.einsum(
            "or,ir,ar,br,cr->oiabc", scaled[rows], u_in, a, b, c), dtype)
    return found.to(weight.dtype), err


# ---------------------------------------------------------------------------------------------
# Tucker
# ---------------------------------------------------------------------------------------------

def tucker_ranks(ranks, cout, cin):
    """``(out_rank, in_rank)`` of a Tucker-2 decomposition from ``ranks`` (an int or a pair),
    checked against ``cout`` and ``cin``."""
    if isinstance(ranks, Integral) and not isinstance(ranks, bool):
        ranks = (ranks, ranks)
    if (not isinstance(ranks, (tuple, list)) or len(ranks) != 2
            or any(isinstance(r, bool) or not isinstance(r, Integral) for r in ranks)):
        raise TypeError(f"ranks: expected an int or a pair (out_rank, in_rank) of ints, "
                        f"got {ranks!r}")
    r_out, r_in = (int(r) for r in ranks)
    if not (1 <= r_out <= cout and 1 <= r_in <= cin):
        raise ValueError(f"ranks: expected 1 <= out_rank <= {cout} (Cout) and 1 <= in_rank <= "
                         f"{cin} (Cin), got {ranks!r}")
    return r_out, r_in


def tucker(weight, ranks, n_iter_max=100, seed=0, tol=1e-8):
    """Tucker-2 decomposition of a conv weight over its two channel modes.

    ``ranks`` is ``(out_rank, in_rank)`` or one int for both. Returns ``(factors,
    relative_error)``: a ``TuckerFactors`` with orthonormal ``U_out [Cout, out_rank]`` and
    ``U_in [Cin, in_rank]`` and the ``core [out_rank, in_rank, kd, kh, kw]``, and
    ``||weight - factors.to_dense()|| / ||weight||``. Runs TensorLy's ``partial_tucker`` (HOOI)
    from an SVD initialisation; ``n_iter_max``, ``seed`` and ``tol`` as in ``cp``. This is the
    form ``lk3d.nn.TuckerConv3d`` runs: 1×1×1 conv, ``core`` conv, 1×1×1 conv.
    """
    _check_common(weight, n_iter_max, seed)
    r_out, r_in = tucker_ranks(ranks, weight.shape[0], weight.shape[1])
    partial_tucker = _decomposition().partial_tucker

    dtype = _compute_dtype(weight)
    with torch.no_grad(), _pytorch_backend():
        w = weight.detach().to(dtype)
        (core, (u_out, u_in)), _ = partial_tucker(
            w, [r_out, r_in], modes=[0, 1], n_iter_max=n_iter_max, init="svd",
            svd=_gram_left_svd, tol=tol, random_state=seed)
        err = _relative_error(w, lambda rows: torch.einsum(
            "op,pqabc,iq->oiabc", u_out[rows], core, u_in), dtype)
    found = TuckerFactors(core.to(weight.dtype), u_out.to(weight.dtype), u_in.to(weight.dtype))
    return found, err
