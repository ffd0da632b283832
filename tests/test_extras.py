"""What ``import lk3d`` loads, and what each feature does where its optional dependency (an extra
of pyproject.toml) is missing: ``lk3d bench`` without matplotlib and tqdm still measures, prints
its table and writes its CSV, and says the plots were skipped; ``lk3d report`` and
``lk3d.decompose`` raise an error that names the extra. A missing module is simulated by a None in
``sys.modules`` (the import then raises ImportError), restored after each test."""
import json
import os
import subprocess
import sys

import pytest
import torch

import lk3d
from lk3d.tools import bench, report
from lk3d.tools.cli import main

# Third-party modules that only the tooling (or an optional feature) needs.
TOOLING_ONLY = ("matplotlib", "tqdm", "tensorly", "scipy", "platformdirs")

# torch itself imports tqdm (torch.hub) where it is installed: the probe records what ``import
# lk3d`` adds after torch. A first convolution opens the plan cache: platformdirs may load then,
# the tooling may not.
PROBE = """
import json, sys, torch
before = set(sys.modules)
import lk3d
at_import = sorted(set(sys.modules) - before)
lk3d.conv3d(torch.randn(1, 2, 5, 6, 7), torch.randn(3, 2, 3, 1, 3), padding=1)
after_call = sorted(set(sys.modules) - before)
print(json.dumps([at_import, after_call]))
"""


def _tooling(modules, third_party):
    return [m for m in modules
            if m.split(".")[0] in third_party or m == "lk3d.tools" or m.startswith("lk3d.tools.")]


@pytest.mark.parametrize("interpret", [False, True])
def test_import_lk3d_loads_no_tooling(interpret):
    """Nor Triton on the CPU, unless its interpreter is asked for (then the kernels import it).
    (A first call of any torch.library custom op imports torch._dynamo, which imports Triton
    where it is installed: that is torch's, after the import.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    at_import, after_call = json.loads(proc.stdout.splitlines()[-1])
    assert {"lk3d", "lk3d.nn", "lk3d.decompose", "lk3d.autotune.cache"} <= set(at_import)
    assert _tooling(at_import, TOOLING_ONLY) == []
    no_platformdirs = tuple(m for m in TOOLING_ONLY if m != "platformdirs")
    assert _tooling(after_call, no_platformdirs) == []
    if not interpret:
        assert _tooling(at_import, ("triton",)) == []
    elif lk3d.kernels.HAS_TRITON:
        assert "triton" in at_import


# A minimal image (the GPU machines') has neither platformdirs nor tensorly: lk3d imports, convolves
# (its plan cache in the XDG folder), and ``lk3d info`` runs.
WITHOUT_PLATFORMDIRS = """
import sys
sys.modules["platformdirs"] = None
sys.modules["tensorly"] = None
import torch, lk3d
from lk3d.autotune.cache import default_cache
from lk3d.tools.cli import main
lk3d.conv3d(torch.randn(1, 2, 5, 6, 7), torch.randn(3, 2, 3, 1, 3), padding=1)
print(default_cache().directory)
main(["info"])
"""


def test_without_platformdirs_and_tensorly(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LK3D_CACHE_DIR", "TRITON_INTERPRET")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    proc = subprocess.run([sys.executable, "-c", WITHOUT_PLATFORMDIRS], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == str(tmp_path / "xdg" / "lk3d")
    assert any(line.startswith("lk3d ") for line in lines[1:]), proc.stdout


@pytest.fixture
def missing(monkeypatch):
    """``missing("tqdm", ...)``: those modules (and their submodules already loaded) do not
    import until the test ends."""
    def hide(*names):
        for loaded in [m for m in sys.modules if m.split(".")[0] in names]:
            monkeypatch.setitem(sys.modules, loaded, None)
        for name in names:
            monkeypatch.setitem(sys.modules, name, None)
    return hide


TINY_DENSE = ["bench", "--tiny", "--no-progress", "--no-isolate", "--min-run-time", "0.01",
              "--budget", "600", "--modes", "fwd", "--filter", "dense", "--providers", "torch"]


def test_bench_without_matplotlib_and_tqdm(tmp_path, monkeypatch, capsys, missing):
    """The README's `lk3d bench` on a plain install: table and CSV, the plots skipped with a note
    naming the extra; once matplotlib is there, `lk3d report` draws them from that CSV."""
    monkeypatch.setenv(report.REPORT_DIR_ENV, str(tmp_path / "reports"))
    missing("matplotlib", "tqdm")
    assert not report.can_plot()
    assert bench.progress_bar([3, 1, 2], enabled=True) == [3, 1, 2]  # no bar, the items as given
    out_dir = tmp_path / "out"
    assert main(TINY_DENSE + ["--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "speedup" in out  # the table
    csv_path = out_dir / report.RESULTS_NAME
    assert f"report: {csv_path} (plots skipped: {report.NO_MATPLOTLIB}" in out
    assert "pip install 'lk3d[bench]'" in out
    rows = report.read_results(csv_path)
    assert {r["case"] for r in rows} == ({c.name for c in bench.TINY_CASES if "dense" in c.name}
                                         | {report.CEILING_CASE})
    assert not list(out_dir.glob("*.png"))

    with pytest.raises(ImportError, match=r"pip install 'lk3d\[bench\]'"):
        report.plot(csv_path)
    assert main(["report", "--dir", str(out_dir)]) == 1
    err = capsys.readouterr().err
    assert "lk3d report:" in err and "pip install 'lk3d[bench]'" in err
    assert not (out_dir / "README.md").exists()  # nothing written

    monkeypatch.undo()  # matplotlib and tqdm back
    assert report.can_plot()
    assert main(["report", "--dir", str(out_dir)]) == 0
    assert "1 plot(s)" in capsys.readouterr().out  # torch rows only: the roofline plot
    assert (out_dir / "roofline_fraction.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_decompose_without_tensorly(missing):
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(5, 3, 3, 2, 3, generator=g, dtype=torch.float64)
    before = weight.clone()
    missing("tensorly")
    with pytest.raises(TypeError, match="rank"):  # arguments are checked first, as with TensorLy
        lk3d.decompose.cp(weight, rank=2.5)
    with pytest.raises(ImportError, match=r"pip install 'lk3d\[decompose\]'") as exc:
        lk3d.decompose.cp(weight, rank=2)
    assert exc.value.name == "tensorly"
    with pytest.raises(ImportError, match=r"pip install 'lk3d\[decompose\]'"):
        lk3d.decompose.tucker(weight, ranks=(2, 2))
    with pytest.raises(ImportError, match=r"pip install 'lk3d\[decompose\]'"):
        lk3d.nn.CPConv3d.from_conv(torch.nn.Conv3d(3, 5, 3), rank=2)
    assert torch.equal(weight, before)


def test_info_names_the_extras(capsys):
    assert main(["info"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines()
                if line.startswith("extras"))
    for word in ("bench: matplotlib", "tqdm", "decompose: tensorly"):
        assert word in line, line


def test_user_dirs_without_platformdirs(missing, monkeypatch, tmp_path):
    """The plan cache's and the reports' folders are platformdirs' Linux ones without it."""
    from lk3d.autotune.cache import user_dir

    missing("platformdirs")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "d"))
    monkeypatch.delenv("LK3D_REPORT_DIR", raising=False)
    assert user_dir("cache") == str(tmp_path / "c" / "lk3d")
    assert report.reports_root() == tmp_path / "d" / "lk3d" / "reports"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert user_dir("cache") == os.path.join(os.path.expanduser("~"), ".cache", "lk3d")
