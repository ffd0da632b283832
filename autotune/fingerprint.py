"""Device fingerprint: what a measured plan depends on besides the problem itself.

A fingerprint is a flat JSON-able dict. Its *hardware* fields say which device ran the
measurement; its *software* fields say which stack compiled and ran it:

    hardware   type ("cuda" / "cpu" / ...), name (GPU name or CPU model), capability ("9.0" on
               CUDA, None elsewhere), sms (streaming multiprocessors: tells MIG slices and
               H100 SXM/PCIe apart), threads (torch's intra-op threads on the CPU, None on GPUs)
    software   runtime ("cuda 12.8" / "hip 6.2" / None), driver (CUDA driver, "12.4", where the
               driver library answers), torch, triton (None when it does not import), lk3d

``fingerprint_id`` hashes it to ``"<hardware hash>-<full hash>"`` (8 + 8 hex digits). The user
cache keys on the whole id: upgrading torch, Triton, lk3d or the driver re-measures. Shipped seed
plans (measured once on a lent GPU, whose software versions users will rarely share) are matched
on the hardware half only; see ``lk3d.autotune.cache``.

``device_fingerprint`` is called on every op, so it is memoised per (device, thread count): the
first call reads /proc/cpuinfo or asks the CUDA driver, later calls cost a dict lookup and copy.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import platform
import threading
from importlib.metadata import PackageNotFoundError, version

import torch

HARDWARE_FIELDS = ("type", "name", "capability", "sms", "threads")

_MEMO: dict[tuple, dict] = {}
_ID_MEMO: dict[tuple, str] = {}
_MEMO_LOCK = threading.Lock()


def _memo_key(device: torch.device) -> tuple:
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return device.type, index, torch.get_num_threads()


def device_fingerprint(device: torch.device | str) -> dict:
    """The fingerprint of ``device`` (a fresh dict; callers may change it).

    Memoised per (device type, index, ``torch.get_num_threads()``), so a change of the thread
    count gives a new fingerprint on the CPU.
    """
    device = torch.device(device)
    memo_key = _memo_key(device)
    fp = _MEMO.get(memo_key)
    if fp is None:
        fp = _software() | _hardware(device.type, memo_key[1])
        with _MEMO_LOCK:
            fp = _MEMO.setdefault(memo_key, fp)
    return dict(fp)


def device_id(device: torch.device | str) -> str:
    """``fingerprint_id(device_fingerprint(device))``, memoised the same way (every op asks)."""
    device = torch.device(device)
    memo_key = _memo_key(device)
    fid = _ID_MEMO.get(memo_key)
    if fid is None:
        fid = fingerprint_id(device_fingerprint(device))
        with _MEMO_LOCK:
            fid = _ID_MEMO.setdefault(memo_key, fid)
    return fid


def fingerprint_id(fp: dict) -> str:
    """A stable short id of ``fp``: ``"<hardware hash>-<full hash>"``, 8 hex digits each.

    Both halves hash sorted, compact JSON, so key order and Python's hash seed do not matter.
    """
    hardware = {k: fp.get(k) for k in HARDWARE_FIELDS}
    return f"{_hash(hardware)}-{_hash(fp)}"


def hardware_id(fid: str) -> str:
    """The hardware half of the id ``fid`` given by ``fingerprint_id`` (seed plans match on it)."""
    return fid.split("-", 1)[0]


def _hash(obj) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _hardware(kind: str, index: int | None) -> dict:
    if kind == "cuda":  # ROCm builds answer through torch.cuda too
        props = torch.cuda.get_device_properties(index)
        return dict(type=kind, name=props.name, capability=f"{props.major}.{props.minor}",
                    sms=props.multi_processor_count, threads=None)
    if kind == "cpu":
        return dict(type=kind, name=_cpu_model(), capability=None, sms=None,
                    threads=torch.get_num_threads())
    return dict(type=kind, name=None, capability=None, sms=None, threads=None)


def _software() -> dict:
    runtime = None
    if torch.version.cuda:
        runtime = f"cuda {torch.version.cuda}"
    elif getattr(torch.version, "hip", None):
        runtime = f"hip {torch.version.hip}"
    try:  # its installed version, without importing it
        triton_version = version("triton")
    except PackageNotFoundError:  # no Triton wheel on this platform
        triton_version = None
    return dict(runtime=runtime, driver=_cuda_driver() if torch.version.cuda else None,
                torch=torch.__version__, triton=triton_version, lk3d=lk3d_version())


def lk3d_version() -> str:
    """The installed lk3d's version ("0.0.0+unknown" in a source tree that is not installed)."""
    try:
        return version("lk3d")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def _cuda_driver() -> str | None:
    """The CUDA driver's version ("12.4"), or None where libcuda is absent or does not answer."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(v)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"{v.value // 1000}.{v.value % 1000 // 10}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine() or "unknown"
