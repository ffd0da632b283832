"""The kernel ceilings shipped as data (lk3d/autotune/ceilings.json) and what reads and writes
them: their flop-weighted aggregation from ``lk3d estimate`` records, the CUDA cost models
pricing each GPU at its own SM version's fractions, ``lk3d estimate --ceilings``, ``--measured``
and ``--cases shipped``."""
import json
from importlib import resources
from pathlib import Path

import pytest
import torch

from lk3d import _algos, _block_sparse_launch
from lk3d import _cuda_model as cuda_model
from lk3d.autotune import devices
from lk3d.tools import ceilings, cli, estimate, measured, report

STATIC = Path(__file__).resolve().parent.parent / "perf_reports" / "0.1.0"
SHIPPED = resources.files("lk3d.autotune").joinpath(cuda_model.CEILINGS_FILE)


def _record(case, kind, flops, fraction, unit="tensor", pass_="forward", arch=90,
            variant="gather", ms=1.0, op="dense", dtype="bf16"):
    return {"case": case, "op": op, "pass": pass_, "variant": variant, "arch": arch,
            "dtype": dtype, "kernel": f"{kind}_kernel", "kind": kind, "unit": unit,
            "executed_flops": flops, "fraction": fraction, "modelled_ms": ms}


def test_aggregation_is_flop_weighted():
    """A kind's fraction is its 16-bit launches' FLOPs over their time at their ceilings: 4
    TFLOP at 1/2 and 1/4 of the peak -> 4 / (2 + 12); kinds the models do not price and fp32
    launches are left out."""
    records = [_record("a", "implicit_gemm", 1e12, 0.5),
               _record("b", "implicit_gemm", 3e12, 0.25, pass_="grad_input", dtype="fp16"),
               _record("f", "implicit_gemm", 3e12, 0.05, unit="fma", dtype="fp32"),
               _record("a", "depthwise", 5e11, 0.07, unit="fma"),
               _record("a", "bias_grad", 1e9, 0.02, unit="fma")]
    got = ceilings.aggregate(records)
    assert set(got) == {"implicit_gemm", "depthwise"}
    assert got["implicit_gemm"]["fraction"] == pytest.approx(4 / 14)
    assert got["implicit_gemm"]["unit"] == "tensor"
    assert got["implicit_gemm"]["from"] == ["a forward implicit_gemm_kernel",
                                            "b grad_input implicit_gemm_kernel"]
    assert got["depthwise"] == {"unit": "fma", "fraction": pytest.approx(0.07),
                                "from": ["a forward depthwise_kernel"]}
    mixed = records + [_record("c", "implicit_gemm", 1e12, 0.1, unit="fma")]
    with pytest.raises(ValueError, match="expected one unit and one arch for kind "
                                         "'implicit_gemm', got units \\['fma', 'tensor'\\]"):
        ceilings.aggregate(mixed)


@pytest.mark.parametrize("arch", devices.ARCHES)
def test_shipped_ceilings_match_the_committed_static_reports(arch):
    """Every kind the models price, for both SM versions, a fraction in (0, 1]; each the
    aggregation of the committed static report of the goal cases for that arch."""
    raw = json.loads(SHIPPED.read_text())
    assert {"what", "command"} <= set(raw["about"])
    entry = raw[str(arch)]
    assert entry["cases"] == "goals" and entry["triton"] and entry["lk3d"]
    assert entry["command"] == (f"lk3d estimate --cases goals --arch {arch} "
                                "--ceilings autotune/ceilings.json")
    shipped = cuda_model.ceilings()[arch]
    assert set(shipped) == set(cuda_model.KERNEL_KINDS)
    assert all(unit in ("tensor", "fma") and 0 < f <= 1 for unit, f in shipped.values())
    records = json.loads((STATIC / f"static-sm{arch}" / "estimate.json").read_text())
    expected = ceilings.aggregate(records)
    assert set(expected) == set(shipped)
    for kind, c in expected.items():
        assert shipped[kind] == (c["unit"], pytest.approx(c["fraction"], rel=1e-12)), kind
        assert entry["kinds"][kind]["from"] == c["from"]


def test_each_gpu_is_priced_at_its_arch_fractions():
    """An A100 at the sm_80 fractions, an H100 and an H200 at sm_90's: a compute-bound launch's
    time (less the launch) goes as 1 / (fraction · peak); a GPU the table lacks takes its
    compute capability's."""
    table = cuda_model.ceilings()
    h100, h200, a100 = (devices.named(n) for n in ("h100", "h200", "a100"))
    assert (h100.arch, h200.arch, a100.arch) == (90, 90, 80)
    assert [devices.derived("x", 10, 1e9, major).arch for major in (8, 9, 10)] == [80, 90, 90]
    flops = 1e15
    for kind in cuda_model.KERNEL_KINDS:
        unit = table[90][kind][0]
        ms = {g.name: cuda_model.kernel_ms(kind, flops, 0, g, torch.bfloat16) - cuda_model.LAUNCH_MS
              for g in (h100, a100)}
        peak = {g.name: cuda_model.unit_peak(g, unit, torch.bfloat16) for g in (h100, a100)}
        at = {arch: min(table[arch][kind][1], cuda_model.SUSTAINED_FRACTION) for arch in (90, 80)}
        expected = (at[90] * peak[h100.name]) / (at[80] * peak[a100.name])
        assert ms[a100.name] / ms[h100.name] == pytest.approx(expected, rel=1e-9), kind
        assert cuda_model.kernel_ceiling(kind, h200) == table[90][kind]
    # the planner's dense forward on a compute-bound layer the gather kernel serves (24
    # channels: not a multiple of 16 for the tensor-descriptor kernel): the same ratio
    args = ([1, 24, 64, 64, 64], [24, 24, 15, 15, 15], [1] * 3, [7] * 6, [1] * 3, 1,
            torch.bfloat16)
    ratio = (_algos.model_ms("tiled", *args, a100) - cuda_model.LAUNCH_MS) / (
        _algos.model_ms("tiled", *args, h100) - cuda_model.LAUNCH_MS)
    assert ratio == pytest.approx(table[90]["implicit_gemm"][1] * 989.4
                                  / (table[80]["implicit_gemm"][1] * 312), rel=1e-9)
    # block-sparse: each pass's step efficiency from the arch's two kernels
    for gpu in (h100, a100):
        assert _block_sparse_launch._step_efficiency_16("grad_values", gpu) == pytest.approx(
            table[gpu.arch]["block_sparse_16x16_wgrad"][1]
            / table[gpu.arch]["implicit_gemm_wgrad"][1])
    odd = devices.Figures(**dict(h100.as_dict(), arch=75))
    with pytest.raises(ValueError, match="arch: expected one of \\[80, 90\\] .* got 75"):
        cuda_model.kernel_ms("implicit_gemm", flops, 0, odd, torch.bfloat16)


def test_depthwise_kernels_priced_by_the_kernel_that_serves_them():
    """Depthwise passes that the channels-innermost kernels serve are priced at their ceilings
    ("depthwise_cl", "depthwise_cl_wgrad") plus the copies of an NCDHW caller's operands they
    read; a channel multiplier of 2 at the kernel that serves it ("depthwise")."""
    gpu = devices.named("h100")
    x, geo = [2, 16, 24, 24, 24], ([1] * 3, [3] * 6, [1] * 3)
    flops = 2 * 2 * 16 * 24 ** 3 * 7 ** 3
    moved = 2 * (2 * 2 * 16 * 24 ** 3 + 16 * 7 ** 3)
    copy = cuda_model.copy_ms(2 * 2 * 2 * 16 * 24 ** 3, gpu)
    for op in ("conv3d", "conv3d_grad_input"):
        got = _algos.model_ms("tiled", x, [16, 1, 7, 7, 7], *geo, 16, torch.bfloat16, gpu, op=op)
        assert got == pytest.approx(cuda_model.kernel_ms("depthwise_cl", flops, moved, gpu,
                                                         torch.bfloat16) + copy)
    got = _algos.model_ms("tiled", x, [16, 1, 7, 7, 7], *geo, 16, torch.bfloat16, gpu,
                          op="conv3d_grad_weight")
    assert got == pytest.approx(cuda_model.kernel_ms("depthwise_cl_wgrad", flops, moved, gpu,
                                                     torch.bfloat16) + 2 * copy - cuda_model.LAUNCH_MS)
    got = _algos.model_ms("tiled", x, [32, 1, 7, 7, 7], *geo, 16, torch.bfloat16, gpu)
    assert got == pytest.approx(cuda_model.kernel_ms(
        "depthwise", 2 * flops, 2 * (2 * 2 * 16 * 24 ** 3 + 2 * 2 * 16 * 24 ** 3 + 32 * 7 ** 3),
        gpu, torch.bfloat16))


def test_dense_priced_by_the_kernel_that_serves_it():
    """Dense passes the tensor-descriptor kernels serve (16 channels) are priced at their
    ceilings ("implicit_gemm_desc", "implicit_gemm_desc_wgrad", at most the sustained fraction)
    plus the NDHWC copies (and the forward's and grad-input's weight packing); 24 channels and
    block-sparse's dense reference (``gathered``) at the gather kernels' ("implicit_gemm",
    "implicit_gemm_wgrad")."""
    gpu = devices.named("h100")
    geo = ([1] * 3, [2] * 6, [1] * 3, 1, torch.bfloat16, gpu)
    for c, kind in ((16, "implicit_gemm_desc"), (24, "implicit_gemm")):
        x, w = [2, c, 20, 20, 20], [c, c, 5, 5, 5]
        flops = 2 * 2 * c * 20 ** 3 * c * 125
        moved = 2 * (2 * 2 * c * 20 ** 3 + c * c * 125)
        extra = cuda_model.copy_ms(2 * 2 * (2 * c * 20 ** 3 + c * c * 125), gpu) if c == 16 else 0
        for op in ("conv3d", "conv3d_grad_input"):
            got = _algos.model_ms("tiled", x, w, *geo, op=op)
            assert got == pytest.approx(cuda_model.kernel_ms(kind, flops, moved, gpu,
                                                             torch.bfloat16) + extra), (c, op)
            got = _algos.model_ms("tiled", x, w, *geo, op=op, gathered=True)
            assert got == pytest.approx(cuda_model.kernel_ms("implicit_gemm", flops, moved, gpu,
                                                             torch.bfloat16)), (c, op)
        # grad-weight: both operands copied to NDHWC (read and written) at 16 channels
        kind = "implicit_gemm_desc_wgrad" if c == 16 else "implicit_gemm_wgrad"
        extra = cuda_model.copy_ms(2 * 2 * (2 * 2 * c * 20 ** 3), gpu) if c == 16 else 0
        got = _algos.model_ms("tiled", x, w, *geo, op="conv3d_grad_weight")
        assert got == pytest.approx(cuda_model.kernel_ms(kind, flops, moved, gpu,
                                                         torch.bfloat16) + extra), c
        got = _algos.model_ms("tiled", x, w, *geo, op="conv3d_grad_weight", gathered=True)
        assert got == pytest.approx(cuda_model.kernel_ms("implicit_gemm_wgrad", flops, moved,
                                                         gpu, torch.bfloat16))


_KIND_OF_PASS = {"forward": ("implicit_gemm", 0.3), "grad_input": ("implicit_gemm", 0.3),
                 "grad_weight": ("implicit_gemm_wgrad", 0.2), "grad_bias": ("bias_grad", 0.02)}


def _fake_estimate(conv, arch, passes=None, case_id=None, device=None):
    """Records without compiling (``test_estimate_command_sm90`` compiles): 1 ms per launch,
    2 launches in the forward; CP's and block-sparse's passes as lk3d.conv3d's grad-weight."""
    records = []
    for p in passes or conv.passes:
        kind, fraction = _KIND_OF_PASS.get(p, _KIND_OF_PASS["grad_weight"])
        records += [dict(_record(case_id, kind, 1e12, fraction, pass_=p, arch=arch, ms=1.0,
                                 op=conv.op),
                         dtype=conv.dtype, config={}, grid=[1], registers=32, spill_bytes=0,
                         shared_bytes=0, loop_instructions=10, loop_counts={"HGMMA": 1},
                         bytes=1, useful_flops=1, peak_tflops=989.4,
                         issue_ceiling_tflops=fraction * 989.4)
                    for _ in range(2 if p == "forward" else 1)]
    return records


def test_ceilings_option_writes_an_entry_the_model_loads(tmp_path, monkeypatch, capsys):
    """``--ceilings`` over a cases file of one tiny dense case: the sm_90 entry holds its kinds,
    the sm_80 entry already there is kept, and the model prices an H100 from the file while the
    kinds it lacks are named."""
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([{"name": "t", "op": "dense", "N": 1, "Cin": 16, "Cout": 16,
                                  "size": 5, "kernel": 3, "dtype": "bfloat16"}]))
    path = tmp_path / "ceilings.json"
    shipped = json.loads(SHIPPED.read_text())
    path.write_text(json.dumps({"80": shipped["80"]}))
    monkeypatch.setattr(estimate, "estimate", _fake_estimate)
    assert cli.main(["estimate", "--cases", str(cases), "--arch", "90", "--ceilings",
                     str(path)]) == 0
    out = capsys.readouterr().out
    assert f"wrote the sm_90 kernel ceilings to {path}" in out
    missing = [k for k in cuda_model.KERNEL_KINDS
               if k not in ("implicit_gemm", "implicit_gemm_wgrad")]
    assert f"no bf16/fp16 launches of {', '.join(missing)}" in out
    data = json.loads(path.read_text())
    assert list(data) == ["about", "90", "80"] and data["80"] == shipped["80"]
    assert data["90"]["command"] == f"lk3d estimate --cases {cases} --arch 90 --ceilings {path}"
    assert data["90"]["kinds"] == {
        "implicit_gemm": {"unit": "tensor", "fraction": pytest.approx(0.3),
                          "from": ["t forward implicit_gemm_kernel"] * 2
                          + ["t grad_input implicit_gemm_kernel"]},
        "implicit_gemm_wgrad": {"unit": "tensor", "fraction": pytest.approx(0.2),
                                "from": ["t grad_weight implicit_gemm_wgrad_kernel"]}}
    h100, a100 = devices.named("h100"), devices.named("a100")
    assert cuda_model.kernel_ceiling("implicit_gemm", h100, path) == ("tensor",
                                                                      pytest.approx(0.3))
    assert cuda_model.kernel_ceiling("cp_fused", a100, path) == cuda_model.ceilings()[80][
        "cp_fused"]
    ms = cuda_model.kernel_ms("implicit_gemm", 1e15, 0, h100, torch.bfloat16, path=path)
    assert ms == pytest.approx(1e3 * 1e15 / (0.3 * h100.tensor_16) + cuda_model.LAUNCH_MS)
    with pytest.raises(ValueError, match="kind: expected one of \\['implicit_gemm', "
                                         "'implicit_gemm_wgrad'\\] .* got 'cp_fused'"):
        cuda_model.kernel_ceiling("cp_fused", h100, path)
    path.write_text(json.dumps({"90": {"kinds": {"x": {"unit": "tensor", "fraction": 1.5}}}}))
    with pytest.raises(ValueError, match="sm_90 x: expected unit 'tensor' or 'fma' and a "
                                         "fraction in \\(0, 1\\], got 'tensor', 1.5"):
        cuda_model.ceilings(path)


def _results_csv(path, rows):
    env = dict(device="d", torch="t", triton="t", lk3d="l", commit="c", timestamp="s")
    lines = [",".join(report.COLUMNS)]
    for case, provider, mode, ms in rows:
        values = dict(case=case, provider=provider, mode=mode, metric="median_ms",
                      value=repr(ms), **env)
        lines.append(",".join(values[c] for c in report.COLUMNS))
    path.write_text("\n".join(lines) + "\n")


def test_measured_lines(tmp_path, monkeypatch, capsys):
    """``--measured``: one line per case, the modelled fwd (the forward's launches) and
    fwd+bwd (every pass, the cheapest variant of each) beside the kernels' provider, lk3d and
    torch from a results file; what is not in it shows as "-"."""
    results = tmp_path / "results.csv"
    _results_csv(results, [("G3-k7", "lk3d-tiled", "fwd", 2.5), ("G3-k7", "lk3d", "fwd", 2.0),
                           ("G3-k7", "torch", "fwdbwd", 9.0), ("G4", "lk3d", "fwd", 7.0),
                           ("G4", "torch", "fwd", 11.0)])
    monkeypatch.setattr(estimate, "estimate", _fake_estimate)
    assert cli.main(["estimate", "--cases", "goals", "--measured", str(results)]) == 0
    out = capsys.readouterr().out.split("modelled (sm_90 ceilings) vs measured")[1]
    lines = {line.split()[0]: line.split() for line in out.splitlines()[3:]}
    # G3-k7 (with a bias): forward 2 launches; + grad_input, grad_weight, grad_bias
    assert lines["G3-k7"] == ["G3-k7", "dense", "lk3d-tiled", "2.000", "2.500", "2.000", "-",
                              "5.000", "-", "-", "9.000"]
    assert lines["G4"] == ["G4", "cp", "-", "2.000", "-", "7.000", "11.000", "3.000", "-", "-",
                           "-"]
    assert len(lines) == 9
    # the function: the cheaper of two variants of a pass counts
    records = [_record("c", "implicit_gemm", 1, 0.5, variant="a", ms=3.0),
               _record("c", "implicit_gemm", 1, 0.5, variant="b", ms=1.0),
               _record("c", "implicit_gemm", 1, 0.5, variant="b", ms=1.5),
               _record("c", "implicit_gemm_wgrad", 1, 0.5, pass_="grad_weight", ms=4.0)]
    (row,) = measured.compare(records, {("c", "lk3d-tiled", "fwdbwd"): 8.0})
    assert (row["model_fwd"], row["model_fwdbwd"], row["kernels_fwdbwd"], row["lk3d_fwd"]) == (
        2.5, 6.5, 8.0, None)
    other = tmp_path / "other.csv"
    other.write_text("case,ms\nG1,3.0\n")
    with pytest.raises(report.ReportError, match="not an lk3d results file"):
        measured.measured_ms(other)


def test_shipped_case_set(monkeypatch, capsys):
    """``--cases shipped``: every case of the shipped sets once, the first of each name."""
    from lk3d.tools.bench_cases import CASE_SETS

    cases = estimate.cases_of("shipped")
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    assert set(names) == {c.name for s in CASE_SETS.values() for c in s}
    assert estimate.cases_of("goals") == CASE_SETS["goals"]
    monkeypatch.setattr(estimate, "estimate", _fake_estimate)
    assert cli.main(["estimate", "--cases", "shipped"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{name} " in out for name in names)
