"""Performance reports: the roofline arithmetic, ``results.csv`` from a tiny bench, its plots,
``lk3d report`` and the README summary.

The bench runs the hidden ``--tiny`` cases in this process (under the Triton interpreter on the
CPU, which conftest switches on), forward only, once for the module.
"""
import csv
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

import lk3d
from lk3d.tools import bench, report, roofline
from lk3d.tools.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def reports_in_tmp(tmp_path, monkeypatch):
    """`lk3d bench` writes its report to the user's data folder unless told otherwise: here,
    a folder of the test's own."""
    monkeypatch.setenv(report.REPORT_DIR_ENV, str(tmp_path / "reports"))


# ---------------------------------------------------------------------------------------------
# roofline arithmetic, checked by hand
# ---------------------------------------------------------------------------------------------

def test_conv3d_flops_hand_checked():
    # N=1, C 2->3, groups 1, 4³ output, k=3: 2·N·Cout·(4·4·4)·(Cin/g)·27 = 2·1·3·64·2·27 = 20736
    assert roofline.conv3d_flops(1, 2, 3, 1, (4, 4, 4), (3, 3, 3), "fwd") == 20736
    # fwdbwd: grad-input and grad-weight are each one more convolution of that size
    assert roofline.conv3d_flops(1, 2, 3, 1, (4, 4, 4), (3, 3, 3), "fwdbwd") == 3 * 20736
    # depthwise C=2 (groups 2, Cin/g = 1): 2·1·2·64·1·27 = 6912
    assert roofline.conv3d_flops(1, 2, 2, 2, (4, 4, 4), (3, 3, 3)) == 6912
    # anisotropic, N=2, C 4->6, groups 2: 2·2·6·(2·3·5)·2·(1·3·5) = 21600
    assert roofline.conv3d_flops(2, 4, 6, 2, (2, 3, 5), (1, 3, 5)) == 21600


def test_conv3d_bytes_hand_checked():
    # N=1, C 2->3, 4³ in and out ("same"), k=3, fp32:
    #   x = 1·2·64 = 128, w = 3·2·27 = 162, b = 3, y = 3·64 = 192 elements
    #   fwd: read x, w, b, write y = 485 elements = 1940 bytes
    assert roofline.conv3d_bytes(1, 2, 3, 1, (4, 4, 4), (4, 4, 4), (3, 3, 3), "fwd") == 1940
    #   backward: read x, w, grad_y (128 + 162 + 192) and write grad_x, grad_w, grad_b
    #   (128 + 162 + 3): 775 more elements, 1260 in all = 5040 bytes
    assert roofline.conv3d_bytes(1, 2, 3, 1, (4, 4, 4), (4, 4, 4), (3, 3, 3), "fwdbwd") == 5040
    assert roofline.conv3d_bytes(1, 2, 3, 1, (4, 4, 4), (4, 4, 4), (3, 3, 3), "bwd") == 775 * 4
    # a weight stored as 10 elements instead of 162 (CP factors, sparse blocks): 152 fewer
    assert roofline.conv3d_bytes(1, 2, 3, 1, (4, 4, 4), (4, 4, 4), (3, 3, 3), "fwd",
                                 weight_elems=10) == 1940 - 152 * 4
    # CP rank 2, 2 -> 3 channels, 3³ kernel, 4³ out: 2·64·2·(2 + 9 + 3) = 3584 FLOPs
    assert roofline.cp_flops(1, 2, 3, 2, (4, 4, 4), (3, 3, 3)) == 3584
    assert roofline.cp_flops(1, 2, 3, 2, (4, 4, 4), (3, 3, 3), "bwd") == 2 * 3584
    # no bias, bf16 (2 bytes): fwd 128 + 162 + 192 = 482 elements = 964 bytes
    assert roofline.conv3d_bytes(1, 2, 3, 1, (4, 4, 4), (4, 4, 4), (3, 3, 3), "fwd",
                                 bias=False, elem_size=2) == 964
    # depthwise C=2, "valid": 6³ in, 4³ out: x = 2·216 = 432, w = 2·27 = 54, b = 2,
    # y = 2·64 = 128: 616 elements = 2464 bytes
    assert roofline.conv3d_bytes(1, 2, 2, 2, (6, 6, 6), (4, 4, 4), (3, 3, 3)) == 2464


def test_case_uses_the_roofline_helpers():
    case = bench.Case.dense("c", 1, 2, 3, 4, 3)  # the hand-checked layer above
    assert case.flops("fwd") == 20736 and case.bytes("fwd") == 1940
    assert case.bytes("fwdbwd") == 5040
    valid = bench.Case("v", "depthwise", 1, 2, 2, 2, (6, 6, 6), (3, 3, 3), padding="valid")
    assert valid.bytes("fwd") == 2464
    half = bench.Case.dense("h", 1, 2, 3, 4, 3, dtype="bfloat16")
    assert half.bytes("fwd") == 1940 // 2


def test_roofline_fraction_hand_checked():
    c = roofline.Ceilings(flops_per_s=1e9, bytes_per_s=1e9)
    # compute-bound: 20736 FLOPs at 1 GFLOP/s = 20.736 µs (bytes: 1.94 µs); measured 41.472 µs
    assert roofline.roofline_fraction(20736, 1940, 41.472e-6, c) == pytest.approx(0.5)
    # memory-bound: with 1 TFLOP/s the bytes bound (1.94 µs) wins; measured 1.94 µs -> 1.0
    fast = roofline.Ceilings(flops_per_s=1e12, bytes_per_s=1e9)
    assert roofline.roofline_fraction(20736, 1940, 1.94e-6, fast) == pytest.approx(1.0)
    assert roofline.roofline_fraction(20736, 1940, None, c) is None
    assert roofline.roofline_fraction(20736, 1940, 1e-6, None) is None


def test_roofline_argument_errors():
    with pytest.raises(ValueError, match="mode"):
        roofline.conv3d_flops(1, 2, 3, 1, (4, 4, 4), (3, 3, 3), "back")
    with pytest.raises(ValueError, match="groups=2"):
        roofline.conv3d_bytes(1, 3, 4, 2, (4, 4, 4), (4, 4, 4), (3, 3, 3))


def test_measure_ceilings_cpu():
    c = roofline.measure_ceilings("cpu")
    assert c.dtype == "float32"
    assert math.isfinite(c.flops_per_s) and c.flops_per_s > 1e8
    assert math.isfinite(c.bytes_per_s) and c.bytes_per_s > 1e8


def test_device_slug_and_default_dir(tmp_path, monkeypatch):
    assert bench.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert bench.slug("  Intel(R) Xeon(R)  ") == "intel-r-xeon-r"
    cpu = bench.device_slug("cpu")
    assert cpu.endswith(f"-{torch.get_num_threads()}t") and cpu == bench.slug(cpu)
    monkeypatch.setenv(report.REPORT_DIR_ENV, str(tmp_path / "mine"))
    assert report.reports_root() == tmp_path / "mine"
    assert bench.default_report_dir("cpu", "quick") == (tmp_path / "mine" / lk3d.__version__ / cpu
                                                        / "quick")
    monkeypatch.delenv(report.REPORT_DIR_ENV)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))  # platformdirs on Linux
    import platformdirs
    root = Path(platformdirs.user_data_dir("lk3d")) / "reports"
    assert report.reports_root() == root
    assert bench.default_report_dir("cpu", "cases-My File") == (root / lk3d.__version__ / cpu
                                                                / "cases-my-file")


def test_case_info():
    assert report.case_info("dw-N1-C16-D32-k21") == report.CaseInfo("depthwise", 21, "float32",
                                                                    None)
    assert report.case_info("dense7-C64-D32-fp32").op == "dense"  # from the case list
    assert report.case_info("dense7-C64-D32-fp32").k == 7
    assert report.case_info("bs-dense-k21-bf16-density0.25") == report.CaseInfo(
        "dense", 21, "bfloat16", 0.25)
    assert report.case_info("something-else") == report.CaseInfo("", None, "", None)
    assert report.case_info("cp-R8-k21").op == "cp"
    assert report.case_info("bs-k7-density0.5") == report.CaseInfo("block_sparse", 7, "", 0.5)


# ---------------------------------------------------------------------------------------------
# a tiny bench, its CSV and plots, and `lk3d report`
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """``lk3d bench --tiny`` (forward, this process) into a tmp folder: that folder."""
    out = tmp_path_factory.mktemp("reports") / lk3d.__version__ / "tiny-device"
    dev = "cuda" if torch.cuda.is_available() and _test_device() == "cuda" else "cpu"
    rc = main(["bench", "--tiny", "--no-progress", "--no-isolate", "--min-run-time", "0.01",
               "--budget", "600", "--modes", "fwd", "--device", dev, "--out", str(out)])
    assert rc == 0
    return out


def _test_device():
    import os
    return os.environ.get("LK3D_TEST_DEVICE", "cpu")


def _png_ok(path):
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_bench_writes_a_well_formed_results_csv(tiny_report):
    path = tiny_report / "results.csv"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == report.COLUMNS == (
        "case", "provider", "mode", "metric", "value", "device", "torch", "triton", "lk3d",
        "commit", "timestamp")
    on_cuda = _test_device() == "cuda"
    for r in rows:
        assert all(r[c] for c in report.COLUMNS), r
        assert math.isfinite(float(r["value"])), r
        assert r["torch"] == torch.__version__ and r["lk3d"] == lk3d.__version__
        assert r["triton"] == bench.triton_version()
    metrics = {(r["case"], r["provider"], r["mode"], r["metric"]) for r in rows}
    for case in bench.TINY_CASES:
        for provider in [p for p in bench.OP_PROVIDERS[case.op]
                         if bench.available(p, case, "cuda" if on_cuda else "cpu")]:
            expected = {"median_ms", "tflops", "speedup", "roofline_fraction"}
            expected |= {"rel_err"} if provider == "lk3d" else set()
            expected |= {"peak_mem_mb"} if on_cuda else set()
            got = {m for (c, p, mode, m) in metrics if (c, p, mode) == (case.name, provider,
                                                                       "fwd")}
            assert got == expected, (case.name, provider)
    ceilings = [r for r in rows if r["case"] == report.CEILING_CASE]
    assert {(r["provider"], r["metric"]) for r in ceilings} == {
        (f"matmul-{bench.TINY_CASES[0].dtype}", "tflops"), ("copy", "gb_per_s")}
    assert all(float(r["value"]) > 0 for r in ceilings)
    assert report.read_results(path)  # and it reads back


def test_bench_draws_the_plots(tiny_report):
    for name in report.PLOTS:  # the tiny set has dense, depthwise, CP and block-sparse cases
        assert _png_ok(tiny_report / name), name


def test_report_regenerates_plots_and_readme(tiny_report, tmp_path, capsys):
    root = tmp_path / "perf_reports"
    folder = root / lk3d.__version__ / "tiny-device"
    shutil.copytree(tiny_report, folder)
    for png in folder.glob("*.png"):
        png.unlink()
    readme = root / "README.md"
    readme.write_text(f"# perf_reports\n\nintro\n\n{report.MARK_START}\nold\n{report.MARK_END}\n"
                      "\nafter\n")

    assert main(["report", "--dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "summary of 1 result file(s)" in out
    for name in ("speedup_vs_kernel.png", "roofline_fraction.png"):
        assert _png_ok(folder / name), name
    text = readme.read_text()
    assert text.startswith("# perf_reports\n\nintro\n") and text.endswith("\nafter\n")
    assert "old" not in text
    inside = text[text.index(report.MARK_START):text.index(report.MARK_END)]
    assert f"### {lk3d.__version__}/tiny-device" in inside
    assert "| case | mode | lk3d ms | best other ms | speedup | roofline fraction |" in inside
    for case in bench.TINY_CASES:
        assert f"| {case.name} | fwd |" in inside
    assert f"({lk3d.__version__}/tiny-device/speedup_vs_kernel.png)" in inside

    assert main(["report", "--dir", str(root)]) == 0  # idempotent: one block, same text
    assert readme.read_text().count(report.MARK_START) == 1
    assert readme.read_text() == text


def test_report_appends_markers_to_a_readme_without_them(tiny_report, tmp_path):
    shutil.copytree(tiny_report, tmp_path / "0.0" / "dev")
    (tmp_path / "README.md").write_text("# mine\n")
    report.regenerate(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("# mine\n") and text.count(report.MARK_START) == 1
    assert text.rstrip().endswith(report.MARK_END)


@pytest.mark.parametrize("content, message", [
    ("case,provider,value\nx,lk3d,1\n", "not an lk3d results file"),
    (",".join(report.COLUMNS) + "\nx,lk3d,fwd,median_ms,fast,d,t,tr,l,c,ts\n",
     "line 2: value: expected a number"),
    (",".join(report.COLUMNS) + "\nx,lk3d,fwd,bogus,1,d,t,tr,l,c,ts\n", "line 2: metric"),
    (",".join(report.COLUMNS) + "\nx,lk3d,fwd,median_ms,1\n", "line 2: expected 11 fields"),
], ids=["header", "value", "metric", "short-row"])
def test_malformed_csv_names_the_file(tmp_path, capsys, content, message):
    bad = tmp_path / "0.1.0" / "dev" / "results.csv"
    bad.parent.mkdir(parents=True)
    bad.write_text(content)
    assert main(["report", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and message in err, err
    with pytest.raises(report.ReportError, match=message):
        report.read_results(bad)


def test_report_without_results(tmp_path, capsys):
    assert main(["report", "--dir", str(tmp_path)]) == 1
    assert "no results.csv" in capsys.readouterr().err
    assert main(["report", "--dir", str(tmp_path / "missing")]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_optional_plots_only_with_their_rows(tmp_path):
    """Block-sparse (density) and CP (fused vs unfused) plots, from hand-made rows."""
    env = dict(device="d", torch="t", triton="tr", lk3d="l", commit="c", timestamp="ts")
    rows = [dict(case=f"bs-dense-k21-density{d}", provider=p, mode="fwd", metric="median_ms",
                 value=ms, **env)
            for d, ms in ((0.125, 1.0), (0.25, 2.0), (0.5, 4.0))
            for p in ("lk3d", "torch")]
    rows += [dict(case="cp-R8-k21", provider=p, mode="fwd", metric="median_ms", value=ms,
                  **env) for p, ms in (("lk3d", 1.0), ("cp-unfused", 3.0), ("torch", 9.0))]
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=report.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    drawn = {p.name for p in report.plot(path)}
    assert drawn == {"time_vs_density.png", "cp_fused_vs_unfused.png"}
    assert all(_png_ok(tmp_path / name) for name in drawn)


REPO = Path(__file__).resolve().parents[1]
_NOT_SOURCE = {".git", "__pycache__", ".pytest_cache", ".hypothesis"}


def _files(root):
    """``{relative path: (size, mtime_ns)}`` of every file under ``root`` but git's and Python's
    caches (imports may write bytecode meanwhile)."""
    state = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _NOT_SOURCE and not d.endswith(".egg-info")]
        for name in names:
            st = os.stat(os.path.join(folder, name))
            state[os.path.relpath(os.path.join(folder, name), root)] = (st.st_size, st.st_mtime_ns)
    return state


def _reported_csv(out):
    line = next(line for line in out.splitlines() if line.startswith("report: "))
    return Path(line.removeprefix("report: ").split(" and ")[0])


TINY_DENSE = ["bench", "--tiny", "--no-progress", "--no-isolate", "--min-run-time", "0.01",
              "--modes", "fwd", "--filter", "dense", "--providers", "torch"]


def test_bench_and_report_leave_the_checkout_alone(tmp_path, monkeypatch, capsys):
    """Run from the repository root (where the report used to land, in perf_reports/), neither
    `lk3d bench` nor `lk3d report` changes or adds a file there; the report goes to the user's
    data folder, whose path is printed; `lk3d report` reads it from there."""
    monkeypatch.chdir(REPO)
    monkeypatch.delenv(report.REPORT_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    before = _files(REPO)
    assert before and any(p.startswith("perf_reports") for p in before)

    assert main(TINY_DENSE) == 0
    out = capsys.readouterr().out
    path = _reported_csv(out)
    assert path.parent == bench.default_report_dir(bench.default_device(), "tiny")
    assert report.reports_root() in path.parents and REPO not in path.parents
    rows = report.read_results(path)
    assert {r["case"] for r in rows} == {c.name for c in bench.TINY_CASES if "dense" in c.name} \
        | {report.CEILING_CASE}
    assert f"`lk3d report` redraws the plots of every report under {report.reports_root()}" in out

    assert main(["report"]) == 0
    assert "summary of 1 result file(s)" in capsys.readouterr().out
    assert "tiny-dense" in (report.reports_root() / "README.md").read_text()
    assert _files(REPO) == before


def test_bench_out_takes_version_and_device(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(TINY_DENSE + ["--out", "rel/{version}/{device}"]) == 0
    path = _reported_csv(capsys.readouterr().out)
    assert path == Path("rel", lk3d.__version__, bench.device_slug(bench.default_device()),
                        report.RESULTS_NAME)
    assert report.read_results(tmp_path / path)
    assert not report.reports_root().exists()  # nothing in the default place


def test_bench_report_arguments(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    for argv, message in ((["bench", "--out", "x", "--no-report"], "not allowed with"),
                          (["bench", "--tiny", "--out", str(afile)], "expected a folder")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
