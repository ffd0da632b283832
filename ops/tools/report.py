"""Performance reports: ``results.csv`` (long format), plots drawn from it, a README summary.

``lk3d bench`` writes ``results.csv`` and the plots beside it into a folder of the user's
(``reports_root()/<lk3d version>/<device slug>/<case set>/``: never into the checkout it may run
from), or where ``--out DIR`` says (a release report: ``perf_reports/<version>/<device>/``).
``lk3d report [--dir DIR]`` redraws the plots of every ``results.csv`` under DIR (default:
``reports_root()``) and refreshes the summary tables in ``DIR/README.md`` between
``<!-- report:start -->`` and ``<!-- report:end -->``; it writes nothing outside DIR.
Everything in a report is drawn from the CSV, never by hand.

The CSV has one row per (case, provider, mode, metric) and exactly the columns ``COLUMNS``:

    case, provider, mode, metric, value, device, torch, triton, lk3d, commit, timestamp

Metrics (``METRICS``): ``median_ms``, ``tflops``, ``speedup`` (the fastest non-lk3d provider's
median over this one), ``roofline_fraction``, ``peak_mem_mb`` (CUDA only) and ``rel_err`` (lk3d rows
only). A metric that was not measured (a skipped row, memory on the CPU) has no row. The ceilings
the roofline fractions are relative to are rows too: case ``ceiling``, mode ``-``, provider
``matmul-<dtype>`` with metric ``tflops`` and provider ``copy`` with metric ``gb_per_s``.

Plots (PNG, beside the CSV): ``speedup_vs_kernel.png`` (lk3d's speedup against the kernel size,
one panel per op, one line per mode and dtype), ``roofline_fraction.png`` (every provider, per
case), and only where such rows exist: ``time_vs_density.png`` (block-sparse cases, named with a
``density<float>`` token, e.g. ``bs-k21-C48-density0.25``: every provider's time against the
density) and ``cp_fused_vs_unfused.png`` (CP cases, named with a ``cp`` token: lk3d's CP op
against the unfused chain and the dense convolution of the same kernel). A case's op, kernel
size and dtype come from lk3d's case lists (``lk3d.tools.bench``), else from its name.

The plots need matplotlib (``pip install 'lk3d[bench]'``). Without it ``write_report`` writes the
CSV and no plots (``can_plot()`` says which), and ``plot`` / ``regenerate`` raise an ImportError
that names the extra.
"""
import csv
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from lk3d.autotune.cache import user_dir
from lk3d.tools.table import fmt, write_csv

COLUMNS = ("case", "provider", "mode", "metric", "value", "device", "torch", "triton", "lk3d",
           "commit", "timestamp")
METRICS = ("median_ms", "tflops", "speedup", "roofline_fraction", "peak_mem_mb", "rel_err")
MODES = ("fwd", "bwd", "fwdbwd")
CEILING_CASE = "ceiling"
CEILING_METRICS = ("tflops", "gb_per_s")
RESULTS_NAME = "results.csv"
REPORT_DIR_ENV = "LK3D_REPORT_DIR"
MARK_START = "<!-- report:start -->"
MARK_END = "<!-- report:end -->"
PLOTS = ("speedup_vs_kernel.png", "roofline_fraction.png", "time_vs_density.png",
         "cp_fused_vs_unfused.png")
_ENV = ("device", "torch", "triton", "lk3d", "commit", "timestamp")


class ReportError(ValueError):
    """A results file that cannot be read or drawn; the message names the file."""


NO_MATPLOTLIB = "lk3d's plots need matplotlib: pip install 'lk3d[bench]'"


def can_plot() -> bool:
    """Whether matplotlib imports here: the plots need it (the ``bench`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def reports_root() -> Path:
    """Where ``lk3d bench`` keeps its reports unless ``--out`` says otherwise, and what
    ``lk3d report`` reads by default: ``$LK3D_REPORT_DIR`` when set, else ``reports`` in the
    user's data folder (``platformdirs.user_data_dir("lk3d")``: ``~/.local/share/lk3d/reports``
    on Linux; ``lk3d.autotune.cache.user_dir``)."""
    env = os.environ.get(REPORT_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return Path(user_dir("data")) / "reports"


# ---------------------------------------------------------------------------------------------
# the CSV
# ---------------------------------------------------------------------------------------------

def long_rows(results) -> list:
    """``lk3d.tools.bench.Result`` objects as CSV rows (dicts of ``COLUMNS``): one per metric
    measured, then the ceilings of each dtype."""
    rows, ceilings = [], {}
    for r in results:
        env = {k: getattr(r, k) for k in _ENV}
        for metric in METRICS:
            value = getattr(r, metric)
            if value is not None:
                rows.append(dict(case=r.case, provider=r.provider, mode=r.mode, metric=metric,
                                 value=repr(float(value)), **env))
        if r.ceiling_tflops is not None and r.dtype not in ceilings:
            ceilings[r.dtype] = (r.ceiling_tflops, r.ceiling_gbps, env)
    for dtype, (tflops, gbps, env) in ceilings.items():
        rows.append(dict(case=CEILING_CASE, provider=f"matmul-{dtype}", mode="-", metric="tflops",
                         value=repr(float(tflops)), **env))
    if ceilings:
        _, gbps, env = next(iter(ceilings.values()))
        rows.append(dict(case=CEILING_CASE, provider="copy", mode="-", metric="gb_per_s",
                         value=repr(float(gbps)), **env))
    return rows


def write_results(results, path) -> Path:
    return write_csv(path, COLUMNS, long_rows(results))


def read_results(path) -> list:
    """The rows of a ``results.csv``, ``value`` as a float; ``ReportError`` naming the file and
    line where it is not one."""
    path = Path(path)
    try:
        f = open(path, newline="")
    except OSError as e:
        raise ReportError(f"{path}: cannot read: {e.strerror}") from None
    with f:
        reader = csv.DictReader(f)
        header = tuple(reader.fieldnames or ())
        if header != COLUMNS:
            raise ReportError(f"{path}: not an lk3d results file: expected the columns "
                              f"{','.join(COLUMNS)}, got {','.join(header) or 'nothing'}")
        rows = []
        for row in reader:
            line = reader.line_num
            if None in row or None in row.values():
                raise ReportError(f"{path}: line {line}: expected {len(COLUMNS)} fields")
            ceiling = row["case"] == CEILING_CASE
            allowed = CEILING_METRICS if ceiling else METRICS
            if row["metric"] not in allowed:
                raise ReportError(f"{path}: line {line}: metric: expected one of {allowed}, "
                                  f"got {row['metric']!r}")
            if row["mode"] not in (("-",) if ceiling else MODES):
                raise ReportError(f"{path}: line {line}: mode: expected one of {MODES}, "
                                  f"got {row['mode']!r}")
            if not row["provider"]:
                raise ReportError(f"{path}: line {line}: provider is empty")
            try:
                row["value"] = float(row["value"])
            except ValueError:
                raise ReportError(f"{path}: line {line}: value: expected a number, got "
                                  f"{row['value']!r}") from None
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# what a case is
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CaseInfo:
    op: str                  # "dense", "depthwise", or "" where unknown
    k: Optional[int]         # the largest kernel side
    dtype: str               # "" where unknown
    density: Optional[float]  # block-sparse cases


_DTYPE_TOKENS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}


def case_info(name: str) -> CaseInfo:
    """Op, kernel size and dtype of a case from lk3d's case lists, else from its name
    (``dw``/``dense`` tokens, ``k<int>``, ``fp32``/``bf16``/..., ``density<float>``)."""
    density = re.search(r"density(\d*\.?\d+)", name)
    density = float(density.group(1)) if density else None
    from lk3d.tools import bench  # the case lists; lazily, so that reading a CSV needs no torch

    for case in (c for cases in bench.CASE_SETS.values() for c in cases):
        if case.name == name:
            return CaseInfo(case.op, max(case.kernel), case.dtype, density)
    tokens = re.split(r"[-_]", name.lower())
    op = "depthwise" if "dw" in tokens or "depthwise" in tokens else \
        "dense" if "dense" in tokens or any(t.startswith("dense") for t in tokens) else \
        "cp" if "cp" in tokens else "block_sparse" if "bs" in tokens or density else ""
    k = next((int(t[1:]) for t in tokens if re.fullmatch(r"k\d+", t)), None)
    if k is None:
        k = next((int(m.group(1)) for t in tokens if (m := re.fullmatch(r"\D+(\d+)", t))
                  and t.startswith(("dense", "dw"))), None)
    dtype = next((_DTYPE_TOKENS[t] for t in tokens if t in _DTYPE_TOKENS), "")
    return CaseInfo(op, k, dtype, density)


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------

def _values(rows, metric):
    """{(case, provider, mode): value} of one metric, measurement rows only."""
    return {(r["case"], r["provider"], r["mode"]): r["value"] for r in rows
            if r["metric"] == metric and r["case"] != CEILING_CASE}


def _cases(rows):
    return list(dict.fromkeys(r["case"] for r in rows if r["case"] != CEILING_CASE))


def _ceilings_text(rows):
    parts = [f"{r['provider'].removeprefix('matmul-')} matmul {r['value']:.3g} TFLOP/s"
             for r in rows if r["case"] == CEILING_CASE and r["metric"] == "tflops"]
    parts += [f"copy {r['value']:.3g} GB/s" for r in rows
              if r["case"] == CEILING_CASE and r["metric"] == "gb_per_s"]
    return ", ".join(parts)


def _env_text(rows, key):
    return ", ".join(dict.fromkeys(r[key] for r in rows)) or "?"


def _title(rows, what):
    return f"{what}\n{_env_text(rows, 'device')}, lk3d {_env_text(rows, 'lk3d')}"


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(f"{NO_MATPLOTLIB} ({e})", name="matplotlib") from e

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    """Lay ``fig`` out and write it to ``path``; True (a plot was drawn)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _dress(ax, xlabel=None, ylabel=None, legend_size=8, **grid):
    """Label ``ax``'s axes, draw a light grid (``grid``: ``axis`` and ``which`` of
    ``Axes.grid``) and its legend."""
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3, **grid)
    ax.legend(fontsize=legend_size)


def _plot_speedup(plt, rows, path):
    speedup = _values(rows, "speedup")
    lines = defaultdict(lambda: defaultdict(list))  # op -> (mode, dtype) -> [(k, speedup)]
    for (case, provider, mode), value in speedup.items():
        info = case_info(case)
        if provider == "lk3d" and info.k is not None and info.op in ("dense", "depthwise"):
            lines[info.op][(mode, info.dtype or "?")].append((info.k, value))
    if not lines:
        return False
    ops = [op for op in ("dense", "depthwise") if op in lines]
    fig, axes = plt.subplots(1, len(ops), figsize=(5.5 * len(ops), 4.2), squeeze=False)
    for ax, op in zip(axes[0], ops):
        for (mode, dtype), points in sorted(lines[op].items()):
            ks = sorted({k for k, _ in points})
            geo = [math.exp(sum(math.log(v) for kk, v in points if kk == k)
                            / sum(1 for kk, _ in points if kk == k)) for k in ks]
            (line,) = ax.plot(ks, geo, marker="o", label=f"{mode} {dtype}")
            ax.scatter([k for k, _ in points], [v for _, v in points], s=12,
                       color=line.get_color(), alpha=0.5)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="fastest non-lk3d")
        values = [v for points in lines[op].values() for _, v in points] + [1.0]
        if max(values) / min(values) > 8:  # e.g. the interpreter's 1e-4x: a log axis
            ax.set_yscale("log", base=2)
        else:
            ax.set_ylim(0, 1.1 * max(values))
        ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.3g}x"))
        ax.set_xticks(sorted({k for points in lines[op].values() for k, _ in points}))
        ax.set_title(op)
        _dress(ax, "kernel size k (k×k×k)", "lk3d speedup over the fastest non-lk3d provider",
               which="both")
    fig.suptitle(_title(rows, "lk3d speedup vs kernel size (geometric mean per k, dots: cases)"),
                 fontsize=10)
    return _save(fig, path)


def _plot_roofline(plt, rows, path):
    roof = _values(rows, "roofline_fraction")
    if not roof:
        return False
    labels = list(dict.fromkeys((c, m) for (c, _, m) in roof))
    providers = list(dict.fromkeys(p for (_, p, _) in roof))
    height = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * len(labels) * max(2, len(providers))))
    for i, provider in enumerate(providers):
        ys = [j + (i - (len(providers) - 1) / 2) * height for j in range(len(labels))]
        xs = [100 * roof.get((c, provider, m), 0.0) for c, m in labels]
        ax.barh(ys, xs, height=height, label=provider)
    ax.axvline(100, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels([f"{c} ({m})" for c, m in labels], fontsize=8)
    ax.invert_yaxis()
    _dress(ax, "fraction of the roofline (%): max(FLOPs/peak FLOP/s, bytes/peak B/s) / time",
           axis="x")
    ceilings = _ceilings_text(rows)
    ax.set_title(_title(rows, "roofline fraction per case"
                        + (f"\nceilings, same run: {ceilings}" if ceilings else "")), fontsize=9)
    return _save(fig, path)


def _plot_density(plt, rows, path):
    ms = _values(rows, "median_ms")
    lines = defaultdict(list)  # (case family, provider, mode) -> [(density, ms)]
    for (case, provider, mode), value in ms.items():
        density = case_info(case).density
        if density is not None:
            family = re.sub(r"[-_]?density\d*\.?\d+", "", case)
            lines[(family, provider, mode)].append((density, value))
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (family, provider, mode), points in sorted(lines.items()):
        points.sort()
        ax.plot([d for d, _ in points], [v for _, v in points], marker="o",
                label=f"{family} {provider} {mode}")
    ax.set_yscale("log")
    _dress(ax, "block density", "median time (ms)", legend_size=7, which="both")
    ax.set_title(_title(rows, "block-sparse: time vs density"), fontsize=10)
    return _save(fig, path)


def _plot_cp(plt, rows, path):
    ms = {k: v for k, v in _values(rows, "median_ms").items() if case_info(k[0]).op == "cp"}
    providers = list(dict.fromkeys(p for (_, p, _) in ms))
    if not providers:
        return False
    labels = list(dict.fromkeys((c, m) for (c, _, m) in ms))
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * len(providers)), 4.5))
    for i, provider in enumerate(providers):
        xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [ms.get((c, provider, m), 0.0) for c, m in labels], width=width,
               label=provider)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([f"{c}\n({m})" for c, m in labels], fontsize=8)
    _dress(ax, ylabel="median time (ms)", axis="y")
    ax.set_title(_title(rows, "CP kernel: lk3d vs the unfused chain vs dense F.conv3d"),
                 fontsize=10)
    return _save(fig, path)


_DRAW = {"speedup_vs_kernel.png": _plot_speedup, "roofline_fraction.png": _plot_roofline,
         "time_vs_density.png": _plot_density, "cp_fused_vs_unfused.png": _plot_cp}


def plot(csv_path, rows=None) -> list:
    """Draw the plots of one ``results.csv`` beside it; returns the PNGs written. A plot with
    nothing to draw is not written (and a stale one of that name is removed). ImportError naming
    the ``bench`` extra where matplotlib is missing."""
    csv_path = Path(csv_path)
    rows = read_results(csv_path) if rows is None else rows
    plt = _pyplot()
    written = []
    for name, draw in _DRAW.items():
        out = csv_path.parent / name
        try:
            drawn = draw(plt, rows, out)
        except Exception as e:  # a plot that cannot be drawn names its CSV
            raise ReportError(f"{csv_path}: cannot draw {name}: {type(e).__name__}: {e}") from e
        finally:
            plt.close("all")
        if drawn:
            written.append(out)
        else:
            out.unlink(missing_ok=True)
    return written


# ---------------------------------------------------------------------------------------------
# the README summary
# ---------------------------------------------------------------------------------------------

def summary_table(rows, title: str, plots: Sequence[str] = ()) -> str:
    """Markdown: a heading, the device and versions, the plots, then one line per (case, mode)
    with lk3d's median, the fastest non-lk3d provider's, lk3d's speedup and roofline fraction."""
    ms, speedup = _values(rows, "median_ms"), _values(rows, "speedup")
    roof = _values(rows, "roofline_fraction")
    out = [f"### {title}", "",
           f"{_env_text(rows, 'device')}; torch {_env_text(rows, 'torch')}, "
           f"triton {_env_text(rows, 'triton')}, lk3d {_env_text(rows, 'lk3d')}, "
           f"commit {_env_text(rows, 'commit')}, {_env_text(rows, 'timestamp')}."]
    ceilings = _ceilings_text(rows)
    if ceilings:
        out[-1] += f" Ceilings measured in the same run: {ceilings}."
    if plots:
        out.append("")
        out.append("Plots: " + ", ".join(f"[{Path(p).stem.replace('_', ' ')}]({p})"
                                         for p in plots) + ".")
    out += ["", "| case | mode | lk3d ms | best other ms | speedup | roofline fraction |",
            "|---|---|---:|---:|---:|---:|"]
    modes = list(dict.fromkeys(m for (_, _, m) in ms)) or list(MODES)
    for case in _cases(rows):
        for mode in modes:
            keys = [k for k in ms if k[0] == case and k[2] == mode]
            if not keys and (case, "lk3d", mode) not in roof:
                continue
            torch_ms = {k[1]: ms[k] for k in keys if not k[1].startswith("lk3d")}
            best = min(torch_ms, key=torch_ms.get) if torch_ms else None
            best_txt = f"{torch_ms[best]:.3f} ({best})" if best else "-"
            lk = (case, "lk3d", mode)
            roof_txt = "-" if lk not in roof else f"{100 * roof[lk]:.3g}%"
            out.append(f"| {case} | {mode} | {fmt(ms.get(lk), '.3f')} | {best_txt} | "
                       f"{fmt(speedup.get(lk), '.2f', 'x')} | {roof_txt} |")
    return "\n".join(out)


def update_readme(readme, body: str) -> Path:
    """Put ``body`` between the report markers of ``readme`` (appending a section with the
    markers where there are none; creating the file where there is none)."""
    readme = Path(readme)
    text = readme.read_text() if readme.exists() else "# lk3d benchmark reports\n"
    block = f"{MARK_START}\n{body.strip()}\n{MARK_END}"
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start < 0 and end < 0:
        text = text.rstrip("\n") + "\n\n## Results\n\n" + block + "\n"
    elif start < 0 or end < start:
        raise ReportError(f"{readme}: expected {MARK_START} before {MARK_END}, "
                          "or neither of them")
    else:
        text = text[:start] + block + text[end + len(MARK_END):]
    readme.write_text(text)
    return readme


def find_results(root) -> list:
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{root}: no such folder")
    return sorted(root.rglob(RESULTS_NAME))


def regenerate(root=None, readme=None):
    """Redraw the plots of every ``results.csv`` under ``root`` (default: ``reports_root()``) and
    refresh the summary in ``root/README.md``; returns ``(csv paths, png paths, readme path)``.
    Where matplotlib is missing, an ImportError naming the ``bench`` extra, before anything is
    written."""
    _pyplot()
    root = reports_root() if root is None else Path(root)
    csvs = find_results(root)
    if not csvs:
        raise ReportError(f"{root}: no {RESULTS_NAME} under it (run `lk3d bench` first)")
    readme = root / "README.md" if readme is None else Path(readme)
    sections, pngs = [], []
    for path in csvs:
        rows = read_results(path)
        drawn = plot(path, rows)
        pngs += drawn
        title = path.parent.relative_to(root).as_posix()
        links = [Path(os.path.relpath(p, readme.parent)).as_posix() for p in drawn]
        sections.append(summary_table(rows, title, links))
    body = ("Generated by `lk3d report` from the `results.csv` files below (do not edit by "
            "hand; rerun it). Speedup: the fastest non-lk3d provider's median over lk3d's (> 1: "
            "lk3d is faster). Roofline fraction: max(FLOPs / matmul FLOP/s, bytes / copy bandwidth) "
            "over the measured time.\n\n" + "\n\n".join(sections))
    update_readme(readme, body)
    return csvs, pngs, readme


def write_report(results, out_dir) -> tuple:
    """What ``lk3d bench`` leaves: ``out_dir/results.csv`` and its plots; returns
    ``(csv path, png paths)``, the PNGs None where matplotlib is missing (no plots; the CSV is
    written all the same, and ``lk3d report`` draws them once the ``bench`` extra is installed)."""
    path = write_results(results, Path(out_dir) / RESULTS_NAME)
    return path, (plot(path) if can_plot() else None)
