"""perf_reports/gpu_run.sh before a GPU sees it: its dry run on this machine as the GPU image has
it (no platformdirs, no tensorly), the kernel specialisations its CUDA test subset compiles, and
``lk3d bench`` without those two packages.

A lent GPU machine runs the script once, with no package index and no second try: whatever
fails at import there costs the whole run. The missing packages are simulated by a folder on
PYTHONPATH whose ``platformdirs`` and ``tensorly`` raise ModuleNotFoundError, for every Python
the script starts; lk3d is installed into a folder of the script's own (nothing here changes).
"""
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

pytest.importorskip("triton")  # the estimate and the interpreted kernels need it

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "perf_reports" / "gpu_run.sh"

# The Triton kernels: the CUDA subset must run each of them.
KERNELS = {"conv3d_igemm_kernel", "conv3d_desc_kernel", "conv3d_wgrad_kernel",
           "bias_grad_kernel", "conv3d_dw_kernel", "conv3d_dw_wgrad_kernel", "cp_conv_kernel",
           "cp_grad_kernel", "bs_conv3d_kernel", "bs_conv3d_wgrad_kernel", "conv3d_dw_cl_kernel",
           "conv3d_dw_cl_wgrad_kernel", "cp_sep_kernel", "conv3d_desc_wgrad_kernel"}
# What the CUDA test subset may compile. The tests step of gpu_run.sh has 120 s; starting Python
# and torch, the CUDA context, collecting tests/ and tracing torch.compile once take ~30 s of it,
# leaving 90 s for compiles. On this 2-core CPU an sm_90 compile (python -m lk3d.tools.aot 90:
# 104 kernels, cold cache, the machine shared) took 1.34 s on average with Triton 3.6 (the GPU
# image's; 0.84 s of CPU time), 0.73 s with Triton 3.9; Triton 3.6 also builds a launcher per
# new signature with gcc (0.3-0.4 s here): ~1.7 s a specialisation. With a 1.5x margin (the GPU
# machine's cores taken as no faster than these), 2.5 s: 90 / 2.5 = 36. The subset compiles 35
# (2026-12: dense 4, dense on descriptors 4, strided on descriptors 4 (the forward, grad-weight,
# and grad-input's two stride phases: one geometry, but one phase's output view does not start
# 16-byte aligned), depthwise 4, channels-innermost depthwise 3, CP fused 3 and separable 10,
# block-sparse 3; torch.compile reuses the dense ones).
TESTS_STEP_S, FIXED_S, SPECIALISATION_S = 120, 30, 2.5
BUDGET = int((TESTS_STEP_S - FIXED_S) / SPECIALISATION_S)


@pytest.fixture
def blocked(tmp_path):
    """An environment for child processes in which platformdirs and tensorly do not import, as
    on the GPU image. (The platformdirs installed here registers a pytest plugin, which pytest
    would load at start-up: ``-p no:platformdirs``; the image has none.)"""
    folder = tmp_path / "blocked"
    (folder / "tensorly").mkdir(parents=True)
    for path, name in ((folder / "platformdirs.py", "platformdirs"),
                       (folder / "tensorly" / "__init__.py", "tensorly")):
        path.write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\", "
                        f"name={name!r})\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(folder),
                                         *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTEST_ADDOPTS"] = "-p no:platformdirs"
    probe = subprocess.run([sys.executable, "-c", "import tensorly"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert "No module named 'tensorly'" in probe.stderr, probe.stderr
    return env


def _lk3d_install():
    """Where this Python's lk3d comes from, and its installed files: the dry run leaves them."""
    dist = metadata.distribution("lk3d")
    return dist.version, sorted(str(f) for f in dist.files or ()), dist.read_text("RECORD")


@pytest.mark.xdist_group("aot")  # it compiles for sm_90 as the AOT tests do
def test_dry_run_without_platformdirs_and_tensorly(tmp_path, blocked):
    """Every step of the dry run passes where platformdirs and tensorly are missing: install
    (into a folder of its own), import, lk3d info, the goal cases' list, the estimate of one goal
    case (all nine take 40-60 s here) and the collection of the CUDA subset with
    LK3D_TEST_DEVICE=cuda. About 60 s on 2 cores."""
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    env = dict(blocked, PYTHON=sys.executable, TMPDIR=str(tmp), GPU_RUN_ESTIMATE_CASES="G2")
    install, tree = _lk3d_install(), sorted(os.listdir(ROOT))
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    steps = (out / "steps.txt").read_text()
    assert proc.returncode == 0, f"{steps}\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    lines = steps.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["install", "import", "info", "bench-list",
                                                        "estimate", "collect"], steps
    assert all(" rc=0 " in line for line in lines[:-1]), steps
    assert lines[-1] == "all required steps passed"
    assert sorted(os.listdir(out)) == ["bench.txt", "info.txt", "steps.txt", "tests.log"]

    info = (out / "info.txt").read_text()
    assert re.search(rf"^{re.escape(str(tmp))}/lk3d-gpu-run\.\w+/site/lk3d/__init__\.py$", info,
                     re.M), info  # pip installed it there, and lk3d came from there
    assert "Successfully installed lk3d" in info and "\nlk3d         0.1.0" in info
    bench = (out / "bench.txt").read_text()
    assert all(f"\n{name} " in bench for name in ("G1", "G2", "G3-k15", "G4", "G5-dense")), bench
    # one case: the estimate's table has no case column
    assert re.search(r"^(G2 +)?forward +conv3d_dw_cl_kernel ", bench, re.M), bench
    collected = (out / "tests.log").read_text()
    for name in ("test_conv3d[dense]", "test_conv3d[depthwise]", "test_conv3d[depthwise-cl]",
                 "test_conv3d[descriptor]",
                 "test_cp_conv3d[separable]", "test_cp_conv3d[tiled]",
                 "test_block_sparse_conv3d", "test_compile_fullgraph"):
        assert f"tests/test_kernel_families.py::{name}\n" in collected, collected
    assert re.search(r"^\d+/\d+ tests collected", collected, re.M), collected

    assert not list(tmp.glob("lk3d-gpu-run.*")), "the work folder is left behind"
    assert _lk3d_install() == install and sorted(os.listdir(ROOT)) == tree


def test_subset_specialisations_within_budget(tmp_path):
    """The CUDA subset (-m gpu_run) run under the interpreter, its launches' compile keys
    recorded (LK3D_RECORD_SPECIALISATIONS): every kernel runs, and the distinct keys, the
    binaries a GPU compiles for the same calls, stay within BUDGET. About 20 s on 2 cores."""
    record = tmp_path / "keys.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "LK3D_TEST_DEVICE"}
    env["LK3D_RECORD_SPECIALISATIONS"] = str(record)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p",
                           "no:cacheprovider", "-m", "gpu_run", "-rs", str(ROOT / "tests")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed, \d+ deselected(, \d+ warnings?)? in .*", summary), \
        summary  # none skipped
    keys = {line for line in record.read_text().splitlines()}
    kernels = {json.loads(k)["kernel"] for k in keys}
    assert kernels == KERNELS
    assert len(keys) <= BUDGET, (f"the CUDA subset compiles {len(keys)} kernel specialisations, "
                                 f"over its budget of {BUDGET}:\n" + "\n".join(sorted(keys)))


def test_bench_tiny_without_platformdirs_and_tensorly(tmp_path, blocked):
    """``lk3d bench --cases tiny`` (its measurements in a worker process, which starts without
    them too) runs and writes its report."""
    out = tmp_path / "report"
    env = dict(blocked, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    proc = subprocess.run(
        [sys.executable, "-m", "lk3d.tools.cli", "bench", "--cases", "tiny", "--device", "cpu",
         "--no-progress", "--modes", "fwd", "--providers", "lk3d,torch", "--min-run-time", "0.01",
         "--budget", "600", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "lk3d bench: 4 tiny case(s) on cpu" in proc.stdout
    rows = (out / "results.csv").read_text()
    for case in ("tiny-dw", "tiny-dense", "tiny-cp", "tiny-bs"):
        assert case in rows, rows
