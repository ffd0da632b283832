"""Where ``lk3d bench`` measures: a spawned worker process with a hard time limit per call
(``Worker``), or this process (``InProcess``)."""
import multiprocessing
import os
from typing import Optional

import torch

from lk3d import cpu_memory
from lk3d.tools.bench_providers import clear_inputs


def _worker_main(conn, num_threads):
    torch.set_num_threads(num_threads)
    conn.send(("ready", None))
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        fn, args = job
        try:
            conn.send(("ok", fn(*args)))
        except Exception as e:  # reported as the row's status; the worker goes on
            clear_inputs()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            conn.send(("error", f"{type(e).__name__}: {e}".splitlines()[0][:200]))


def worker_env(device_type: str, huge_pages: bool = True) -> dict:
    """The environment a benchmark worker adds: on the CPU, PyTorch's transparent huge pages for
    large tensors (``THP_MEM_ALLOC_ENABLE=1``, see ``lk3d.cpu_memory``) unless ``huge_pages`` is
    False, in which case it is switched off even where this process has it."""
    if device_type != "cpu":
        return {}
    return {cpu_memory.THP_ENV: "1" if huge_pages else "0"}


class Worker:
    """Runs ``fn(*args)`` (importable functions) in a spawned process; a call that outlives its
    timeout kills the process and answers ``("timeout", None)``; the next call starts a new one."""

    def __init__(self, start_timeout: float = 300.0, env: Optional[dict] = None):
        self.start_timeout = start_timeout
        self.env = dict(env or {})  # extra environment of the worker process
        self.proc = None
        self.conn = None

    def _start(self):
        ctx = multiprocessing.get_context("spawn")  # fork would deadlock in OpenMP (libgomp)
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, torch.get_num_threads()),
                                daemon=True, name="lk3d-bench-worker")
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)  # a spawned process takes the environment at start()
        try:
            self.proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        try:
            if not self.conn.poll(self.start_timeout):
                raise RuntimeError(f"the benchmark worker did not start in {self.start_timeout} s")
            self.conn.recv()
        except EOFError:
            self.proc.join(5)
            code = self.proc.exitcode
            self.close()
            raise RuntimeError(f"the benchmark worker exited at start-up (code {code})") from None
        except RuntimeError:
            self.close()
            raise

    def call(self, fn, args, timeout: float):
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send((fn, args))
        if not self.conn.poll(timeout):
            self.close()
            return "timeout", None
        try:
            return self.conn.recv()
        except EOFError:
            self.proc.join(5)
            code = self.proc.exitcode
            self.close()
            return "error", f"worker exited with code {code}"

    def close(self):
        if self.proc is None:
            return
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(0.5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        self.conn.close()
        self.proc = self.conn = None


class InProcess:
    """The same interface as ``Worker`` in this process: no hard time limit."""

    def call(self, fn, args, timeout: float):
        try:
            return "ok", fn(*args)
        except Exception as e:
            clear_inputs()
            return "error", f"{type(e).__name__}: {e}".splitlines()[0][:200]

    def close(self):
        clear_inputs()
