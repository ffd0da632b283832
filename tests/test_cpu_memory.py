"""Huge pages for large CPU tensors (``lk3d.cpu_memory``): PyTorch's ``THP_MEM_ALLOC_ENABLE=1``
cuts the page faults of a fresh large tensor, as the module says; ``huge_pages()`` reports the
setting; the benchmark's worker process gets it. Page faults are counted in fresh interpreters:
the setting is read once, when torch first allocates."""
import os
import subprocess
import sys
import textwrap

import pytest

from lk3d import cpu_memory
from lk3d.tools import bench

PAGES = (64 << 20) // 4096  # a 64 MiB tensor in 4 KiB pages

# Minor page faults of allocating, touching and freeing a 64 MiB tensor, the second time.
PROBE = textwrap.dedent("""
    import resource, torch
    def faults():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(1 << 24).fill_(1.0)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults()
    print(faults(), flush=True)
""")


def _faults(thp):
    env = {**os.environ, cpu_memory.THP_ENV: thp}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux")
                    or cpu_memory._kernel_mode() not in ("always", "madvise"),
                    reason="needs Linux transparent huge pages (always or madvise)")
def test_huge_pages_cut_page_faults():
    assert _faults("0") > PAGES // 2, "a fresh 64 MiB tensor should fault in 4 KiB pages"
    assert _faults("1") < PAGES // 10


def test_huge_pages_status(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_kernel_mode", lambda: "madvise")
    monkeypatch.setenv(cpu_memory.THP_ENV, "1")
    assert cpu_memory.huge_pages() == (True, "THP_MEM_ALLOC_ENABLE=1, kernel THP mode 'madvise'")
    monkeypatch.setattr(cpu_memory, "_kernel_mode", lambda: "never")
    on, why = cpu_memory.huge_pages()
    assert not on and "'never'" in why
    monkeypatch.setattr(cpu_memory, "_kernel_mode", lambda: None)
    assert not cpu_memory.huge_pages()[0]
    monkeypatch.delenv(cpu_memory.THP_ENV)
    on, why = cpu_memory.huge_pages()
    assert not on and "before importing torch" in why


def test_benchmark_worker_gets_the_setting():
    assert bench.worker_env("cpu") == {cpu_memory.THP_ENV: "1"}
    assert bench.worker_env("cpu", huge_pages=False) == {cpu_memory.THP_ENV: "0"}
    assert bench.worker_env("cuda") == {}
    before = os.environ.get("LK3D_PROBE_VAR")
    worker = bench.Worker(env={"LK3D_PROBE_VAR": "seen"})
    try:
        assert worker.call(os.getenv, ("LK3D_PROBE_VAR",), timeout=300) == ("ok", "seen")
    finally:
        worker.close()
    assert os.environ.get("LK3D_PROBE_VAR") == before  # this process's environment is as it was
