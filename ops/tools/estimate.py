"""``lk3d estimate``: what lk3d's Triton kernels can reach on a GPU, read from their machine code
without one.

For a convolution and each of its passes, the launches lk3d's launchers make for the arch's
default config are recorded on meta tensors and compiled ahead of time for ``sm_<arch>`` with the
JIT's specialisation (``lk3d.tools.launch_record``); registers, spills and shared memory are read
from the cubin (``lk3d.tools.aot``) and the innermost loop from the SASS (``lk3d.tools.sass``).

The **issue ceiling** (``issue_ceiling``) is the FLOP rate the kernel cannot exceed: an SM issues
at most 4 warp-instructions per clock, so a loop step of I instructions per warp on W warps takes
at least I·W/4 clocks per program, during which the program does the step's FLOPs (read off the
SASS: ``sass.step_flops``). That rate over every SM, capped by the unit's peak (tensor cores or
FP32 FMA) and by the bytes the launch must move at the device's bandwidth, is the ceiling; its
fraction of the peak says how far the kernel's code, not the memory system, keeps it from the
unit. A necessary condition only: latency and occupancy can keep a kernel below its ceiling.

    lk3d estimate --arch 90 --input 1,64,64,64,64 --weight 64,64,7,7,7 --dtype bf16 --padding same

Over a case set (``--cases goals|quick|full|tiny|shipped|FILE``, ``shipped``: every case of the
shipped sets once) it can also write the set's report (``--out``, ``lk3d.tools.report_static``),
the arch's kernel ceilings that the CUDA cost models price the kernels at (``--ceilings``,
``lk3d.tools.ceilings``) and, after the table, the modelled times beside ``lk3d bench``'s
measured ones (``--measured RESULTS_CSV``, ``lk3d.tools.measured``).
"""
import argparse
import json
import math

from lk3d.autotune import devices
from lk3d.tools import launch_record, sass


# The GPU an estimate for an arch assumes (the table and its sources: lk3d.autotune.devices).
ARCH_DEVICE = {90: "h100", 80: "a100"}
ISSUE_PER_CLOCK = 4  # warp-instructions an SM issues per clock (4 schedulers, 1 each)


def device_figures(arch, device=None):
    """SMs, clock (GHz), peaks (TFLOP/s), bandwidth (TB/s) and shared-memory limit (bytes) of the
    GPU the estimate for ``sm_<arch>`` assumes: ``device`` (a name of
    ``lk3d.autotune.devices.NAMED``, or "cuda": this machine's GPU, ``devices.of``), by default
    the arch's (``ARCH_DEVICE``)."""
    if arch not in ARCH_DEVICE:
        raise ValueError(f"arch: expected one of {sorted(ARCH_DEVICE)}, got {arch!r}")
    f = gpu_of(device or ARCH_DEVICE[arch])
    if f.arch != arch:
        raise ValueError(f"device: expected a GPU of sm_{arch} for --arch {arch}, got {f.name} "
                         f"(sm_{f.arch})")
    from lk3d.tools import aot

    return dict(name=f.name, sms=f.sms, clock_ghz=f.clock_hz / 1e9, fma_tflops=f.fma_fp32 / 1e12,
                bandwidth_tbs=f.bandwidth / 1e12,
                tensor_tflops={"bf16": f.tensor_16 / 1e12, "fp16": f.tensor_16 / 1e12,
                               "fp32": f.tensor_tf32 / 1e12},
                arch=arch, smem_limit=aot.SHARED_LIMIT[arch])


def gpu_of(name):
    """The figures (``lk3d.autotune.devices.Figures``) of a named GPU, or of this machine's
    ("cuda")."""
    if name == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("device: expected a CUDA device for 'cuda', got none on this machine")
        return devices.of("cuda")
    return devices.named(name)


def peak_tflops(device, unit, dtype):
    """The peak of ``unit`` ("tensor" or "fma") for operands of ``dtype`` ("bf16", ...)."""
    if unit == "tensor":
        return device["tensor_tflops"][dtype]
    if unit == "fma":
        return device["fma_tflops"]
    raise ValueError(f"unit: expected 'tensor' or 'fma', got {unit!r}")


def issue_ceiling(loop_instructions, num_warps, step_flops, unit, device, dtype, flops, nbytes):
    """The FLOP rates (TFLOP/s) a launch cannot exceed, as a dict: ``issue`` (``step_flops`` per
    program every ``loop_instructions`` · ``num_warps`` / 4 clocks, on every SM), ``bandwidth``
    (``flops`` over the time ``nbytes`` take at the device's bandwidth), ``peak`` (the unit's),
    ``ceiling`` (the least of the three) and ``fraction`` (ceiling / peak)."""
    clocks = loop_instructions * num_warps / ISSUE_PER_CLOCK
    issue = step_flops / clocks * device["sms"] * device["clock_ghz"] * 1e9 / 1e12
    seconds = nbytes / (device["bandwidth_tbs"] * 1e12)
    bandwidth = flops / seconds / 1e12 if seconds else math.inf
    peak = peak_tflops(device, unit, dtype)
    ceiling = min(peak, issue, bandwidth)
    return dict(issue=issue, bandwidth=bandwidth, peak=peak, ceiling=ceiling,
                fraction=ceiling / peak)


def _whole(text):
    """The whole kernel as one step, for a kernel whose SASS has no loop."""
    body = tuple(sass.parse(text))
    return sass.Loop(body[0].address, body[-1].address, body)


def estimate(conv, arch, passes=None, case_id=None, device=None):
    """One record per launch of lk3d's Triton kernels for each of ``passes`` (default: all of
    the op's) of ``conv`` (a ``launch_record.Conv``) on ``sm_<arch>``, with the keys ``lk3d
    estimate --json`` writes. ``modelled_ms`` is the launch's executed FLOPs at its ceiling (no
    launch overhead, no tail of a partial last wave). ``device``: the GPU whose figures the
    ceilings take (``device_figures``)."""
    from lk3d.tools import aot

    device = device_figures(arch, device)
    planned = []
    for pass_ in passes or conv.passes:
        for variant, config, recorded in launch_record.variants(conv, pass_, arch):
            planned += [(pass_, variant, config, ln) for ln in recorded]
    compiled = launch_record.compile_launches([ln for *_, ln in planned], arch)
    records = []
    for (pass_, variant, config, ln), kernel in zip(planned, compiled):
        if isinstance(kernel, Exception):
            raise kernel
        usage = aot.resource_usage(kernel)
        text = aot.sass(kernel)
        loop = sass.innermost_loop(text) or _whole(text)
        step, unit = sass.step_flops(loop, ln.num_warps)
        executed, nbytes = launch_record.executed_flops(ln), launch_record.launch_bytes(ln)
        r = issue_ceiling(loop.instructions, ln.num_warps, step, unit, device, conv.dtype,
                          executed, nbytes)
        records.append({
            "case": case_id or conv.id, "op": conv.op, "pass": pass_, "variant": variant,
            "arch": arch, "dtype": conv.dtype, "kernel": ln.name,
            "kind": launch_record.kernel_kind(ln), "config": ln.config or config,
            "grid": list(ln.grid), "registers": usage.registers,
            "spill_bytes": usage.spill_bytes, "shared_bytes": usage.shared_bytes,
            "loop_instructions": loop.instructions, "loop_counts": loop.counts(),
            "executed_flops": executed,
            "useful_flops": launch_record.useful_flops(conv, pass_),
            "bytes": nbytes, "unit": unit,
            "peak_tflops": r["peak"], "issue_ceiling_tflops": r["ceiling"],
            "fraction": r["fraction"], "modelled_ms": executed / (r["ceiling"] * 1e12) * 1e3})
    return records


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def table(records):
    """The records as a text table, one line per launch (led by the case where there are
    several)."""
    width = max(len(r["case"]) for r in records) if len({r["case"] for r in records}) > 1 else 0
    header = (f"{'case':<{width}} " if width else "") + (
        f"{'pass':<12} {'kernel':<24} {'grid':>8} {'regs':>4} {'smem':>6} {'loop':>5} "
        f"{'hot':<16} {'unit':<6} {'peak':>7} {'ceiling':>8} {'frac':>6} {'ms':>8}")
    lines = [header, "-" * len(header)]
    for r in records:
        unit_ops = sass.TENSOR_OPS if r["unit"] == "tensor" else sass.FMA_OPS
        hot = ", ".join(f"{n} {op}" for op, n in r["loop_counts"].items() if op in unit_ops)
        lines.append((f"{r['case']:<{width}} " if width else "") +
                     f"{r['pass']:<12} {r['kernel']:<24} {math.prod(r['grid']):>8} "
                     f"{r['registers']:>4} {r['shared_bytes']:>6} {r['loop_instructions']:>5} "
                     f"{hot:<16} {r['unit']:<6} {r['peak_tflops']:>7.1f} "
                     f"{r['issue_ceiling_tflops']:>8.2f} {r['fraction']:>6.1%} "
                     f"{r['modelled_ms']:>8.2f}")
    return "\n".join(lines)


def run(args, parser):
    if args.device and (args.out or args.ceilings):
        parser.error("--device: expected without --out and --ceilings (the reports and the "
                     "shipped ceilings are for the arch's named GPU)")
    if args.arch is None:
        try:
            args.arch = gpu_of(args.device).arch if args.device else 90
        except ValueError as e:
            parser.error(str(e))
    if args.cases:
        return _run_cases(args, parser)
    if args.input is None or args.weight is None:
        parser.error("expected --input and --weight (one convolution), or --cases")
    for option in ("out", "ceilings", "measured"):
        if getattr(args, option):
            parser.error(f"--{option}: expected with --cases (a set of cases)")
    conv = launch_record.Conv(args.input, args.weight, args.dtype,
                              1 if args.stride is None else args.stride,
                              0 if args.padding is None else args.padding,
                              1 if args.dilation is None else args.dilation, args.groups or 1,
                              args.rank, args.block, args.density, args.bias)
    if (args.block is None) != (args.density is None) or (args.block and args.rank):
        parser.error("expected --block and --density together (block-sparse), or --rank (CP), "
                     "or neither")
    passes = tuple(args.passes.split(",")) if args.passes else conv.passes
    if any(p not in conv.passes for p in passes):
        parser.error(f"--passes: expected a comma-separated subset of {','.join(conv.passes)}, "
                     f"got {args.passes!r}")
    try:
        records = estimate(conv, args.arch, passes, args.case_id, args.device)
    except (TypeError, ValueError) as e:  # lk3d's argument checks name the argument
        parser.error(str(e))
    _print(records, args.arch, f"{records[0]['case']} ({conv.op}, {conv.dtype})", args.device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


def _print(records, arch, what, device=None):
    device = device_figures(arch, device)
    print(f"{what} on sm_{arch}: issue ceilings for {device['name']} ({device['sms']} SMs, "
          f"{device['clock_ghz']} GHz, {device['bandwidth_tbs']} TB/s), TFLOP/s")
    print(table(records))


def _run_cases(args, parser):
    if args.input is not None or args.weight is not None or args.case_id:
        parser.error("--cases: expected no --input, --weight or --case-id with it")
    from lk3d.tools import ceilings, measured, report_static

    times = None
    if args.measured:  # a bad results file fails before the compiles
        try:
            times = measured.measured_ms(args.measured)
        except ValueError as e:
            parser.error(f"--measured: {e}")
    try:
        records = [r for case in cases_of(args.cases)
                   for r in estimate(conv_of(case), args.arch, case_id=case.name,
                                     device=args.device)]
    except (TypeError, ValueError, OSError) as e:
        parser.error(f"--cases: {e}")
    _print(records, args.arch, f"cases {args.cases!r}", args.device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if args.out:
        for line in report_static.write(records, args.out, args.arch):
            print(line)
    if args.ceilings:
        command = (f"lk3d estimate --cases {args.cases} --arch {args.arch} "
                   f"--ceilings {args.ceilings}")
        try:
            new = ceilings.update(args.ceilings, records, args.arch, args.cases, command)
        except (ValueError, OSError) as e:
            parser.error(f"--ceilings: {e}")
        for line in ceilings.describe(new, args.arch, args.ceilings):
            print(line)
    if args.measured:
        print(f"\nmodelled (sm_{args.arch} ceilings) vs measured ({args.measured}), ms; kernels: "
              "the provider running lk3d's Triton kernels, lk3d: the planner's pick")
        print(measured.format_rows(measured.compare(records, times)))
    return 0


def cases_of(spec):
    """The benchmark cases of ``spec``: a shipped set's name (``lk3d.tools.bench_cases``:
    goals, quick, full, tiny), ``shipped`` (every case of the shipped sets, the first of each
    name) or a cases file."""
    from lk3d.tools import bench_cases

    if spec == "shipped":
        cases = {}
        for set_cases in bench_cases.CASE_SETS.values():
            for case in set_cases:
                cases.setdefault(case.name, case)
        return list(cases.values())
    if spec in bench_cases.CASE_SETS:
        return bench_cases.CASE_SETS[spec]
    return bench_cases.load_cases(spec)


_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def conv_of(case):
    """The ``launch_record.Conv`` of a benchmark case (``lk3d.tools.bench_cases.Case``)."""
    if case.dtype not in _DTYPE_NAMES:
        raise ValueError(f"case {case.name!r}: dtype: expected one of {tuple(_DTYPE_NAMES)} "
                         f"(the kernels' dtypes), got {case.dtype!r}")
    sparse = case.op == "block_sparse"
    return launch_record.Conv((case.N, case.Cin, *case.size),
                              (case.Cout, case.Cin // case.groups, *case.kernel),
                              _DTYPE_NAMES[case.dtype], 1, case.padding, 1, case.groups,
                              case.rank or None, tuple(case.block) if sparse else None,
                              case.density if sparse else None,
                              case.bias and case.op in ("dense", "depthwise"))


def _density(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def add_parser(sub):
    """The ``estimate`` subcommand of the ``lk3d`` parser's ``sub``."""
    from lk3d.tools.cli_explain import add_convolution_arguments, ints_arg, positive_arg

    p = sub.add_parser("estimate", help="issue ceilings of lk3d's Triton kernels on a GPU, from "
                       "their machine code (no GPU needed)",
                       description="Record each launch lk3d's Triton kernels make for each pass "
                       "of a convolution (the arch's default config), compile it ahead of time "
                       "for sm_80 or sm_90, count the innermost loop of its SASS and print the "
                       "issue ceiling: the FLOP/s its instructions per step allow at 4 "
                       "warp-instructions per clock per SM, capped by the unit's peak and the "
                       "bandwidth. E.g. --arch 90 --input 1,64,64,64,64 --weight 64,64,7,7,7 "
                       "--dtype bf16 --padding same.")
    p.add_argument("--arch", type=int, choices=sorted(ARCH_DEVICE),
                   help="the SM version to compile for (default: --device's, else 90)")
    p.add_argument("--device", choices=(*devices.NAMED, "cuda"),
                   help="the GPU whose figures (SMs, clock, peaks, bandwidth) the ceilings take: "
                   "a named one, or cuda (this machine's); default: the arch's "
                   f"({', '.join(f'sm_{a}: {n}' for a, n in ARCH_DEVICE.items())})")
    p.add_argument("--cases", metavar="SET|FILE",
                   help="estimate every case of a benchmark case set (goals, quick, full, tiny; "
                   "shipped: all of them) or of a cases file, instead of --input/--weight")
    add_convolution_arguments(p)
    p.add_argument("--dtype", choices=tuple(launch_record.DTYPES), default="bf16",
                   help="default: bf16")
    p.add_argument("--rank", type=positive_arg("rank"), metavar="R",
                   help="a rank-R CP kernel of the --weight's shape (lk3d.cp_conv3d)")
    p.add_argument("--block", type=ints_arg(5, "bo,bi,bd,bh,bw"), metavar="bo,bi,bd,bh,bw",
                   help="a block-sparse kernel of these blocks (lk3d.block_sparse_conv3d)")
    p.add_argument("--density", type=_density, metavar="F",
                   help="block-sparse: the fraction of blocks stored, in (0, 1]")
    p.add_argument("--bias", action="store_true",
                   help="the convolution has a bias: its backward's grad-bias launch too "
                   "(lk3d.conv3d; the pass grad_bias)")
    lr = launch_record
    p.add_argument("--passes", help=f"comma-separated (default: all: {','.join(lr.PASSES)}, "
                   f"with --bias {lr.BIAS_PASS} too; CP: "
                   f"{','.join(lr.CP_PASSES)}; block-sparse: {','.join(lr.BS_PASSES)})")
    p.add_argument("--case-id", help="the records' case (default: one made of the shapes)")
    p.add_argument("--json", metavar="PATH", help="write the records here (a JSON list)")
    p.add_argument("--out", metavar="DIR", help="with --cases: write the report here "
                   "(estimate.csv, estimate.json and a plot of each launch's fraction of peak)")
    p.add_argument("--ceilings", metavar="FILE", help="with --cases: write the arch's kernel "
                   "ceilings (each kernel kind's fraction of peak, flop-weighted over the "
                   "cases) into this JSON file, keeping the other arches' (the shipped one: "
                   "autotune/ceilings.json, from --cases goals)")
    p.add_argument("--measured", metavar="RESULTS_CSV", help="with --cases: after the table, "
                   "the modelled ms of each case (fwd, fwd+bwd) beside the ones this lk3d bench "
                   "results file measured for lk3d's kernels, lk3d and torch")
    p.set_defaults(func=run, subparser=p)
