"""The cases of ``lk3d bench``: ``Case`` (one convolution layer), the sets shipped in
``bench_cases.json`` and the loader of a user's case file (JSON, or YAML with PyYAML)."""
import json
import math
from dataclasses import dataclass, fields
from importlib import resources

import torch

from lk3d._spec import triple
from lk3d.tools import roofline
from lk3d.tools.data_files import read_data

OPS = ("dense", "depthwise", "cp", "block_sparse")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}


@dataclass(frozen=True)
class Case:
    """One convolution layer to benchmark; stride and dilation 1."""
    name: str
    op: str          # "depthwise" (groups == Cin), "dense" (dense or grouped), "cp", "block_sparse"
    N: int
    Cin: int
    Cout: int
    groups: int
    size: tuple      # input (D, H, W)
    kernel: tuple    # (kd, kh, kw)
    padding: str = "same"  # "same" or "valid"
    dtype: str = "float32"  # a key of DTYPES
    bias: bool = True
    rank: int = 0          # cp: the CP rank R
    density: float = 1.0   # block_sparse: the fraction of weight blocks stored
    block: tuple = ()      # block_sparse: the block shape (bo, bi, bd, bh, bw)

    def __post_init__(self):
        def bad(what):
            return ValueError(f"Case {self.name!r}: {what}")
        if self.op not in OPS:
            raise bad(f"op: expected one of {OPS}, got {self.op!r}")
        if self.dtype not in DTYPES:
            raise bad(f"dtype: expected one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.padding not in ("same", "valid"):
            raise bad(f"padding: expected 'same' or 'valid', got {self.padding!r}")
        if self.Cin % self.groups or self.Cout % self.groups:
            raise bad(f"groups={self.groups} must divide Cin={self.Cin} and Cout={self.Cout}")
        if self.op == "depthwise" and self.groups != self.Cin:
            raise bad(f"op='depthwise' needs groups == Cin, got groups={self.groups}, "
                      f"Cin={self.Cin}")
        for name in ("size", "kernel"):
            value = getattr(self, name)
            if triple(name, value) != tuple(value):
                raise bad(f"{name}: expected 3 positive ints, got {value!r}")
        if self.op == "cp" and (self.groups != 1 or self.rank < 1):
            raise bad(f"op='cp' needs groups=1 and rank >= 1, got groups={self.groups}, "
                      f"rank={self.rank}")
        if self.op == "block_sparse":
            if not 0 < self.density <= 1:
                raise bad(f"density: expected a value in (0, 1], got {self.density}")
            dims = (self.Cout, self.Cin // self.groups, *self.kernel)
            if len(self.block) != 5 or any(d % b for d, b in zip(dims, self.block)):
                raise bad(f"block: expected 5 ints dividing the weight shape {dims}, "
                          f"got {self.block}")

    @classmethod
    def depthwise(cls, name, N, C, size, k, dtype="float32"):
        return cls(name, "depthwise", N, C, C, C, triple("size", size), triple("kernel", k),
                   dtype=dtype)

    @classmethod
    def dense(cls, name, N, Cin, Cout, size, k, dtype="float32", groups=1):
        return cls(name, "dense", N, Cin, Cout, groups, triple("size", size),
                   triple("kernel", k), dtype=dtype)

    @classmethod
    def cp(cls, name, N, Cin, Cout, size, k, rank, dtype="float32"):
        return cls(name, "cp", N, Cin, Cout, 1, triple("size", size), triple("kernel", k),
                   dtype=dtype, rank=rank)

    @classmethod
    def block_sparse(cls, name, N, Cin, Cout, size, k, density, block, dtype="float32",
                     groups=1):
        return cls(name, "block_sparse", N, Cin, Cout, groups, triple("size", size),
                   triple("kernel", k), dtype=dtype, density=density, block=tuple(block))

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def out_size(self):
        if self.padding == "same":
            return tuple(self.size)
        return tuple(s - k + 1 for s, k in zip(self.size, self.kernel))

    @property
    def shape(self):
        """The layer in one line: ``N1 C16->16 g16 D32x32x32 k7x7x7 same float32`` (plus
        ``R8`` for CP, ``density0.1 block16x16x1x1x1`` for block-sparse)."""
        extra = {"cp": f" R{self.rank}",
                 "block_sparse": f" density{self.density:g} block{'x'.join(map(str, self.block))}"}
        return (f"N{self.N} C{self.Cin}->{self.Cout} g{self.groups} "
                f"D{'x'.join(map(str, self.size))} k{'x'.join(map(str, self.kernel))} "
                f"{self.padding} {self.dtype}{extra.get(self.op, '')}")

    def flops(self, mode: str) -> int:
        if self.op == "cp":
            return roofline.cp_flops(self.N, self.Cin, self.Cout, self.rank, self.out_size,
                                     self.kernel, mode)
        dense = roofline.conv3d_flops(self.N, self.Cin, self.Cout, self.groups, self.out_size,
                                      self.kernel, mode)
        return round(dense * self.density) if self.op == "block_sparse" else dense

    def weight_elems(self) -> int:
        """Elements of the weight as the op stores it."""
        dense = self.Cout * (self.Cin // self.groups) * math.prod(self.kernel)
        if self.op == "cp":
            return self.rank * (self.Cin + sum(self.kernel) + self.Cout)
        return round(dense * self.density) if self.op == "block_sparse" else dense

    def bytes(self, mode: str) -> int:
        return roofline.conv3d_bytes(self.N, self.Cin, self.Cout, self.groups, self.size,
                                     self.out_size, self.kernel, mode, self.bias,
                                     self.torch_dtype.itemsize, self.weight_elems())


_CASE_KEYS = {f.name for f in fields(Case)} | {"C"}


def parse_cases(items, where) -> list:
    """Cases from a list of dicts with ``Case``'s fields (``where`` names their source in
    errors). ``size`` and ``kernel`` take an int or 3 ints; a ``"depthwise"`` case may give
    ``C`` for its channels (then Cin = Cout = groups = C); ``block`` takes a list; the rest
    keep ``Case``'s defaults. Errors are ``ValueError``s naming the source and the case."""
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ValueError(f"{where}: expected a list of case objects, got "
                         f"{type(items).__name__}")
    cases = []
    for i, item in enumerate(items):
        item = dict(item)
        label = f"{where}: case {item.get('name', i)!r}"
        unknown = sorted(set(item) - _CASE_KEYS)
        if unknown:
            raise ValueError(f"{label}: unknown keys {unknown} (expected some of "
                             f"{sorted(_CASE_KEYS)})")
        if "C" in item:
            if item.get("op") != "depthwise":
                raise ValueError(f"{label}: 'C' is for op 'depthwise' cases; give Cin and Cout")
            c = item.pop("C")
            item.update(Cin=c, Cout=c, groups=c)
        item.setdefault("groups", 1)
        for key in ("size", "kernel"):
            if key in item:
                try:
                    item[key] = triple(key, item[key])
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{label}: {e}") from None
        if "block" in item:
            item["block"] = tuple(item["block"])
        try:
            cases.append(Case(**item))
        except TypeError as e:
            raise ValueError(f"{label}: {e}") from None
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: case names must be unique, got "
                         f"{sorted({n for n in names if names.count(n) > 1})} more than once")
    return cases


def load_cases(path) -> list:
    """Cases from a JSON (or YAML, with PyYAML) file holding a list of case objects
    (``parse_cases``), e.g. ``[{"name": "my-dw21", "op": "depthwise", "N": 1, "C": 32,
    "size": 64, "kernel": 21, "dtype": "bfloat16"}]``."""
    return parse_cases(read_data(path, "benchmark cases"), str(path))


def _builtin_case_sets() -> dict:
    """The case sets shipped in ``bench_cases.json`` (beside this file): name -> cases."""
    raw = json.loads(resources.files("lk3d.tools").joinpath(CASES_FILE).read_text())
    return {name: parse_cases(s["cases"], f"{CASES_FILE} [{name}]") for name, s in raw.items()}


# The shipped sets (``bench_cases.json`` says why each holds what it holds): "quick", a few
# layers of every op that a 2-core CPU runs in well under two minutes (the README's main job);
# "full", real layers for GPUs (3D UX-Net, RepUX-Net, dense 7³-15³, CP at k = 21,
# block-sparse at 5-100% density); "goals", the goal cases G1-G5 lk3d's GPU work is judged by
# (``lk3d explain --device h100 --case G1``); "tiny", seconds under the interpreter (tests).
CASES_FILE = "bench_cases.json"
CASE_SETS = _builtin_case_sets()
QUICK_CASES, FULL_CASES, GOAL_CASES, TINY_CASES = (CASE_SETS[k] for k in
                                                   ("quick", "full", "goals", "tiny"))
