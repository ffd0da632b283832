"""The innermost loop of a kernel's SASS and its instructions by class.

``cuobjdump -sass`` (``lk3d.tools.aot.sass``) prints one instruction per line after its address,
``/*0a10*/  @!P0 BRA 0x730 ;``, branch targets as absolute addresses (some versions print
labels, ``BRA `(.L_x_3)`` with ``.L_x_3:`` lines; both are read). A loop is a backward branch:
its body is the instructions from the target to the branch, both included.

**The innermost loop** is, among the loops that hold a *hot* instruction (the kernel's
tensor-core instructions, HGMMA or HMMA, where it has any, else its FP32/FP16 math: FFMA, FADD,
FMUL, HFMA2, ...; else any instruction), one that holds no other such loop; where several do
(a reduction loop and an epilogue loop over output channel blocks, siblings in the code), the
one with the most global loads (LDG, LDGSTS, UTMALDG: the reduction streams its operands every
step, an epilogue writes), then the smaller. A branch to itself (the ``BRA`` trap after
``EXIT``) is no loop, nor is a backward branch whose body holds an ``EXIT`` (the out-of-line
retry of a barrier wait, placed after the kernel's end, jumping back into its loop). Innermost,
not outermost: when the compiler nests the tap loops or keeps a loop over tiles around the
reduction, the innermost hot loop is what repeats most. Every
instruction in the body counts, NOPs and the branch included: each takes an issue slot of its
warp; forward branches inside the body (guarded tails) are counted as never taken, so where they
skip work the count is an upper bound on a step's issue cost.

**Classes** are mnemonics up to the first '.': ``HGMMA.64x64x16.F32.BF16`` counts as HGMMA,
``LDG.E.U16`` as LDG, ``@!P0 BRA`` as BRA.
"""
import re
from collections import Counter
from dataclasses import dataclass

TENSOR_OPS = ("HGMMA", "HMMA")          # wgmma (sm_90) and mma.sync (sm_80+)
FMA_OPS = ("FFMA", "FADD", "FMUL", "HFMA2", "HADD2", "HMUL2", "DFMA", "DADD", "DMUL")
FLOPS_PER_LANE = {"FFMA": 2, "FADD": 1, "FMUL": 1, "HFMA2": 4, "HADD2": 2, "HMUL2": 2,
                  "DFMA": 2, "DADD": 1, "DMUL": 1}  # per active lane of one warp instruction
LOAD_OPS = ("LDG", "LDGSTS", "UTMALDG")  # global loads (UTMALDG: a TMA copy)
_BRANCHES = ("BRA", "JMP")

_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L\w*):\s*$")
_TARGET = re.compile(r"(?:`\((\.L\w*)\)|\b0x([0-9a-fA-F]+)\b)")
_HGMMA_SHAPE = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)")
_HMMA_SHAPE = re.compile(r"^HMMA\.(\d+)")


@dataclass(frozen=True)
class Instruction:
    address: int
    text: str     # without predicate: "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8].tnspB, R24"
    opclass: str  # the mnemonic before the first '.': "HGMMA"


@dataclass(frozen=True)
class Loop:
    start: int        # address of the branch target (the loop head)
    end: int          # address of the backward branch
    body: tuple       # the Instructions from start to end, both included

    @property
    def instructions(self):
        return len(self.body)

    def counts(self):
        """Opcode class -> instructions in the body, most frequent first."""
        return dict(Counter(i.opclass for i in self.body).most_common())


def parse(text):
    """The instructions of SASS ``text`` in address order (every function in it, as printed)."""
    out = []
    for line in text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        body = m.group(2).strip().strip("{}").strip()
        body = re.sub(r"^@!?U?P\w+\s+", "", body)
        if not body:
            continue
        out.append(Instruction(int(m.group(1), 16), body, body.split()[0].split(".")[0]))
    return out


def _labels(text):
    """Label -> address of the instruction after it."""
    labels, pending = {}, []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if m and pending:
            labels.update((name, int(m.group(1), 16)) for name in pending)
            pending = []
    return labels


def loops(text):
    """Every loop of SASS ``text``: (head, branch) of each backward branch, smallest first."""
    instrs = parse(text)
    labels = _labels(text)
    found = []
    for i, ins in enumerate(instrs):
        if ins.opclass not in _BRANCHES:
            continue
        m = _TARGET.search(ins.text)
        if not m:
            continue
        target = labels.get(m.group(1)) if m.group(1) else int(m.group(2), 16)
        if target is None or target >= ins.address:
            continue  # forward, or a branch to itself
        body = tuple(j for j in instrs[:i + 1] if j.address >= target)
        if any(j.opclass == "EXIT" for j in body):
            continue  # an out-of-line wait's branch back into the loop, past the kernel's end
        found.append(Loop(target, ins.address, body))
    return sorted(found, key=lambda lp: (lp.instructions, lp.start))


def hot_classes(instrs):
    """The classes that mark the loop doing the work: tensor-core ops where the kernel has any,
    else its floating-point math; () when it has neither (then any loop qualifies)."""
    present = {i.opclass for i in instrs}
    for group in (TENSOR_OPS, FMA_OPS):
        hot = tuple(op for op in group if op in present)
        if hot:
            return hot
    return ()


def innermost_loop(text):
    """The innermost loop of SASS ``text`` (see the module docstring); None without loops."""
    hot = hot_classes(parse(text))
    found = [lp for lp in loops(text) if not hot or any(i.opclass in hot for i in lp.body)]
    innermost = [lp for lp in found
                 if not any(o is not lp and lp.start <= o.start and o.end <= lp.end
                            for o in found)]
    if not innermost:
        return None
    return max(innermost, key=lambda lp: (sum(i.opclass in LOAD_OPS for i in lp.body),
                                          -lp.instructions, -lp.start))


def step_flops(loop, num_warps):
    """FLOPs one program executes per pass through ``loop`` and the unit doing them, read off
    the instructions: an HGMMA.MxNxK is 2·M·N·K per warpgroup (4 warps issue it together), an
    HMMA.MNK (e.g. 16816) 2·M·N·K per warp, an FFMA 2 per lane of each warp (32 lanes).
    Returns (flops, "tensor" | "fma")."""
    tensor = 0
    for ins in loop.body:
        if ins.opclass in TENSOR_OPS:
            if ins.opclass == "HGMMA":
                m_, n_, k_ = (int(g) for g in _HGMMA_SHAPE.match(ins.text).groups())
            else:
                m_, n_, k_ = _hmma_shape(_HMMA_SHAPE.match(ins.text).group(1))
            per = 2 * m_ * n_ * k_
            tensor += per * (num_warps // 4 if ins.opclass == "HGMMA" else num_warps)
    if tensor:
        return tensor, "tensor"
    fma = sum(FLOPS_PER_LANE.get(i.opclass, 0) for i in loop.body) * 32 * num_warps
    return fma, "fma"


def _hmma_shape(digits):
    """M, N, K of an HMMA shape printed as digits: 16816 -> (16, 8, 16), 1688 -> (16, 8, 8)."""
    shapes = {"16816": (16, 8, 16), "1688": (16, 8, 8), "16832": (16, 8, 32), "884": (8, 8, 4)}
    if digits not in shapes:
        raise ValueError(f"HMMA shape: expected one of {sorted(shapes)}, got {digits!r}")
    return shapes[digits]
