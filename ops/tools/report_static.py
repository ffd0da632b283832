"""The static report of ``lk3d estimate --cases SET --out DIR``: ``estimate.json`` (the records), ``about.json`` (the Triton and
lk3d versions and the device the ceilings assume),
``estimate.csv`` (one row per kernel launch, the loop counts as ``OPCODE:count`` words) and
``fraction.png``, each launch's issue ceiling as a fraction of its unit's peak, by case and pass
(matplotlib, the ``bench`` extra; without it the plot is skipped and said so)."""
import csv
import json
from pathlib import Path

COLUMNS = ("case", "op", "pass", "variant", "arch", "dtype", "kernel", "kind", "grid", "registers",
           "spill_bytes", "shared_bytes", "loop_instructions", "loop_counts", "unit",
           "peak_tflops", "issue_ceiling_tflops", "fraction", "modelled_ms", "useful_flops",
           "executed_flops", "bytes", "config")


def _cell(key, value):
    if key == "loop_counts":
        return " ".join(f"{op}:{n}" for op, n in sorted(value.items(), key=lambda kv: -kv[1]))
    if key in ("grid", "config"):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, float):
        return f"{value:.4g}"
    return value


def _about(arch) -> dict:
    from importlib.metadata import version

    from lk3d.autotune.fingerprint import lk3d_version
    from lk3d.tools.estimate import device_figures

    return {"arch": arch, "device": device_figures(arch)["name"], "triton": version("triton"),
            "lk3d": lk3d_version()}


def write(records, out, arch) -> list:
    """Write the report of ``records`` (``estimate.estimate``'s, for ``sm_<arch>``) into the folder
    ``out`` (made if missing); returns what it says it wrote, a line per file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "estimate.json").write_text(json.dumps(records, indent=1) + "\n")
    (out / "about.json").write_text(json.dumps(_about(arch), indent=1) + "\n")
    with open(out / "estimate.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows([_cell(k, r[k]) for k in COLUMNS] for r in records)
    said = [f"wrote {len(records)} launches to {out / 'estimate.csv'}, estimate.json and "
            "about.json"]
    try:
        import matplotlib
    except ImportError:
        return said + ["plot skipped: matplotlib is not installed (pip install 'lk3d[bench]')"]
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['case']} {r['pass']}\n{r['kernel'].removesuffix('_kernel')}" for r in records]
    colors = ["tab:blue" if r["unit"] == "tensor" else "tab:orange" for r in records]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(records)), 4.5))
    ax.bar(range(len(records)), [100 * r["fraction"] for r in records], color=colors)
    ax.set_xticks(range(len(records)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("issue ceiling, % of the unit's peak")
    ax.set_title(f"lk3d's Triton kernels on sm_{arch}: issue ceiling per launch "
                 "(blue: tensor cores, orange: FP32 FMA)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "fraction.png", dpi=120)
    plt.close(fig)
    return said + [f"wrote {out / 'fraction.png'}"]
