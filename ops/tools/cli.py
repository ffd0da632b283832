"""The ``lk3d`` command line.

    lk3d info                       versions, devices, which algorithms run where, the cache
    lk3d bench --quick              a few large-kernel layers on this machine (CPU: < 2 min); its
                                    report (CSV + plots) goes to the user's data folder, outside
                                    the checkout: <data>/lk3d/reports/<version>/<device>/quick/
                                    ($LK3D_REPORT_DIR replaces <data>/lk3d/reports); the path is
                                    printed
    lk3d bench --device cuda [--out DIR | --no-report] [--csv PATH]
                                    --out: a release report where you say, e.g.
                                    --out perf_reports/{version}/{device}
    lk3d bench --cases SET|FILE     a shipped case set (goals, quick, full, tiny) or your own
                                    layers (a JSON or YAML file)
    lk3d bench --dispatch           does auto-dispatch find the fastest path? (12 layers)
    lk3d report [--dir DIR]         redraw the plots under DIR, summarise them in DIR/README.md
                                    (default DIR: where lk3d bench writes; nothing else is touched)
    lk3d explain CASE | --input N,C,D,H,W --weight Cout,Cin/g,kd,kh,kw [--groups G ...]
                                    the plan lk3d.conv3d would use per pass, as a table
    lk3d estimate --arch 90 --input ... --weight ... [--json PATH]
                                    issue ceilings of the Triton kernels' launches, from sm_90 or
                                    sm_80 machine code compiled here (lk3d.tools.estimate)
    lk3d tune [--suite gpu|cpu] [--layers FILE.json]   measure and cache the best algorithms
    lk3d cache clear | export FILE | import FILE        manage the per-device plan cache

``python -m lk3d.tools.cli ...`` does the same where the console script is not on PATH.
"""
import argparse
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

import lk3d
from lk3d import cpu_memory
from lk3d._algos import allow_tf32
from lk3d.tools import bench, cli_explain, estimate, report

_ENV_VARS = ("TRITON_INTERPRET", "LK3D_ALGO", "LK3D_CONFIG", "LK3D_AUTOTUNE", "LK3D_CACHE_DIR",
             report.REPORT_DIR_ENV, "LK3D_FFT_MEMORY_MB", "LK3D_TEST_DEVICE", "TRITON_CACHE_DIR",
             "LK3D_WEIGHT_CACHE", "CUDA_VISIBLE_DEVICES", "THP_MEM_ALLOC_ENABLE")


# ---------------------------------------------------------------------------------------------
# lk3d info
# ---------------------------------------------------------------------------------------------

def _triton_status():
    try:
        import triton
    except Exception as e:  # ImportError, or a broken install raising something else
        return False, f"not importable ({type(e).__name__}: {e})"
    return True, f"{triton.__version__} (imports: yes)"


_EXTRAS = {"bench": ("matplotlib", "tqdm"), "decompose": ("tensorly",)}


def _extras_line():
    """Which optional dependency groups (pyproject's extras) are installed, without importing
    them."""
    parts = []
    for extra, names in _EXTRAS.items():
        found = []
        for name in names:
            try:
                found.append(f"{name} {metadata.version(name)}")
            except metadata.PackageNotFoundError:
                found.append(f"{name} missing (pip install 'lk3d[{extra}]')")
        parts.append(f"{extra}: {', '.join(found)}")
    return f"extras       {'; '.join(parts)}"


def _cuda_lines():
    if not torch.cuda.is_available():
        why = "torch built without CUDA" if torch.version.cuda is None else "no device visible"
        return [f"cuda         not available ({why})"]
    lines = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"cuda:{i}       {p.name}, sm_{p.major}{p.minor}, "
                     f"{p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
    lines.append(f"             CUDA runtime {torch.version.cuda}, "
                 f"cuDNN {torch.backends.cudnn.version()}, "
                 f"TF32 in F.conv3d: {'on' if allow_tf32() else 'off'}")
    return lines


def _candidates(device_type, dtype):
    """The algorithms lk3d.conv3d chooses among for a tensor of this device and dtype, as the ops
    layer decides it (Triton present, interpreter on); LK3D_ALGO then forces one of them."""
    from lk3d._algos import candidates

    return list(candidates(torch.empty(0, dtype=dtype, device=device_type)))


def _algorithm_lines(has_triton, interpreted):
    lines = ["algorithms   what lk3d.conv3d chooses among, per device and dtype:"]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        groups = {}
        for name, dtype in bench.DTYPES.items():
            try:
                algos = ", ".join(_candidates(dev, dtype))
            except ValueError as e:  # e.g. a bad LK3D_ALGO
                algos = f"cannot tell: {e}"
            groups.setdefault(algos, []).append(name)
        for i, (algos, names) in enumerate(groups.items()):
            lines.append(f"  {dev if i == 0 else '':<5} {'/'.join(names):<34} {algos}")
    if not torch.cuda.is_available():
        lines.append("  cuda  no device")
    if not has_triton:
        why = "Triton does not import"
    elif interpreted:
        why = "on CPU tensors in the Triton interpreter (TRITON_INTERPRET=1)"
    else:
        why = "on CUDA tensors; on CPU ones only under TRITON_INTERPRET=1"
    lines.append(f"  tiled = the Triton kernels: {why}")
    lines.append("  fft   = lk3d's overlap-save FFT (torch.fft): CPU and CUDA, every float dtype")
    lines.append("  aten  = F.conv3d (oneDNN / cuDNN): always, every dtype")
    return lines


def info_text() -> str:
    from lk3d import kernels

    has_triton, triton_txt = _triton_status()
    interpreted = bool(getattr(kernels, "INTERPRETED", False))
    interp_env = os.environ.get("TRITON_INTERPRET", "")
    huge, huge_why = cpu_memory.huge_pages()
    lines = [
        f"lk3d         {lk3d.__version__} ({os.path.dirname(lk3d.__file__)})",
        f"python       {platform.python_version()} ({platform.python_implementation()}, "
        f"{platform.platform()})",
        f"torch        {torch.__version__}",
        f"triton       {triton_txt}",
        f"interpreter  {'on' if interpreted else 'off'} (TRITON_INTERPRET={interp_env or 'unset'})",
        f"cpu          {bench.cpu_name()}, {os.cpu_count()} logical CPUs, "
        f"{torch.get_num_threads()} torch threads",
        f"huge pages   {'on' if huge else 'off'} for large CPU tensors ({huge_why})",
        _extras_line(),
        *_cuda_lines(),
        *_algorithm_lines(has_triton, interpreted),
    ]
    lines += _cache_lines()
    env = [f"{k}={os.environ[k]}" for k in _ENV_VARS if k in os.environ]
    lines.append(f"environment  {' '.join(env) if env else '(no lk3d/Triton variables set)'}")
    return "\n".join(lines)


def _cache_lines():
    from lk3d.autotune.cache import default_cache
    from lk3d.autotune.fingerprint import device_fingerprint, fingerprint_id

    cache = default_cache()
    lines = [f"plan cache   {cache.path} ({cache.entries()} entries)",
             f"reports      {report.reports_root()} (where lk3d bench writes without --out; "
             f"${report.REPORT_DIR_ENV} moves it)"]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        fp = device_fingerprint(torch.device(dev))
        lines.append(f"fingerprint  {dev}: {fingerprint_id(fp)} "
                     + ", ".join(f"{k}={v}" for k, v in fp.items() if v is not None))
    return lines


def _cmd_info(args, parser):
    print(info_text())
    return 0


# ---------------------------------------------------------------------------------------------
# lk3d bench
# ---------------------------------------------------------------------------------------------

def _subset(allowed, what):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return tuple(dict.fromkeys(items))
    parse.__name__ = what
    return parse


def _positive(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _cpu_busy(seconds=0.3):
    """The fraction of all CPUs busy over ``seconds`` (from /proc/stat), None where unknown."""
    def sample():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return sum(vals), vals[3] + vals[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def _huge_pages_note(args, device, isolated):
    """Says how CPU memory is set up for the measurements (lk3d.cpu_memory)."""
    if device != "cpu":
        return
    if isolated:
        how = ("without huge pages (--no-huge-pages)" if args.no_huge_pages else
               f"with {cpu_memory.THP_ENV}=1: PyTorch's transparent huge pages for large CPU "
               "tensors (--no-huge-pages measures without)")
        print(f"cpu memory: measured in a worker process {how}", flush=True)
    else:
        on, why = cpu_memory.huge_pages()
        print(f"cpu memory: huge pages {'on' if on else 'off'} in this process ({why})",
              flush=True)


def _cmd_bench(args, parser):
    if args.dispatch:
        return _cmd_dispatch(args, parser)
    shipped = args.cases in bench.CASE_SETS
    which = ("tiny" if args.tiny else "quick" if args.quick else args.cases if shipped
             else "file" if args.cases else "full")
    if args.cases and not shipped:
        try:
            cases = bench.load_cases(args.cases)
        except ValueError as e:
            parser.error(f"--cases: {e}")
    else:
        cases = bench.CASE_SETS[which]
    if args.filter:
        every = cases
        cases = [c for c in cases if args.filter in c.name]
        if not cases:
            names = ", ".join(c.name for c in every)
            parser.error(f"--filter {args.filter!r} matches no {which} case (cases: {names})")
    if args.list:
        for c in cases:
            print(f"{c.name:<28} {c.shape}  {c.flops('fwd') / 1e9:.1f} GFLOP fwd")
        return 0
    device = args.device or bench.default_device()
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here "
                     "(torch.cuda.is_available() is False); use --device cpu")
    if args.csv and os.path.isdir(args.csv):
        parser.error(f"--csv: expected a file path, got the directory {args.csv!r}")
    if args.no_report:
        out_dir = None
    elif args.out:
        out_dir = Path(args.out.replace("{version}", lk3d.__version__)
                       .replace("{device}", bench.device_slug(device)))
        if out_dir.is_file():
            parser.error(f"--out: expected a folder, got the file {str(out_dir)!r}")
    else:  # the user's data folder, one report per case set: never a folder of the checkout
        which_set = f"cases-{Path(args.cases).stem}" if which == "file" else which
        out_dir = bench.default_report_dir(device, which_set)

    _huge_pages_note(args, device, not args.no_isolate)
    modes = args.modes or (("fwd", "fwdbwd") if device == "cuda" else ("fwd",))
    busy = _cpu_busy() if device == "cpu" else None
    if busy is not None and busy > 0.25:
        print(f"note: other processes keep {busy:.0%} of the {os.cpu_count()} CPUs busy: "
              "they compete with the benchmark and inflate its times", flush=True)
    print(f"lk3d bench: {len(cases)} {which} case(s) on {device}, modes {','.join(modes)}, "
          f"providers {','.join(args.providers)}", flush=True)
    t0 = time.perf_counter()
    try:
        results = bench.run(cases, device=device, providers=args.providers, modes=modes,
                            budget_s=args.budget, min_run_time=args.min_run_time,
                            max_time_s=args.max_time, isolate=not args.no_isolate,
                            progress=not args.no_progress, huge_pages=not args.no_huge_pages)
    except (RuntimeError, ValueError) as e:
        print(f"lk3d bench: {e}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - t0
    print(bench.describe(results))
    print(bench.format_table(results))
    print("speedup = median of the fastest non-lk3d provider / this median (> 1: faster than "
          "all of them); roofline = max(FLOPs/matmul rate, bytes/copy rate) / time; "
          "rel.err = lk3d vs F.conv3d with the same dense kernel, same dtype")
    print(f"took {elapsed:.1f} s")
    rc = 0
    if args.csv:
        bench.write_csv(results, args.csv)
        print(f"wrote {len(results)} rows to {args.csv}")
    if out_dir is not None:
        try:
            path, pngs = report.write_report(results, out_dir)
        except (OSError, report.ReportError) as e:
            print(f"lk3d bench: cannot write the report: {e}", file=sys.stderr)
            rc = 1
        else:
            if pngs is None:
                print(f"report: {path} (plots skipped: {report.NO_MATPLOTLIB}; then "
                      f"`lk3d report --dir {path.parent}` draws them)")
            else:
                print(f"report: {path} and {len(pngs)} plot(s) in {path.parent}")
            if not args.out:
                print(f"`lk3d report` redraws the plots of every report under "
                      f"{report.reports_root()} and summarises them in its README.md")
    for r in bench.accuracy_failures(results, device):
        print(f"lk3d bench: {r.case}: lk3d differs from F.conv3d by {r.rel_err:.2e} "
              f"(tolerance {bench.tolerance(r.dtype, device):.0e} for {r.dtype})", file=sys.stderr)
        rc = 1
    for r in results:
        if r.status.startswith("error"):
            print(f"lk3d bench: {r.case} {r.provider} {r.mode}: {r.status}", file=sys.stderr)
            rc = 1
    return rc


def _cmd_report(args, parser):
    try:
        csvs, pngs, readme = report.regenerate(args.dir)  # None: report.reports_root()
    except (OSError, ImportError, report.ReportError) as e:
        print(f"lk3d report: {e}", file=sys.stderr)
        return 1
    for path in csvs:
        print(f"{path}: {sum(p.parent == path.parent for p in pngs)} plot(s)")
    print(f"summary of {len(csvs)} result file(s) in {readme}")
    return 0


def _cmd_dispatch(args, parser):
    from lk3d.tools import bench_dispatch

    device = torch.device(args.device or bench.default_device())
    shapes = bench_dispatch.grid(C=2, S=6, kernels=(3, 5)) if args.tiny else bench_dispatch.grid()
    # --tiny checks the machinery (seconds): one round, five pairs for the end-to-end ratio
    run_args = (shapes, device, not args.no_progress) + ((1, 5) if args.tiny else ())
    _huge_pages_note(args, device.type, not args.no_isolate)
    if args.no_isolate:
        rows = bench_dispatch.run(*run_args)
    else:  # in a worker, for the CPU's huge-page setting (it must be there before torch loads)
        worker = bench.Worker(env=bench.worker_env(device.type, not args.no_huge_pages))
        try:
            status, rows = worker.call(bench_dispatch.run, run_args, timeout=3600)
        finally:
            worker.close()
        if status != "ok":
            print(f"lk3d bench --dispatch: the worker failed: {status}: {rows}", file=sys.stderr)
            return 1
    print(bench_dispatch.format_rows(rows))
    worst = max(r["pick_over_best"] for r in rows)
    print(f"the plan's pick over the fastest candidate: worst {worst:.2f}x (goal: 1.10x); "
          f"lk3d.conv3d end to end: worst {max(r['auto_over_best'] for r in rows):.2f}x")
    return 0


# ---------------------------------------------------------------------------------------------
# lk3d tune / lk3d cache
# ---------------------------------------------------------------------------------------------

def _cmd_tune(args, parser):
    from lk3d.tools import sweep
    from lk3d.autotune.cache import default_cache

    if os.environ.get("LK3D_AUTOTUNE", "").strip() == "0":
        parser.error("LK3D_AUTOTUNE=0 forbids measuring; unset it to tune")
    if args.layers:
        try:
            layers = sweep.load_layers(args.layers)
        except (OSError, ValueError) as e:
            parser.error(f"--layers: {e}")
    else:
        layers = sweep.GPU_SUITE if args.suite == "gpu" else sweep.CPU_SUITE
    device = torch.device(args.device or bench.default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    before = default_cache().entries()
    rows = sweep.tune_layers(layers, device, progress=not args.no_progress)
    print(sweep.format_rows(rows))
    cache = default_cache()
    print(f"plan cache {cache.path}: {cache.entries()} entries ({cache.entries() - before} new)")
    return 0


def _cmd_cache(args, parser):
    from lk3d.autotune.cache import default_cache

    cache = default_cache()
    try:
        if args.action == "clear":
            n = cache.entries()
            cache.clear()
            print(f"cleared {n} entries from {cache.path}")
        elif args.action == "export":
            print(f"exported {cache.export(args.file)} entries to {args.file}")
        elif args.action == "import":
            print(f"imported {cache.import_(args.file)} entries into {cache.path}")
        else:
            print(f"{cache.path}: {cache.entries()} entries")
    except (OSError, ValueError) as e:
        print(f"lk3d cache {args.action}: {e}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(prog="lk3d", description="lk3d: large 3D convolution "
                                     "kernels in Triton. Commands: info, bench, report, explain, "
                                     "tune, cache.")
    sub = parser.add_subparsers(dest="command",
                                metavar="{info,bench,report,explain,tune,cache}")

    p = sub.add_parser("info", help="versions, devices, and which algorithms run where")
    p.set_defaults(func=_cmd_info, subparser=p)

    p = sub.add_parser("bench", help="time lk3d's large-kernel convolutions against torch",
                       description="Time lk3d's dense, depthwise, CP and block-sparse "
                       "convolutions against F.conv3d (NCDHW and channels_last_3d), the unfused "
                       "CP chain and the masked dense weight on large-kernel layers; prints a "
                       "table and writes the report (results.csv and plots) to the user's data "
                       "folder, <data>/lk3d/reports/<lk3d version>/<device>/<case set>/ "
                       f"(${report.REPORT_DIR_ENV} replaces <data>/lk3d/reports), never into the "
                       "current folder; it prints the path. --out DIR writes it to DIR "
                       "instead (a release report: --out perf_reports/{version}/{device}).")
    cases = p.add_mutually_exclusive_group()
    cases.add_argument("--quick", action="store_true",
                       help="a few small large-kernel layers (CPU: under 2 minutes); the same as "
                       "--cases quick")
    cases.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests
    cases.add_argument("--cases", metavar="SET|FILE",
                       help="a case set shipped in lk3d's bench_cases.json "
                       f"({', '.join(bench.CASE_SETS)}; goals: the goal cases G1-G5 on the GPU), "
                       "or a JSON (or YAML) file holding a list of case objects with the fields "
                       "of lk3d.tools.bench.Case, as in that file (default: the full set)")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="default: cuda if available, else cpu")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="DIR",
                       help="write the report (results.csv and plots) here instead of the "
                       "user's data folder; {version} and {device} in DIR become the lk3d "
                       "version and the device's folder name (e.g. --out "
                       "perf_reports/{version}/{device})")
    where.add_argument("--no-report", action="store_true", help="write no report")
    p.add_argument("--csv", metavar="PATH",
                   help="also write one row per measurement (every field, wide) to this CSV")
    p.add_argument("--modes", type=_subset(bench.MODES, "modes"),
                   help=f"comma-separated: {','.join(bench.MODES)} (default: fwd,fwdbwd on "
                   "cuda, fwd on cpu)")
    p.add_argument("--providers", type=_subset(bench.PROVIDERS, "providers"),
                   default=bench.PROVIDERS,
                   help=f"comma-separated: {','.join(bench.PROVIDERS)} (default: all; each case "
                   "runs those of its op)")
    p.add_argument("--filter", metavar="TEXT", help="only the cases whose name contains TEXT")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--budget", type=_positive, metavar="S",
                   help="seconds per measurement before it is skipped (default: cpu "
                   f"{bench.DEFAULT_BUDGET_S['cpu']:g}, cuda {bench.DEFAULT_BUDGET_S['cuda']:g})")
    p.add_argument("--min-run-time", type=_positive, metavar="S",
                   help="seconds of timed repetitions per measurement (default: cpu "
                   f"{bench.DEFAULT_MIN_RUN_TIME_S['cpu']:g}, "
                   f"cuda {bench.DEFAULT_MIN_RUN_TIME_S['cuda']:g})")
    p.add_argument("--max-time", type=_positive, metavar="S",
                   help="stop starting measurements after S seconds (the rest: skipped)")
    p.add_argument("--no-isolate", action="store_true",
                   help="measure in this process (no worker; the budget cannot stop a call)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none anyway where stderr is not a terminal)")
    p.add_argument("--no-huge-pages", action="store_true",
                   help="on the CPU, measure without PyTorch's transparent huge pages for large "
                   f"tensors (default: the worker runs with {cpu_memory.THP_ENV}=1; see "
                   "lk3d.cpu_memory)")
    p.add_argument("--dispatch", action="store_true",
                   help="the dispatch grid instead: k=3..21, dense and depthwise, every "
                   "provider and lk3d's automatic choice")
    p.set_defaults(func=_cmd_bench, subparser=p)

    p = sub.add_parser("report", help="redraw the plots of every results.csv under a folder and "
                       "summarise them in its README.md",
                       description="Redraw the plots of every results.csv under DIR (from the "
                       "CSVs only) and refresh the summary tables in DIR/README.md between "
                       f"{report.MARK_START} and {report.MARK_END}. Nothing outside DIR is "
                       "written. For the release summary: lk3d report --dir perf_reports.")
    p.add_argument("--dir", metavar="DIR",
                   help="the folder to search for results.csv (default: where lk3d bench writes, "
                   f"${report.REPORT_DIR_ENV} or <data>/lk3d/reports)")
    p.set_defaults(func=_cmd_report, subparser=p)

    cli_explain.add_parser(sub)
    estimate.add_parser(sub)

    p = sub.add_parser("tune", help="measure every algorithm on a list of layers; cache winners")
    p.add_argument("--suite", choices=("gpu", "cpu"), help="built-in layers (default: gpu on "
                   "cuda, cpu on the CPU)")
    p.add_argument("--layers", metavar="FILE", help="a JSON (or YAML) list of layers")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none anyway where stderr is not a terminal)")
    p.set_defaults(func=_cmd_tune, subparser=p)

    p = sub.add_parser("cache", help="show, clear, export or import the plan cache")
    p.add_argument("action", nargs="?", default="show",
                   choices=("show", "clear", "export", "import"))
    p.add_argument("file", nargs="?", help="the JSON file for export / import")
    p.set_defaults(func=_cmd_cache, subparser=p)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "cache" and args.action in ("export", "import") and not args.file:
        parser.error(f"cache {args.action}: expected a FILE argument")
    if args.command == "tune" and args.suite is None:
        args.suite = "gpu" if (args.device or bench.default_device()) == "cuda" else "cpu"
    return args.func(args, args.subparser)


if __name__ == "__main__":
    sys.exit(main())
