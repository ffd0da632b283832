"""``lk3d explain``: the plan lk3d would use for each pass of a convolution, given as a case of
``lk3d bench``'s sets or by its shapes; nothing runs and no input is allocated."""
import argparse
import json

import torch

import lk3d
from lk3d.autotune import devices
from lk3d.tools import bench, explain_device


def _int_list(text):
    """The comma-separated ints of ``text``; () where one is not an int."""
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        return ()


def ints_arg(count, what):
    """An argparse type: ``count`` comma-separated positive ints (``what`` names them)."""
    def parse(text):
        values = _int_list(text)
        if len(values) != count or min(values) < 1:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated positive ints "
                                             f"({what}), got {text!r}")
        return values
    parse.__name__ = what
    return parse


def positive_arg(name):
    """An argparse type: one positive int."""
    def parse(text):
        return ints_arg(1, name)(text)[0]
    parse.__name__ = name
    return parse


def triple_arg(name, minimum):
    """An argparse type: an int or 3 comma-separated ints, each >= ``minimum``."""
    def parse(text):
        values = _int_list(text)
        if len(values) not in (1, 3) or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum} or 3 of them, "
                                             f"comma-separated, got {text!r}")
        return values[0] if len(values) == 1 else values
    parse.__name__ = name
    return parse


def padding_arg(text):
    if text in ("same", "valid"):
        return text
    try:
        return triple_arg("padding", 0)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'same', 'valid', an int >= 0 or 3 of them, "
                                         f"comma-separated, got {text!r}") from None


def _stand_in(shape, dtype, device):
    """A tensor of this shape, dtype and device that holds one element (zero strides): the
    plan depends on nothing else, and a real [2, 48, 96³] input would take 340 MB."""
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


_RAW_ONLY = ("input", "weight", "groups", "stride", "padding", "dilation", "rank")


def _case(name, parser):
    """The case of lk3d bench's sets (``bench.CASE_SETS``) named ``name``."""
    cases = {c.name: c for cs in bench.CASE_SETS.values() for c in cs}
    if name not in cases:
        parser.error(f"case: expected one of lk3d bench's cases ({', '.join(cases)}), "
                     f"got {name!r}")
    return cases[name]


def _explain_case(name, dtype, device, parser):
    """The plans of a case of lk3d bench's sets (``bench.CASE_SETS``)."""
    case = _case(name, parser)
    dtype = dtype or case.torch_dtype
    x = _stand_in((case.N, case.Cin, *case.size), dtype, device)
    if case.op == "cp":
        g = torch.Generator().manual_seed(0)
        factors = lk3d.CPFactors(*(torch.randn(n, case.rank, generator=g).to(device, dtype)
                                   for n in (case.Cout, case.Cin, *case.kernel)))
        return str(lk3d.cp.explain(x, factors, None, 1, case.padding, 1))
    w_shape = (case.Cout, case.Cin // case.groups, *case.kernel)
    if case.op == "block_sparse":
        g = torch.Generator().manual_seed(0)
        dense = torch.randn(w_shape, generator=g).to(device, dtype)
        weight = lk3d.BlockSparseWeight.from_dense(dense, case.block, density=case.density)
        return str(lk3d.block_sparse.plans(x, weight, None, 1, case.padding, 1,
                                           case.groups))
    return str(lk3d.explain(x, _stand_in(w_shape, dtype, device), None, 1, case.padding, 1,
                            case.groups))


def _check_rank(args, parser):
    """--rank needs a dense kernel: --weight's Cin/g equal to --input's C, groups 1."""
    cin = args.input[1]
    cout, cig = args.weight[:2]
    if cig != cin or (args.groups or 1) != 1:
        given = ",".join(map(str, args.weight)) + (
            "" if args.groups is None else f" and --groups {args.groups}")
        parser.error(f"--rank: a CP kernel is dense (groups 1): expected --weight "
                     f"{cout},{cin},... (Cin = {cin}), got {given}")


def _named_passes(args, dtype, parser):
    """``(case label, {pass: plan})`` on the named GPU ``args.device``, modelled."""
    gpu = devices.named(args.device)
    if args.case is not None:
        return args.case, explain_device.case_passes(args.device, _case(args.case, parser), dtype)
    if args.input is None or args.weight is None:
        parser.error("expected a case (lk3d bench --list names them) or both --input and "
                     "--weight")
    dtype = dtype or torch.float32
    geometry = dict(stride=args.stride or 1, padding=args.padding or 0,
                    dilation=args.dilation or 1)
    label = (f"input {','.join(map(str, args.input))} weight {','.join(map(str, args.weight))}"
             + "".join(f" {k} {v}" for k, v in geometry.items())
             + f" {str(dtype).replace('torch.', '')}")
    if args.rank is not None:
        _check_rank(args, parser)
        return f"{label} rank {args.rank}", explain_device.cp_passes(
            gpu, args.input, args.weight[0], args.rank, args.weight[2:], dtype, **geometry)
    return label + f" groups {args.groups or 1}", explain_device.conv3d_passes(
        gpu, args.input, args.weight, dtype, groups=args.groups or 1, **geometry)


def _run_named(args, dtype, parser):
    try:
        label, passes = _named_passes(args, dtype, parser)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    print(explain_device.table(args.device, label, passes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "case": label, "passes": passes}, f, indent=1)
    return 0


def run(args, parser):
    args.case = args.case if args.case is not None else args.case_option
    dtype = bench.DTYPES[args.dtype] if args.dtype else None
    raw = [f"--{n}" for n in _RAW_ONLY if getattr(args, n) is not None]
    if args.case is not None and raw:
        parser.error(f"expected a case or shapes, got the case {args.case!r} and "
                     f"{', '.join(raw)}")
    if args.device in devices.NAMED:
        return _run_named(args, dtype, parser)
    if args.json:
        parser.error(f"--json: expected --device one of {', '.join(devices.NAMED)} (the "
                     f"modelled plans of a named GPU), got --device {args.device or 'local'}")
    device = torch.device(bench.default_device() if args.device in (None, "local")
                          else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here "
                     "(torch.cuda.is_available() is False); use --device cpu")
    try:
        if args.case is not None:
            print(_explain_case(args.case, dtype, device, parser))
            return 0
        if args.input is None or args.weight is None:
            parser.error("expected a case (lk3d bench --list names them) or both --input and "
                         "--weight")
        dtype = dtype or torch.float32
        x = _stand_in(args.input, dtype, device)
        geometry = (1 if args.stride is None else args.stride,
                    0 if args.padding is None else args.padding,
                    1 if args.dilation is None else args.dilation)
        if args.rank is not None:
            _check_rank(args, parser)
            cout, cin, *kernel = args.weight
            factors = lk3d.CPFactors(*(torch.ones(k, args.rank, dtype=dtype, device=device)
                                       for k in (cout, cin, *kernel)))
            print(lk3d.cp.explain(x, factors, None, *geometry))
        else:
            w = _stand_in(args.weight, dtype, device)
            print(lk3d.explain(x, w, None, *geometry, args.groups or 1))
    except (TypeError, ValueError) as e:  # lk3d's own argument checks name the argument
        parser.error(str(e))
    return 0


def add_convolution_arguments(p, required=False):
    """``--input``, ``--weight``, ``--groups``, ``--stride``, ``--padding``, ``--dilation``: one
    convolution's shapes and geometry, as ``lk3d explain`` and ``lk3d estimate`` take them."""
    p.add_argument("--input", type=ints_arg(5, "N,C,D,H,W"), metavar="N,C,D,H,W",
                   required=required)
    p.add_argument("--weight", type=ints_arg(5, "Cout,Cin/groups,kd,kh,kw"),
                   metavar="Cout,Cin/g,kd,kh,kw", required=required)
    p.add_argument("--groups", type=positive_arg("groups"), metavar="G", help="default: 1")
    p.add_argument("--stride", type=triple_arg("stride", 1), metavar="S",
                   help="an int or 3 (default: 1)")
    p.add_argument("--padding", type=padding_arg, metavar="P",
                   help="same, valid, an int or 3 (default: 0)")
    p.add_argument("--dilation", type=triple_arg("dilation", 1), metavar="D",
                   help="an int or 3 (default: 1)")


def add_parser(sub):
    """The ``explain`` subcommand of the ``lk3d`` parser's ``sub``."""
    p = sub.add_parser("explain", help="the plan lk3d would use for a convolution, per pass",
                       description="Print the plan lk3d would use for each pass of a "
                       "convolution (forward, grad-input, grad-weight; CP: forward, backward; "
                       "block-sparse: forward, grad-input, grad-values): "
                       "the algorithm, where the choice came from (forced, cache, seed, measured, "
                       "model), the launch config and the measured or modelled milliseconds per "
                       "candidate. Nothing runs and no input is allocated. Give a case of lk3d "
                       "bench's sets (lk3d bench --list, --quick --list) or the shapes, e.g. "
                       "--input 2,48,96,96,96 --weight 48,1,7,7,7 --groups 48 --padding same.")
    p.add_argument("case", nargs="?", help="a case name of lk3d bench's sets")
    p.add_argument("--case", dest="case_option", metavar="ID",
                   help="the same, as an option (e.g. a goal case: G1, G3-k7, G5-d10)")
    add_convolution_arguments(p)
    p.add_argument("--rank", type=positive_arg("rank"), metavar="R",
                   help="a rank-R CP kernel of the --weight's shape (lk3d.cp_conv3d)")
    p.add_argument("--dtype", choices=tuple(bench.DTYPES),
                   help="default: the case's, else float32")
    p.add_argument("--device", choices=("local", "cpu", "cuda", *devices.NAMED),
                   help="default (local): cuda if available, else cpu; a named GPU ("
                   + ", ".join(devices.NAMED) + "): its plans as modelled from its figures, "
                   "on any machine")
    p.add_argument("--json", metavar="PATH", help="with a named GPU: write {device, case, "
                   "passes: {pass: {algorithm, source, candidates_ms}}} to PATH")
    p.set_defaults(func=run, subparser=p)
