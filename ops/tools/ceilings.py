"""The kernel ceilings the CUDA cost models price lk3d's Triton kernels at, from ``lk3d estimate``'s
records: ``lk3d estimate --cases goals --arch ARCH --ceilings autotune/ceilings.json`` regenerates
the arch's entry of the file shipped as ``lk3d/autotune/ceilings.json`` (read by
``lk3d._cuda_model.ceilings``) and keeps the other arches'.

One kernel kind (``lk3d._cuda_model.KERNEL_KINDS``; a launch's kind is
``launch_record.kernel_kind``) gets one fraction of its unit's peak: its 16-bit launches'
executed FLOPs over their time at their ceilings, ``sum(flops) / sum(flops / fraction)``, so the
launches that do the most work weigh the most and the modelled time of the whole set is what the
launches' ceilings give. Only the bf16/fp16 launches count (``DTYPES``: the goal cases' dtype; an
fp32 launch without TF32 runs its products on the FMA units, another unit); the models apply the
fractions to every dtype. The file:

    {"about": {"what": ..., "command": ...},
     "90": {"device": ..., "cases": "goals", "triton": ..., "lk3d": ..., "command": ...,
            "kinds": {"implicit_gemm": {"unit": "tensor", "fraction": 0.28,
                                        "from": ["G3-k7 forward conv3d_igemm_kernel", ...]},
                      ...}},
     "80": {...}}
"""
import json
from pathlib import Path

from lk3d import _cuda_model

ABOUT = {
    "what": "The fraction of its unit's peak (tensor cores or FP32 FMA) each kernel kind of "
            "lk3d's Triton kernels reaches at most on each SM version: the issue ceilings of its "
            "launches over the goal cases, read from their SASS without a GPU, flop-weighted "
            "(sum of executed FLOPs over their time at the launches' ceilings). The CUDA cost "
            "models price the kernels at these rates until a GPU measures them.",
    "command": "lk3d estimate --cases goals --arch 90 --ceilings autotune/ceilings.json "
               "(and --arch 80)",
}


DTYPES = ("bf16", "fp16")  # the launches the ceilings are read from


def aggregate(records, kinds=_cuda_model.KERNEL_KINDS) -> dict:
    """Kind -> {"unit", "fraction", "from"} over the ``DTYPES`` records of ``records``
    (``lk3d estimate``'s, one arch) for each of ``kinds`` that one of them has: the fraction is
    ``sum(executed_flops) / sum(executed_flops / fraction)``, "from" names the records (case,
    pass, kernel). A kind whose records differ in unit or arch is an error."""
    out = {}
    for kind in kinds:
        mine = [r for r in records if r["kind"] == kind and r["dtype"] in DTYPES]
        if not mine:
            continue
        units = {r["unit"] for r in mine}
        arches = {r["arch"] for r in mine}
        if len(units) > 1 or len(arches) > 1:
            raise ValueError(f"records: expected one unit and one arch for kind {kind!r}, got "
                             f"units {sorted(units)} and arches {sorted(arches)}")
        flops = sum(r["executed_flops"] for r in mine)
        time = sum(r["executed_flops"] / r["fraction"] for r in mine)
        out[kind] = {"unit": units.pop(), "fraction": flops / time,
                     "from": [f"{r['case']} {r['pass']} {r['kernel']}" for r in mine]}
    return out


def entry(records, arch, cases, command) -> dict:
    """The file's entry for ``sm_<arch>`` from ``records`` of the case set ``cases``."""
    from importlib.metadata import version

    from lk3d.autotune.fingerprint import lk3d_version
    from lk3d.tools.estimate import device_figures

    if any(r["arch"] != arch for r in records):
        raise ValueError(f"records: expected every one for arch {arch}, got "
                         f"{sorted({r['arch'] for r in records})}")
    return {"device": device_figures(arch)["name"], "cases": cases, "triton": version("triton"),
            "lk3d": lk3d_version(), "command": command, "kinds": aggregate(records)}


def update(path, records, arch, cases, command) -> dict:
    """Write the ``sm_<arch>`` entry made of ``records`` into the ceilings file ``path`` (made
    where missing), keeping the other arches' entries; returns the entry."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    new = entry(records, arch, cases, command)
    arches = {k: v for k, v in data.items() if k != "about"}
    arches[str(arch)] = new
    data = {"about": ABOUT, **dict(sorted(arches.items(), key=lambda kv: -int(kv[0])))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return new


def describe(new, arch, path) -> list:
    """Lines saying what ``update`` wrote: each kind's fraction, and the model's kinds the
    records did not cover."""
    lines = [f"wrote the sm_{arch} kernel ceilings to {path}:"]
    lines += [f"  {kind:<24} {c['unit']:<6} {c['fraction']:7.2%} of peak "
              f"({len(c['from'])} launches)" for kind, c in new["kinds"].items()]
    missing = [k for k in _cuda_model.KERNEL_KINDS if k not in new["kinds"]]
    if missing:
        lines.append(f"  no {'/'.join(DTYPES)} launches of {', '.join(missing)}: the cost "
                     "models cannot price these from this file")
    return lines
