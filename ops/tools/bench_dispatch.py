"""The dispatch benchmark: does automatic algorithm choice find the fastest path?

On a grid of layers (dense and depthwise, k = 3…21, [N, C, S³] NCDHW input, ``padding="same"``)
it times every way to run the forward pass, in one process and the same run:

    torch       F.conv3d on the NCDHW input
    torch-cl    F.conv3d on the input already in channels_last_3d (oneDNN's fast layout on the
                CPU; its conversion is not timed: the baseline of a user who keeps that layout)
    lk3d-aten   lk3d's aten algorithm on the NCDHW input (it converts where NCDHW collapses; where
                it does not, it is torch's own call and is timed once, as torch)
    lk3d-fft    lk3d's overlap-save FFT
    lk3d-tiled  lk3d's Triton kernels (CUDA only)
    lk3d-auto   lk3d.conv3d as a user calls it: the plan comes from the cache, else the cost model

and reports, against the fastest candidate lk3d chooses among on the same input (torch,
lk3d-aten, lk3d-fft, lk3d-tiled): ``pick/best``, the measured time of the algorithm the plan picked
over the best (the quality of the choice; the goal: within 1.1x everywhere), and ``auto/best``,
lk3d.conv3d's own end-to-end time over the best: its time over the picked algorithm's, measured by
alternating single calls of the two (``lk3d.autotune.timing.paired_ratio``: the same code timed in
separate rounds differs by up to +-30% on a shared 2-core machine, a pair of back-to-back calls far
less), times ``pick/best``. The ``lk3d-auto`` column itself is timed in the rounds like the others.
Also the FFT's speedup over the faster torch layout (torch or torch-cl). Providers known to be
pathological are skipped with the reason in the row instead of hanging the run (CPU aten, NCDHW,
dense k >= 21: minutes).
"""
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import lk3d
from lk3d import _algos, fft
from lk3d.autotune.timing import paired_ratio, time_ms
from lk3d.tools.bench import progress_bar
from lk3d.tools.table import format_table


@dataclass(frozen=True)
class Shape:
    N: int
    C: int
    S: int
    k: int
    depthwise: bool

    @property
    def name(self):
        return f"{'dw' if self.depthwise else 'dense'}-k{self.k}-N{self.N}-C{self.C}-S{self.S}"

    def tensors(self, device, dtype=torch.float32):
        g = torch.Generator().manual_seed(self.k)
        x = torch.randn(self.N, self.C, self.S, self.S, self.S, generator=g)
        w = torch.randn(self.C, 1 if self.depthwise else self.C, self.k, self.k, self.k,
                        generator=g) / self.k ** 1.5
        return x.to(device, dtype), w.to(device, dtype)


def grid(N=1, C=16, S=48, kernels=(3, 5, 7, 11, 15, 21)):
    return [Shape(N, C, S, k, dw) for dw in (False, True) for k in kernels]


def _skip(provider, shape, device):
    if device.type == "cpu" and provider == "torch" and not shape.depthwise and shape.k >= 21:
        return "skipped: NCDHW aten on the CPU takes minutes for dense k >= 21"
    return ""


def run(shapes, device, progress=True, rounds=5, pairs=None):
    """One row per shape: provider -> ms (or a skip reason), auto's choice and the ratios. Each
    provider is timed in ``rounds`` interleaved rounds (the planner's ``time_ms``) and keeps its
    best median; ``pairs``: the alternating calls of ``paired_ratio`` (None: a second's worth).
    Where lk3d's aten algorithm is the very call torch makes (it keeps the input's layout), it is
    timed once, as torch: two timings of one call differ only by noise."""
    rows = []
    for shape in progress_bar(shapes, enabled=progress, desc="dispatch"):
        x, w = shape.tensors(device)
        groups = shape.C if shape.depthwise else 1
        p = (shape.k - 1) // 2
        xcl = x.contiguous(memory_format=torch.channels_last_3d)
        providers = {
            "torch": lambda: F.conv3d(x, w, None, 1, p, 1, groups),
            "torch-cl": lambda: F.conv3d(xcl, w, None, 1, p, 1, groups),
            "lk3d-aten": lambda: _algos.aten_forward(x, w, None, (1, 1, 1), [p] * 6, (1, 1, 1),
                                                     groups).contiguous(),
            "lk3d-fft": lambda: fft.conv3d_forward(x, w, None, (1, 1, 1), [p] * 6, (1, 1, 1),
                                                   groups),
            "lk3d-auto": lambda: lk3d.conv3d(x, w, None, 1, p, 1, groups),
        }
        same = {}
        if _algos.aten_layout(x, w.shape) is x:
            same["lk3d-aten"] = "torch"
            del providers["lk3d-aten"]
        if _algos.kernels_can_run(x) and device.type == "cuda":
            providers["lk3d-tiled"] = lambda: _algos.tiled_forward(
                x, w, None, (1, 1, 1), [p] * 6, (1, 1, 1), groups)
        times, skipped = {}, {}
        with torch.no_grad():
            for _ in range(rounds):  # interleaved rounds, best median: drift hits all alike
                for name, fn in providers.items():
                    reason = _skip(name, shape, device)
                    if reason:
                        skipped[name] = reason
                        continue
                    times[name] = min(times.get(name, float("inf")), time_ms(fn, device))
        for name, twin in same.items():
            if twin in times:
                times[name] = times[twin]
            elif twin in skipped:
                skipped[name] = skipped[twin]
        plan = lk3d.explain(x, w, None, 1, p, 1, groups)["forward"]
        others = {k: v for k, v in times.items() if k not in ("lk3d-auto", "torch-cl")}
        best = min(others, key=others.get)
        torch_best = min(v for k, v in times.items() if k.startswith("torch"))
        pick_name = f"lk3d-{plan['algo']}"
        pick_name = same.get(pick_name, pick_name)
        picked = times.get(pick_name, times["lk3d-auto"])
        with torch.no_grad():
            overhead = paired_ratio(providers["lk3d-auto"], providers[pick_name], device,
                                    pairs) \
                if pick_name in times and pick_name in providers else 1.0
        rows.append(dict(shape=shape.name, times_ms=times, skipped=skipped, same=same,
                         auto=plan["algo"], auto_source=plan["source"], best=best,
                         pick_over_best=picked / others[best],
                         auto_over_pick=overhead,
                         auto_over_best=overhead * picked / others[best],
                         fft_speedup=torch_best / times["lk3d-fft"]))
    return rows


def format_rows(rows):
    names = ["torch", "torch-cl", "lk3d-aten", "lk3d-fft", "lk3d-tiled", "lk3d-auto"]
    names = [n for n in names if any(n in r["times_ms"] or n in r["skipped"] for r in rows)]
    header = ("shape", *(f"{n} ms" for n in names), "auto", "best", "pick/best", "auto/best",
              "fft speedup")
    lines = [(r["shape"],
              *(f"= {r['same'][n]}" if n in r["same"] else
                f"{r['times_ms'][n]:.1f}" if n in r["times_ms"] else "skip" for n in names),
              r["auto"], r["best"], f"{r['pick_over_best']:.2f}x", f"{r['auto_over_best']:.2f}x",
              f"{r['fft_speedup']:.2f}x") for r in rows]
    numbers = [*range(1, 1 + len(names)), *range(len(header) - 3, len(header))]
    out = [format_table(header, lines, right=numbers)]
    skipped = sorted({reason for r in rows for reason in r["skipped"].values()})
    out += [f"  ({reason})" for reason in skipped]
    if any(r["same"] for r in rows):
        out.append("  (= torch: lk3d's aten algorithm keeps the input's layout there, so it is "
                   "torch's own call, timed once)")
    out.append(f"  device: {_device_name(rows)}; torch {torch.__version__}; "
               f"threads {torch.get_num_threads()}")
    return "\n".join(out)


def _device_name(rows):
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return os.environ.get("LK3D_CPU_NAME") or _cpu_name()


def _cpu_name():
    from lk3d.autotune.fingerprint import device_fingerprint
    return device_fingerprint(torch.device("cpu"))["name"]
