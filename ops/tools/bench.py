"""Benchmarks: lk3d's large-kernel convolutions against what users run today, side by side.

A case (``Case``) is one convolution layer; a result (``Result``) is one (case, provider, mode)
measurement. A case's op decides its providers (``OP_PROVIDERS``):

* dense / depthwise: ``lk3d`` (``lk3d.conv3d``, whatever algorithm lk3d picks), ``lk3d-fft`` and
  ``lk3d-tiled`` (the same op with ``LK3D_ALGO`` forcing one algorithm; tiled only where the
  Triton kernels run), ``torch`` (``F.conv3d`` on NCDHW tensors) and ``torch-cl`` (input and
  weight in ``channels_last_3d``);
* cp (a rank-R CP kernel): ``lk3d`` (``lk3d.cp_conv3d``), ``cp-unfused`` (the chain of five
  convolutions written in plain torch: pointwise Cin->R, three 1-D depthwise convs, pointwise
  R->Cout, each writing its [N, R, ...] intermediate), ``tensorly`` (tensorly-torch's
  ``FactorizedConv`` from the same factors, factorized implementation; only where ``tltorch`` is
  installed: ``pip install tensorly-torch``), and ``torch`` / ``torch-cl`` (dense ``F.conv3d``
  with the same kernel reconstructed, ``factors.to_dense()``);
* block_sparse (a block-sparse kernel of density ``density``): ``lk3d``
  (``lk3d.block_sparse_conv3d``), ``lk3d-dense`` (``lk3d.conv3d`` with the same kernel dense),
  ``torch-mask`` (``F.conv3d`` with a dense weight times its block mask every step, as masked
  sparse training does) and ``torch`` / ``torch-cl`` (``F.conv3d``, the same kernel dense).

The baseline of a (case, mode) is its fastest provider not from lk3d (oneDNN on the CPU is ~5x
faster in channels_last_3d at k=15 and its NCDHW path collapses at k=21), and ``speedup`` is that
baseline's time over the row's time (> 1: faster than everything else measured). Modes: ``fwd``,
``bwd`` (grads of the input, the weight or factors or stored blocks, and the bias, from a graph
built once) and ``fwdbwd`` (both). FLOPs count the least work of the op (``lk3d.tools.roofline``):
``2·N·Cout·OD·OH·OW·(Cin/g)·kd·kh·kw`` for a dense kernel, that times the density for a
block-sparse one, ``2·N·OD·OH·OW·R·(Cin + kd + kh + kw + Cout)`` for a CP one; twice that for
``bwd`` and three times for ``fwdbwd``; TFLOP/s of every provider of a case use that same count.
Bytes are the least traffic of the step (the input, the output and the weight as the op stores
it). ``roofline_fraction`` is the roofline's time over the measured time, with ceilings measured
in the same run and process (a large matmul in the case's dtype, a large tensor copy).
``peak_mem_mb`` (CUDA only; empty on the CPU, which has no allocator statistics) is the most
memory one step allocates above its inputs, in MiB.

Timing is the median of ``triton.testing.do_bench`` on CUDA and of
``torch.utils.benchmark.Timer.blocked_autorange`` on the CPU (all torch threads;
``lk3d.autotune.timing``). Before timing, lk3d's output is compared with ``F.conv3d``'s of the
same (dense) kernel in the same dtype (relative L2 error, in the lk3d rows, with the algorithm
lk3d's planner picked for dense and depthwise cases, from ``lk3d.explain``).

Time limits: every measurement has a budget (``budget_s``). The first call is timed; when it
predicts the measurement would pass the budget the row is ``skipped (budget)``. A first call can
itself take minutes (CPU NCDHW ``F.conv3d`` at k=21 took > 200 s), so by default the measurements
run in a worker process that is killed at 1.5 x budget + a start-up allowance, and the row is
``skipped (budget)`` too; a new worker takes the next measurement. ``max_time_s`` bounds the whole
run: what is left when it passes is ``skipped (time limit)``.

The pieces: ``lk3d.tools.bench_cases`` (``Case``, the sets of ``bench_cases.json``, a user's case
file), ``lk3d.tools.bench_providers`` (each provider's step, one measurement, the accuracy
check), ``lk3d.tools.bench_worker`` (the worker process); here a run, its ``Result`` rows, the
table and the CSV. Their public names are all importable from here.
"""
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import torch

import lk3d
from lk3d._algos import allow_tf32
from lk3d.tools import roofline, table
from lk3d.tools.bench_cases import (CASE_SETS, CASES_FILE, DTYPES, FULL_CASES, OPS, QUICK_CASES,
                                    TINY_CASES, Case, load_cases, parse_cases)
from lk3d.tools.bench_providers import (FORCED_ALGO, OP_PROVIDERS, PROVIDERS, available,
                                        check_case, cp_unfused, lk3d_plans, measure_case,
                                        peak_mem_mb, time_case)
from lk3d.tools.bench_worker import InProcess, Worker, worker_env

__all__ = ["OPS", "DTYPES", "Case", "parse_cases", "load_cases", "CASES_FILE", "CASE_SETS",
           "QUICK_CASES", "FULL_CASES", "TINY_CASES", "OP_PROVIDERS", "PROVIDERS", "available",
           "cp_unfused", "time_case", "peak_mem_mb", "measure_case", "lk3d_plans", "check_case",
           "Worker", "InProcess", "worker_env", "MODES", "TOLERANCE", "TF32_TOLERANCE",
           "DEFAULT_BUDGET_S", "DEFAULT_MIN_RUN_TIME_S", "SKIPPED_BUDGET", "SKIPPED_TIME_LIMIT",
           "Result", "default_device", "cpu_name", "device_name", "slug", "device_slug",
           "default_report_dir", "triton_version", "git_commit", "progress_bar", "run",
           "is_baseline", "tolerance", "accuracy_failures", "format_table", "describe",
           "CSV_COLUMNS", "write_csv"]

MODES = ("fwd", "bwd", "fwdbwd")
# lk3d vs F.conv3d in the same dtype, relative L2 error: above this the bench exits non-zero.
# float32 on CUDA is TF32 in both when cuDNN's allow_tf32 is on (the default).
TOLERANCE = {"float16": 5e-3, "bfloat16": 3e-2, "float32": 1e-4, "float64": 1e-9}
TF32_TOLERANCE = 5e-3

# Per-measurement time budget and timed repetitions (seconds), by device type.
DEFAULT_BUDGET_S = {"cpu": 30.0, "cuda": 60.0}
DEFAULT_MIN_RUN_TIME_S = {"cpu": 0.5, "cuda": 0.2}
_START_ALLOWANCE_S = 30.0  # worker start-up (imports, CUDA context) and the first compile

SKIPPED_BUDGET = "skipped (budget)"
SKIPPED_TIME_LIMIT = "skipped (time limit)"


@dataclass(frozen=True)
class Result:
    """One measurement; the CSV's columns are these fields (None is written as empty)."""
    case: str
    op: str
    shape: str
    dtype: str
    provider: str
    mode: str
    median_ms: Optional[float]
    tflops: Optional[float]
    speedup: Optional[float]  # baseline's median over this median
    roofline_fraction: Optional[float]  # the roofline's time over median_ms
    peak_mem_mb: Optional[float]  # CUDA: MiB one step allocates above its inputs; CPU: None
    baseline: str             # the fastest non-lk3d provider of this (case, mode), "" if none ran
    rel_err: Optional[float]  # lk3d rows: vs F.conv3d in the same dtype
    algo: str                 # lk3d rows: lk3d's plan, e.g. "fft" (fwd) or "fft/aten/fft"
                              # (forward/grad-input/grad-weight); "" where unknown
    status: str               # "ok", "skipped (budget)", "skipped (time limit)", "error: ..."
    device: str
    torch: str
    triton: str
    lk3d: str
    commit: str
    timestamp: str
    ceiling_tflops: Optional[float] = None  # this run's matmul rate in the case's dtype
    ceiling_gbps: Optional[float] = None    # this run's copy bandwidth (GB/s, read + write)


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------

def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    """Lowercase, every run of non-alphanumerics one '-': ``NVIDIA H100 80GB HBM3`` ->
    ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_slug(device) -> str:
    """A folder name for the device: the GPU's name on CUDA, the CPU's model name and torch's
    thread count on the CPU (``amd-epyc-2t``); trademark marks and clock speeds dropped."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return slug(torch.cuda.get_device_name(index))
    name = re.sub(r"\((R|TM|tm|r)\)|\bCPU\b|@.*$", " ", cpu_name())
    return f"{slug(name)}-{torch.get_num_threads()}t"


def default_report_dir(device, case_set: str, root=None) -> Path:
    """``<root>/<lk3d version>/<device slug>/<case set>``: where ``lk3d bench`` writes its report
    unless ``--out`` says otherwise; ``root`` defaults to ``lk3d.tools.report.reports_root()`` (the
    user's data folder, or ``$LK3D_REPORT_DIR``), never a folder of the checkout."""
    from lk3d.tools.report import reports_root

    root = reports_root() if root is None else Path(root)
    return root / lk3d.__version__ / device_slug(device) / slug(case_set)


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def git_commit() -> str:
    """The commit lk3d's source tree is at (``-dirty`` with uncommitted changes), "unknown" where
    there is no git checkout; ``LK3D_GIT_COMMIT`` overrides (a copied tree without .git)."""
    forced = os.environ.get("LK3D_GIT_COMMIT", "").strip()
    if forced:
        return forced
    root = Path(lk3d.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--"],
                               capture_output=True, timeout=10).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


# ---------------------------------------------------------------------------------------------
# a run
# ---------------------------------------------------------------------------------------------

def progress_bar(iterable=None, *, enabled: bool = True, **kwargs):
    """A tqdm progress bar on stderr, drawn only where ``enabled`` and stderr is a terminal
    (tqdm's ``disable=None``): a log file, a pipe or a CI job gets none. Where tqdm is missing
    (lk3d installed without its ``bench`` extra), ``iterable`` itself, or None without one; on a
    terminal a note says so."""
    try:
        from tqdm import tqdm
    except ImportError:
        if enabled and sys.stderr.isatty():
            print("no progress bar: it needs tqdm (pip install 'lk3d[bench]')", file=sys.stderr,
                  flush=True)
        return iterable
    return tqdm(iterable, disable=None if enabled else True, file=sys.stderr, dynamic_ncols=True,
                **kwargs)


def run(cases: Sequence[Case], device=None, providers: Sequence[str] = PROVIDERS,
        modes: Optional[Sequence[str]] = None, budget_s: Optional[float] = None,
        min_run_time: Optional[float] = None, max_time_s: Optional[float] = None,
        isolate: bool = True, progress: bool = True, huge_pages: bool = True) -> list:
    """Benchmark ``cases`` on ``device`` (default: cuda if available, else cpu); one ``Result``
    per (case, mode, provider) for the providers of each case's op that are in ``providers``
    and ``available`` here, in that order. ``modes`` defaults to fwd+fwdbwd on CUDA and fwd on
    the CPU (the CPU backward of large kernels takes seconds to minutes per call). With
    ``isolate``, measurements run in a worker process, on the CPU with PyTorch's huge pages for
    large tensors unless ``huge_pages`` is False (``worker_env``, ``lk3d.cpu_memory``)."""
    device = torch.device(device if device is not None else default_device())
    dev = device.type
    if dev not in ("cpu", "cuda"):
        raise ValueError(f"device: expected cpu or cuda, got {device}")
    if dev == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but torch.cuda.is_available() is False")
    modes = tuple(modes) if modes is not None else (("fwd", "fwdbwd") if dev == "cuda"
                                                    else ("fwd",))
    for name, given, allowed in (("providers", providers, PROVIDERS), ("modes", modes, MODES)):
        bad = [v for v in given if v not in allowed]
        if bad or not given:
            raise ValueError(f"{name}: expected a non-empty subset of {allowed}, "
                             f"got {tuple(given)}")
    budget_s = DEFAULT_BUDGET_S[dev] if budget_s is None else float(budget_s)
    min_run_time = DEFAULT_MIN_RUN_TIME_S[dev] if min_run_time is None else float(min_run_time)
    hard_timeout = 1.5 * budget_s + _START_ALLOWANCE_S
    deadline = None if max_time_s is None else time.monotonic() + max_time_s

    env = dict(device=device_name(device), torch=torch.__version__, triton=triton_version(),
               lk3d=lk3d.__version__, commit=git_commit(),
               timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    runner = Worker(env=worker_env(dev, huge_pages)) if isolate else InProcess()
    dtypes = list(dict.fromkeys(c.dtype for c in cases))
    measured = {c: [p for p in OP_PROVIDERS[c.op] if p in providers and available(p, c, dev)]
                for c in cases}
    bar = progress_bar(total=len(dtypes) + sum(1 + len(measured[c]) * len(modes) for c in cases),
                       enabled=progress, unit="step", leave=False)

    def step(label, fn, args):
        if bar is not None:
            bar.set_description(label)
        if deadline is not None and time.monotonic() > deadline:
            outcome = ("skipped", SKIPPED_TIME_LIMIT)
        else:
            outcome = runner.call(fn, args, hard_timeout)
        if bar is not None:
            bar.update()
        return outcome

    results = []
    try:
        ceilings = {}
        for dtype in dtypes:  # first, on an idle machine; None where it fails or times out
            kind, value = step(f"ceilings {dtype}", roofline.measure_ceilings_by_name,
                               (dev, dtype))
            ceilings[dtype] = value if kind == "ok" else None
        for case in cases:
            kind, value = step(f"{case.name} check", check_case, (case, dev))
            rel_err, plans = value if kind == "ok" else (None, {})
            for mode in modes:
                timed = {}
                for provider in measured[case]:
                    kind, value = step(f"{case.name} {provider} {mode}", measure_case,
                                       (case, provider, mode, dev, budget_s, min_run_time))
                    if kind == "ok":
                        ms, mem = value
                        timed[provider] = (ms, mem, "ok" if ms is not None else SKIPPED_BUDGET)
                    elif kind == "timeout":
                        timed[provider] = (None, None, SKIPPED_BUDGET)
                    elif kind == "skipped":
                        timed[provider] = (None, None, value)
                    else:
                        timed[provider] = (None, None, f"error: {value}")
                results += _rows(case, mode, timed, rel_err, _algo(plans, mode),
                                 ceilings[case.dtype], env)
    finally:
        runner.close()
        if bar is not None:
            bar.close()
    return results


def _algo(plans, mode):
    if mode == "fwd":
        return plans.get("forward", "")
    passes = [plans.get(k, "?") for k in ("forward", "grad_input", "grad_weight")]
    return "" if not plans else passes[0] if len(set(passes)) == 1 else "/".join(passes)


def is_baseline(provider: str) -> bool:
    """Providers not from lk3d: the ones a speedup is measured against."""
    return not provider.startswith("lk3d")


def _rows(case, mode, timed, rel_err, algo, ceilings, env):
    ran = {p: ms for p, (ms, _, _) in timed.items() if is_baseline(p) and ms is not None}
    baseline = min(ran, key=ran.get) if ran else ""
    rows = []
    for provider in timed:
        ms, mem, status = timed[provider]
        seconds = None if ms is None else ms * 1e-3
        rows.append(Result(
            case=case.name, op=case.op, shape=case.shape, dtype=case.dtype, provider=provider,
            mode=mode, median_ms=ms,
            tflops=None if ms is None else case.flops(mode) / seconds / 1e12,
            speedup=None if ms is None or not baseline else ran[baseline] / ms,
            roofline_fraction=roofline.roofline_fraction(case.flops(mode), case.bytes(mode),
                                                         seconds, ceilings),
            peak_mem_mb=mem, baseline=baseline, rel_err=rel_err if provider == "lk3d" else None,
            algo=algo if provider == "lk3d" else FORCED_ALGO.get(provider, ""), status=status,
            ceiling_tflops=None if ceilings is None else ceilings.flops_per_s / 1e12,
            ceiling_gbps=None if ceilings is None else ceilings.bytes_per_s / 1e9, **env))
    return rows


def tolerance(dtype: str, device: str) -> float:
    if dtype == "float32" and device == "cuda" and allow_tf32():
        return TF32_TOLERANCE
    return TOLERANCE[dtype]


def accuracy_failures(results, device: str) -> list:
    """lk3d rows whose error against F.conv3d passes the dtype's tolerance (one per case)."""
    seen, bad = set(), []
    for r in results:
        if r.provider == "lk3d" and r.rel_err is not None and r.case not in seen:
            seen.add(r.case)
            if not r.rel_err <= tolerance(r.dtype, device):  # NaN fails too
                bad.append(r)
    return bad


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------

def format_table(results) -> str:
    """A plain-text table, one line per result; runs of the same case show its name once.
    ``roofline`` is the roofline fraction in percent; a ``peak MB`` column comes where any row
    measured memory (CUDA)."""
    with_mem = any(r.peak_mem_mb is not None for r in results)
    header = ("case", "provider", "mode", "ms", "TFLOP/s", "roofline", "speedup", "rel.err") + \
        (("peak MB",) if with_mem else ()) + ("algo",)
    lines = []
    last = None
    for r in results:
        ms = r.status if r.median_ms is None else f"{r.median_ms:.3f}"
        roof = "-" if r.roofline_fraction is None else f"{100 * r.roofline_fraction:.3g}%"
        mem = (table.fmt(r.peak_mem_mb, ".1f"),) if with_mem else ()
        lines.append((r.case if r.case != last else "", r.provider, r.mode, ms,
                      table.fmt(r.tflops, ".3g"), roof, table.fmt(r.speedup, ".2f", "x"),
                      table.fmt(r.rel_err, ".1e"), *mem, r.algo))
        last = r.case
    return table.format_table(header, lines, right=range(3, len(header) - 1))


def describe(results) -> str:
    """The run's context: device, versions, commit, time."""
    if not results:
        return "no results"
    r = results[0]
    ceilings = {x.dtype: (x.ceiling_tflops, x.ceiling_gbps) for x in results
                if x.ceiling_tflops is not None}
    roof = "; ".join(f"{dtype} matmul {tf:.3g} TFLOP/s, copy {gb:.3g} GB/s"
                     for dtype, (tf, gb) in ceilings.items()) or "not measured"
    return (f"device: {r.device}\ntorch {r.torch}, triton {r.triton}, lk3d {r.lk3d}, "
            f"commit {r.commit}, {r.timestamp}\nceilings (this run): {roof}")


CSV_COLUMNS = tuple(f.name for f in fields(Result))


def write_csv(results, path) -> None:
    """One row per result, every field of ``Result`` a column (wide)."""
    table.write_csv(path, CSV_COLUMNS, (asdict(r) for r in results))
