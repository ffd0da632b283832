"""Modelled against measured: ``lk3d estimate --cases SET --measured RESULTS_CSV`` sets the time
the static estimate gives lk3d's Triton kernels beside what ``lk3d bench`` measured for the same
cases (its ``results.csv``, ``lk3d.tools.report``'s long format), one line per case, for the
forward (``fwd``) and the training step (``fwdbwd``).

Modelled: per pass, the launches of its cheapest variant at their issue ceilings, summed
(``modelled_ms``: no launch overhead, no partial last wave); ``fwd`` is the forward pass,
``fwdbwd`` the forward and every gradient pass (with a bias, the grad-bias launch too).
Measured (the ``median_ms`` rows): the provider that runs lk3d's Triton kernels of the case's op
(``KERNEL_PROVIDERS``: ``lk3d-tiled`` forces them for lk3d.conv3d; the benchmark has no such
provider for CP and block-sparse, whose kernels run under ``lk3d`` where the planner picks
them), ``lk3d`` (the planner's pick) and ``torch``. A time not in the file shows as "-".
"""
import math

from lk3d.tools import report, table

MODES = ("fwd", "fwdbwd")
KERNEL_PROVIDERS = {"dense": "lk3d-tiled", "grouped": "lk3d-tiled", "depthwise": "lk3d-tiled"}
PROVIDERS = ("kernels", "lk3d", "torch")  # "kernels": the op's KERNEL_PROVIDERS entry


def modelled_ms(records) -> dict:
    """(case, mode) -> modelled ms of ``records`` (``lk3d estimate``'s): each pass's cheapest
    variant's launches summed; ``fwd`` the forward, ``fwdbwd`` every pass."""
    per_variant = {}
    for r in records:
        key = (r["case"], r["pass"], r["variant"])
        per_variant[key] = per_variant.get(key, 0.0) + r["modelled_ms"]
    per_pass = {}
    for (case, pass_, _), ms in per_variant.items():
        per_pass[case, pass_] = min(ms, per_pass.get((case, pass_), math.inf))
    out = {}
    for (case, pass_), ms in per_pass.items():
        if pass_ == "forward":
            out[case, "fwd"] = out.get((case, "fwd"), 0.0) + ms
        out[case, "fwdbwd"] = out.get((case, "fwdbwd"), 0.0) + ms
    return out


def measured_ms(results_path) -> dict:
    """(case, provider, mode) -> median ms of the ``lk3d bench`` results file ``results_path``
    (the last row of each; ``lk3d.tools.report.ReportError``, a ValueError, where it is not
    one)."""
    return {(row["case"], row["provider"], row["mode"]): row["value"]
            for row in report.read_results(results_path) if row["metric"] == "median_ms"}


def compare(records, measured) -> list:
    """One dict per case of ``records`` (in their order): ``case``, ``op``, ``kernels`` (the
    provider that runs the kernels, "" where the benchmark has none), and for each mode of
    ``MODES`` ``model_<mode>`` and ``<provider>_<mode>`` for the providers of ``PROVIDERS``
    (ms; None where not measured). ``measured``: ``measured_ms``'s, or the path of a results
    file."""
    if not isinstance(measured, dict):
        measured = measured_ms(measured)
    model = modelled_ms(records)
    rows = []
    for case in dict.fromkeys(r["case"] for r in records):
        op = next(r["op"] for r in records if r["case"] == case)
        kernels = KERNEL_PROVIDERS.get(op, "")
        row = {"case": case, "op": op, "kernels": kernels}
        for mode in MODES:
            row[f"model_{mode}"] = model.get((case, mode))
            for provider in PROVIDERS:
                name = kernels if provider == "kernels" else provider
                row[f"{provider}_{mode}"] = measured.get((case, name, mode)) if name else None
        rows.append(row)
    return rows


def format_rows(rows) -> str:
    """``compare``'s rows as a table: per mode, the modelled ms then the measured ones."""
    header = ["case", "op", "kernels"] + [f"{what} {mode}" for mode in MODES
                                          for what in ("model",) + PROVIDERS]
    lines = [[r["case"], r["op"], r["kernels"] or "-"] +
             [table.fmt(r[f"{what}_{mode}"], ".3f") for mode in MODES
              for what in ("model",) + PROVIDERS] for r in rows]
    return table.format_table(header, lines, right=range(3, len(header)))
