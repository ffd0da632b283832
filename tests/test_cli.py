"""The ``lk3d`` command line and the benchmark machinery behind ``lk3d bench``.

The bench runs on the hidden ``--tiny`` cases (seconds under the Triton interpreter, which
conftest switches on for CPU runs), so the lk3d rows exercise the real kernels.
"""
import csv
import io
import json
import math
import operator
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lk3d
from lk3d.tools import bench, cli
from lk3d.tools.cli import main

# the report these runs would write is tested in test_report.py
# A budget no tiny row can pass on a loaded machine (the interpreter's first calls take seconds);
# the budget's own tests give theirs after it (the last one counts).
TINY_ARGS = ["bench", "--tiny", "--no-progress", "--min-run-time", "0.01", "--no-report",
             "--budget", "600"]


@pytest.fixture(autouse=True)
def reports_in_tmp(tmp_path, monkeypatch):
    """`lk3d bench` writes its report to the user's data folder unless told otherwise: here,
    a folder of the test's own."""
    from lk3d.tools import report
    monkeypatch.setenv(report.REPORT_DIR_ENV, str(tmp_path / "reports"))


def _device_args(device):
    return ["--device", device.type]


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("lk3d", "torch", "triton", "python", "interpreter", "cpu", "cuda",
                 "algorithms", "tiled =", "aten  ="):
        assert word in out, f"{word!r} missing from lk3d info:\n{out}"
    from lk3d import kernels
    assert f"interpreter  {'on' if kernels.INTERPRETED else 'off'}" in out


def test_console_script_info():
    script = Path(sys.executable).with_name("lk3d")
    exe = str(script) if script.exists() else shutil.which("lk3d")
    assert exe, "the lk3d console script is not installed (pip install -e .)"
    proc = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("lk3d "), proc.stdout


def test_bench_tiny_table_and_csv(capsys, tmp_path, device):
    path = tmp_path / "out" / "bench.csv"
    rc = main(TINY_ARGS + _device_args(device) + ["--no-isolate", "--modes", "fwd,fwdbwd",
                                                  "--csv", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("case "))
    assert lines[header].split() == ["case", "provider", "mode", "ms", "TFLOP/s", "roofline",
                                     "speedup", "rel.err", "algo"]
    modes = ("fwd", "fwdbwd")
    expected = {(c.name, p, m) for c in bench.TINY_CASES for m in modes
                for p in bench.OP_PROVIDERS[c.op] if bench.available(p, c, device.type)}
    assert {"lk3d-tiled", "lk3d-fft", "cp-unfused", "torch-mask", "lk3d-dense"} <= {
        p for _, p, _ in expected} or device.type == "cpu" and not bench.available(
        "lk3d-tiled", bench.TINY_CASES[0], "cpu")
    n_rows = len(expected)
    body = lines[header + 2:header + 2 + n_rows]
    assert {line.split()[0] for line in body if not line.startswith(" ")} == {
        c.name for c in bench.TINY_CASES}
    assert f"wrote {n_rows} rows to {path}" in out

    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == bench.CSV_COLUMNS
    for column in ("case", "provider", "mode", "median_ms", "tflops", "speedup", "rel_err",
                   "device", "torch", "triton", "lk3d", "commit", "timestamp"):
        assert column in reader.fieldnames
    assert len(rows) == n_rows
    assert {(r["case"], r["provider"], r["mode"]) for r in rows} == expected
    ops = {c.name: c.op for c in bench.TINY_CASES}
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["median_ms"]) > 0 and float(r["tflops"]) > 0
        assert r["baseline"] and bench.is_baseline(r["baseline"]), r
        assert not r["baseline"].startswith("lk3d")
        if r["provider"] == "lk3d":
            assert float(r["rel_err"]) <= bench.tolerance(r["dtype"], device.type), r
            if ops[r["case"]] in ("dense", "depthwise"):  # the planner names what ran
                assert r["algo"], r
        else:
            assert r["rel_err"] == ""
        if r["provider"] in ("lk3d-fft", "lk3d-tiled"):
            assert r["algo"] == r["provider"].removeprefix("lk3d-")
        if r["provider"] == r["baseline"]:
            assert float(r["speedup"]) == pytest.approx(1.0)


def test_bench_budget_skips_in_worker(capsys, device):
    """A budget no call can meet: every row is skipped, the run still ends with a table. With
    the progress bar on (no --no-progress) but stderr not a terminal, none is drawn."""
    argv = [a for a in TINY_ARGS if a != "--no-progress"]
    rc = main(argv + _device_args(device) + ["--filter", "dw", "--budget", "0.001"])
    out, err = capsys.readouterr()
    assert rc == 0, out
    assert "\r" not in err and "step" not in err, err
    dw = [c for c in bench.TINY_CASES if "dw" in c.name]
    assert out.count(bench.SKIPPED_BUDGET) == sum(
        bench.available(p, c, device.type) for c in dw for p in bench.OP_PROVIDERS[c.op])


def test_worker_kills_a_call_past_its_timeout():
    worker = bench.Worker()
    try:
        assert worker.call(operator.add, (1, 2), timeout=60) == ("ok", 3)
        t0 = time.perf_counter()
        assert worker.call(time.sleep, (60,), timeout=0.5) == ("timeout", None)
        assert time.perf_counter() - t0 < 30
        assert worker.proc is None
        kind, msg = worker.call(math.sqrt, (-1.0,), timeout=60)  # a new worker; errors reported
        assert kind == "error" and "ValueError" in msg
        assert worker.call(math.sqrt, (4.0,), timeout=60) == ("ok", 2.0)
    finally:
        worker.close()


def test_max_time_skips_the_rest(device):
    results = bench.run(bench.TINY_CASES, device=device, modes=("fwd",), max_time_s=1e-9,
                        isolate=False, progress=False)
    assert {r.status for r in results} == {bench.SKIPPED_TIME_LIMIT}
    assert all(r.median_ms is None and r.speedup is None for r in results)
    assert "skipped (time limit)" in bench.format_table(results)


def test_flops_and_cases():
    case = bench.Case.dense("d", 2, 6, 4, (5, 6, 7), (3, 5, 7), groups=2)
    assert case.flops("fwd") == 2 * 2 * 4 * (5 * 6 * 7) * 3 * (3 * 5 * 7)
    assert case.flops("fwdbwd") == 3 * case.flops("fwd")
    valid = bench.Case("v", "dense", 1, 2, 2, 1, (9, 9, 9), (3, 3, 3), padding="valid")
    assert valid.out_size == (7, 7, 7)
    for cases in bench.CASE_SETS.values():
        assert len({c.name for c in cases}) == len(cases)
    assert all(c.op == "depthwise" and c.groups == c.Cin for c in bench.CASE_SETS["full"]
               if "dw" in c.name)
    with pytest.raises(ValueError, match="depthwise"):
        bench.Case("x", "depthwise", 1, 4, 4, 1, (4, 4, 4), (3, 3, 3))
    with pytest.raises(ValueError, match="dtype"):
        bench.Case.dense("x", 1, 4, 4, 4, 3, dtype="int8")
    assert case.flops("bwd") == 2 * case.flops("fwd")
    # CP, rank 4, 2 -> 5 channels, 3x5x7 kernel, 4x4x4 "same": 2·64·4·(2 + 15 + 5) FLOPs
    cp = bench.Case.cp("c", 1, 2, 5, 4, (3, 5, 7), rank=4)
    assert cp.flops("fwd") == 2 * 64 * 4 * (2 + 15 + 5) and cp.flops("fwdbwd") == 3 * cp.flops("fwd")
    assert cp.weight_elems() == 4 * (2 + 15 + 5)
    # block-sparse at density 0.25: a quarter of the dense count and of the dense weight
    bs = bench.Case.block_sparse("b", 1, 4, 4, 4, 3, 0.25, (2, 2, 1, 1, 1))
    dense = bench.Case.dense("d", 1, 4, 4, 4, 3)
    assert bs.flops("fwd") == dense.flops("fwd") // 4
    assert bs.weight_elems() == 4 * 4 * 27 // 4
    assert dense.bytes("fwd") - bs.bytes("fwd") == 4 * (4 * 4 * 27 * 3 // 4)
    with pytest.raises(ValueError, match="rank"):
        bench.Case.cp("x", 1, 4, 4, 4, 3, rank=0)
    with pytest.raises(ValueError, match="density"):
        bench.Case.block_sparse("x", 1, 4, 4, 4, 3, 0.0, (2, 2, 1, 1, 1))
    with pytest.raises(ValueError, match="block"):
        bench.Case.block_sparse("x", 1, 4, 4, 4, 3, 0.5, (3, 2, 1, 1, 1))
    for cases in bench.CASE_SETS.values():  # every op in every set
        assert {c.op for c in cases} == set(bench.OPS)


def test_case_files(tmp_path, capsys):
    """The shipped sets come from bench_cases.json; a user's file of cases runs with --cases."""
    quick = {c.name: c for c in bench.CASE_SETS["quick"]}
    dw = quick["dw-N1-C16-D32-k21"]
    assert (dw.op, dw.Cin, dw.Cout, dw.groups, dw.size, dw.kernel) == (
        "depthwise", 16, 16, 16, (32,) * 3, (21,) * 3)
    path = tmp_path / "cases.json"
    path.write_text(json.dumps([
        {"name": "mine-dw5", "op": "depthwise", "N": 1, "C": 3, "size": [5, 6, 4], "kernel": 3},
        {"name": "mine-bs", "op": "block_sparse", "N": 1, "Cin": 4, "Cout": 4, "size": 5,
         "kernel": 3, "density": 0.5, "block": [2, 2, 1, 1, 1]}]))
    a, b = bench.load_cases(path)
    assert (a.groups, a.size, b.block, b.density) == (3, (5, 6, 4), (2, 2, 1, 1, 1), 0.5)
    assert main(["bench", "--cases", str(path), "--list"]) == 0
    out = capsys.readouterr().out
    assert "mine-dw5" in out and "mine-bs" in out
    bad = [({"name": "x", "op": "dense", "N": 1, "Cin": 2, "Cout": 2, "size": 4, "kernel": 3,
             "colour": "red"}, "colour"),
           ({"name": "x", "op": "dense", "N": 1, "C": 2, "size": 4, "kernel": 3}, "'C'"),
           ({"name": "x", "op": "dense", "N": 1, "Cin": 2, "Cout": 2, "size": 0, "kernel": 3},
            "size"),
           ({"name": "x", "op": "dense", "N": 1, "Cin": 2, "size": 4, "kernel": 3}, "Cout")]
    for item, word in bad:
        path.write_text(json.dumps([item]))
        with pytest.raises(ValueError, match=word) as info:
            bench.load_cases(path)
        assert "cases.json" in str(info.value) and "'x'" in str(info.value)
    path.write_text(json.dumps([{"name": "x", "op": "dense", "N": 1, "Cin": 2, "Cout": 2,
                                 "size": 4, "kernel": 3}] * 2))
    with pytest.raises(ValueError, match="unique"):
        bench.load_cases(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cases.json"):
        bench.load_cases(path)
    with pytest.raises(SystemExit):
        main(["bench", "--cases", str(tmp_path / "missing.json")])
    assert "--cases" in capsys.readouterr().err


def test_cases_takes_a_shipped_set(capsys):
    """--cases SET lists (and runs) a set of bench_cases.json by its name; --quick is --cases
    quick."""
    assert main(["bench", "--cases", "goals", "--list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == [c.name for c in bench.CASE_SETS["goals"]]
    assert names[0] == "G1" and names[-1] == "G5-dense"
    listed = {}
    for argv in (["--quick"], ["--cases", "quick"]):
        assert main(["bench", *argv, "--list", "--filter", "dw"]) == 0
        listed[argv[-1]] = capsys.readouterr().out
    assert listed["--quick"] == listed["quick"] and "dw-N1-C16-D32-k21" in listed["quick"]
    with pytest.raises(SystemExit):
        main(["bench", "--cases", "goals", "--filter", "no-such-case"])
    assert "matches no goals case" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench", "--modes", "sideways"], "--modes"),
    (["bench", "--providers", "lk3d,cudnn"], "--providers"),
    (["bench", "--device", "tpu"], "--device"),
    (["bench", "--budget", "-1"], "--budget"),
    (["bench", "--quick", "--filter", "no-such-case"], "matches no quick case"),
    (["bench", "--quick", "--tiny"], "not allowed with"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_with_a_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_no_command_prints_usage(capsys):
    assert main([]) == 2
    assert "usage: lk3d" in capsys.readouterr().err


@pytest.mark.skipif(os.environ.get("LK3D_TEST_DEVICE", "cpu") == "cuda",
                    reason="checks the message for a machine without CUDA")
def test_cuda_requested_without_a_gpu(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        main(["bench", "--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


def test_tune_and_cache_commands(tmp_path, monkeypatch, capsys):
    """`lk3d tune --layers` measures (fft vs aten here), `lk3d cache` exports, clears, imports."""
    from lk3d import _algos, _conv_ops

    monkeypatch.setattr(_algos, "kernels_can_run", lambda t: False)
    monkeypatch.setattr(_conv_ops, "INTERPRETED", False)
    monkeypatch.setenv("LK3D_CACHE_DIR", str(tmp_path / "cache"))
    layers = tmp_path / "layers.json"
    layers.write_text('[{"name": "tiny-dw", "N": 1, "cin": 2, "cout": 2, "groups": 2, '
                      '"size": 6, "kernel": 3}]')
    assert cli.main(["tune", "--layers", str(layers), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "tiny-dw" in out and "grad_weight" in out and "3 entries (3 new)" in out
    assert "lk3d tune" not in err, err  # stderr is not a terminal here: no progress bar
    exported = tmp_path / "plans.json"
    assert cli.main(["cache", "export", str(exported)]) == 0
    assert cli.main(["cache", "clear"]) == 0
    assert cli.main(["cache"]) == 0
    assert ": 0 entries" in capsys.readouterr().out
    assert cli.main(["cache", "import", str(exported)]) == 0
    assert "imported 3 entries" in capsys.readouterr().out
    assert "(3 entries)" in cli.info_text()
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    assert cli.main(["cache", "import", str(bad)]) == 1
    assert "bad.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["tune", "--layers", str(bad)])


def test_bench_dispatch_tiny(capsys):
    # in this process (--no-isolate): the worker process is tested in test_cpu_memory.py
    assert cli.main(["bench", "--dispatch", "--tiny", "--device", "cpu", "--no-progress",
                     "--no-isolate"]) == 0
    out = capsys.readouterr().out
    assert "dense-k3-N1-C2-S6" in out and "dw-k5-N1-C2-S6" in out
    assert "the plan's pick over the fastest candidate: worst" in out


def test_bench_dispatch_times_one_call_once(monkeypatch):
    """Where lk3d's aten algorithm is torch's own call it is timed once, as torch; where it
    converts the layout (CPU dense k >= 15) it is a provider of its own."""
    from lk3d.tools import bench_dispatch
    monkeypatch.setenv("LK3D_ALGO", "aten")  # not the interpreted kernels (k=15: half a minute)
    shapes = [bench_dispatch.Shape(1, 2, 6, 3, True), bench_dispatch.Shape(1, 2, 6, 15, False)]
    same_call, converts = bench_dispatch.run(shapes, torch.device("cpu"), progress=False,
                                             rounds=1, pairs=5)
    assert same_call["same"] == {"lk3d-aten": "torch"}
    assert same_call["times_ms"]["lk3d-aten"] == same_call["times_ms"]["torch"]
    assert converts["same"] == {}
    assert converts["times_ms"]["lk3d-aten"] > 0
    for row in (same_call, converts):  # end to end = (auto over its pick, paired) x pick/best
        assert row["auto_over_pick"] > 0
        assert row["auto_over_best"] == pytest.approx(row["auto_over_pick"]
                                                      * row["pick_over_best"])
    text = bench_dispatch.format_rows([same_call, converts])
    assert "= torch" in text and "timed once" in text


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize("tty, enabled, drawn", [(True, True, True), (False, True, False),
                                                 (True, False, False)],
                         ids=["terminal", "not-a-terminal", "switched-off"])
def test_progress_bar_only_on_a_terminal(monkeypatch, tty, enabled, drawn):
    stream = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    bar = bench.progress_bar(total=3, enabled=enabled, desc="counting")
    bar.update()
    bar.close()
    assert ("counting" in stream.getvalue()) == drawn, stream.getvalue()
    assert list(bench.progress_bar(iter([3, 1, 2]), enabled=enabled)) == [3, 1, 2]


# ---------------------------------------------------------------------------------------------
# lk3d explain
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def modelled(tmp_path, monkeypatch):
    """Plans from the cost model with fft and aten as the candidates (no interpreter preference,
    no Triton kernels), in an empty plan cache."""
    from lk3d import _algos, _conv_ops
    from lk3d.autotune import cache

    monkeypatch.setattr(_algos, "kernels_can_run", lambda t: False)
    monkeypatch.setattr(_conv_ops, "INTERPRETED", False)
    monkeypatch.setenv("LK3D_CACHE_DIR", str(tmp_path / "plans"))
    monkeypatch.setattr(cache, "_seed_entries", dict)
    monkeypatch.delenv("LK3D_ALGO", raising=False)


def test_explain_command_with_shapes(capsys, modelled):
    """The README's example layer (2·48·96³ floats: 340 MB if it were allocated)."""
    assert main(["explain", "--input", "2,48,96,96,96", "--weight", "48,1,7,7,7", "--groups",
                 "48", "--padding", "same", "--dtype", "float32", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.strip()
    x = torch.zeros(()).expand(2, 48, 96, 96, 96)
    plans = lk3d.explain(x, torch.zeros(()).expand(48, 1, 7, 7, 7), None, 1, "same", 1, 48)
    assert out == repr(plans)
    lines = out.splitlines()
    assert lines[0] == ("lk3d.conv3d on cpu, float32: input (2, 48, 96, 96, 96), weight "
                        "(48, 1, 7, 7, 7), stride 1, padding same, dilation 1, groups 48")
    assert lines[1].split() == ["pass", "algo", "source", "config", "fft", "ms", "aten", "ms"]
    for line, (name, plan) in zip(lines[3:6], plans.items()):
        cells = line.split()
        assert cells[:4] == [name, plan["algo"], "model", "-"]
        times = [float(c) for c in cells[4:]]
        assert times == pytest.approx([plan["times_ms"]["fft"], plan["times_ms"]["aten"]],
                                      rel=1e-2)
        assert plan["algo"] == min(plan["times_ms"], key=plan["times_ms"].get)
    assert lines[6].startswith("ms: measured where")


def test_explain_command_with_cases(capsys):
    """One case of each op (the Triton interpreter's choices under the test suite)."""
    for name in ("dense-N1-C16-D24-k7", "cp-R8-N1-C16-D32-k15", "bs-N1-C32-D24-k7-density0.5"):
        assert main(["explain", name, "--device", "cpu"]) == 0
        out = capsys.readouterr().out
        case = next(c for cs in bench.CASE_SETS.values() for c in cs if c.name == name)
        assert f"input ({case.N}, {case.Cin}, {', '.join(map(str, case.size))})" in out, out
        if case.op == "dense":
            assert out.startswith("lk3d.conv3d on cpu, float32") and "grad_weight" in out
        elif case.op == "cp":
            assert out.startswith("lk3d.cp_conv3d on cpu, float32") and "rank 8" in out
            assert {line.split()[0] for line in out.splitlines()[3:5]} == {"forward", "backward"}
        else:
            assert out.startswith("lk3d.block_sparse_conv3d on cpu") and "density 0.5" in out
            assert "\npath: " in out


@pytest.mark.parametrize("argv, message", [
    (["explain"], "expected a case"),
    (["explain", "no-such-case"], "expected one of lk3d bench's cases"),
    (["explain", "dw-N1-C16-D32-k7", "--groups", "2"], "got the case 'dw-N1-C16-D32-k7' and "
                                                       "--groups"),
    (["explain", "--input", "2,3", "--weight", "1,1,1,1,1"], "--input: expected 5"),
    (["explain", "--input", "1,4,8,8,8", "--weight", "4,2,3,3,3"], "weight: expected shape[1]"),
    (["explain", "--input", "1,4,8,8,8", "--weight", "4,4,3,3,3", "--padding", "wide"],
     "--padding: expected 'same', 'valid'"),
    (["explain", "--input", "1,4,8,8,8", "--weight", "4,2,3,3,3", "--groups", "2", "--rank", "2"],
     "--rank: a CP kernel is dense"),
], ids=["nothing", "unknown-case", "case-and-shape", "short-input", "weight-mismatch",
        "bad-padding", "grouped-cp"])
def test_explain_command_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
