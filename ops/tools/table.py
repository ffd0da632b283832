"""Tables of the tools: aligned plain text for the terminal, CSV for files."""
import csv
from pathlib import Path


def fmt(value, spec, suffix=""):
    """``value`` formatted by ``spec`` with ``suffix``; "-" where it is None."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(header, rows, right=()) -> str:
    """``header`` and ``rows`` (sequences of strings) as aligned columns two spaces apart under a
    rule of dashes; the columns whose indices are in ``right`` are right-aligned."""
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]

    def join(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([join(header), join(["-" * w for w in widths])] + [join(r) for r in rows])


def write_csv(path, columns, rows) -> Path:
    """``rows`` (dicts keyed by ``columns``; None is written as empty) as a CSV file at ``path``
    (its folder made where missing); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return path
