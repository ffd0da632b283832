"""Persistent plan cache: the algorithm and launch config that won, per device, problem and config
space, kept across processes.

File
    ``<dir>/plans-v1.json``; ``<dir>`` is ``$LK3D_CACHE_DIR`` when set, else
    ``platformdirs.user_cache_dir("lk3d")`` (``~/.cache/lk3d`` on Linux)::

        {"version": 1,                    # the format; any other value: the file is ignored
         "lk3d": "0.1.0",                 # the writer's version, for people reading the file
         "entries": {
           "<fingerprint id>|<space hash>|<problem key>":
               {"algo": "tiled", "config": {"BLOCK_M": 128, ...}, "ms": 1.2, "source": "measured"},
           ...}}

    A plan is any JSON object; the layer that chooses algorithms decides its fields. The entry key
    joins ``fingerprint.fingerprint_id`` (device and software stack), ``space_hash`` of the config
    list the plan was picked from, and ``problem_key``. The first two hold no ``|``; the problem key
    may, so split an entry key with ``key.split("|", 2)``. Editing one kernel's config list changes
    its space hash: only plans picked from that list miss. Their stale entries stay in the file,
    never read again, until ``clear``.

Concurrency
    Every write is a read-modify-write under ``filelock.FileLock(<file>.lock)``: the file is
    re-read under the lock, merged with this process's new entries, written to a temporary file in
    the same directory and moved over the old one with ``os.replace``. Readers take no lock: they
    see the old file or the new one, never half of one. Several processes (training ranks) storing
    plans at once lose none. ``get`` keeps the entries in memory and re-reads the file only when its
    inode, mtime or size change.

Failures never stop a convolution, and never cost a stored plan
    The first fault a ``PlanCache`` meets warns (one ``RuntimeWarning`` per ``PlanCache``, naming
    the file and the fault; a directory in the file's place, which can be neither read nor
    replaced, warns once too), and the convolution goes on:

    * A file that exists but cannot be read (permissions, a directory in its place, an I/O
      error): it is never written over. Plans stored meanwhile are kept in memory for the life of
      the process; each later access tries the file again, and once it reads, the next stored
      plan is merged with what it holds.
    * A file of another format ``version`` (another lk3d's data): never written over either.
    * Malformed entries (a key without two ``|``, a plan that is not an object): dropped; the
      file's other entries are kept and the next ``put`` rewrites the file without the bad ones.
    * A file that is not JSON, is truncated, is not an object or has no ``entries`` object: no
      entry in it can be read, so it counts as empty and the next ``put`` rewrites it cleanly.
    * A directory that cannot be written: plans are kept in memory for the life of the process
      (each later ``put`` tries the file again).

    The explicit maintenance calls (``clear``, ``import_``) raise instead: their caller asked for a
    change on disk. ``clear`` replaces even a file that cannot be read or is of another version
    (that is what it is for); ``import_`` refuses to, as ``put`` does.

Seeds
    ``seeds.json`` beside this module (package data, same format) holds plans measured on GPUs we
    have had. ``get`` consults it when the user cache has no entry: first under the full
    fingerprint id, then under its hardware half alone (``fingerprint.hardware_id``), since users
    seldom run the very torch/Triton versions of the measuring run. Seed plans come back with
    ``"source": "seed"``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.resources
import json
import operator
import os
import secrets
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import filelock
import torch

from lk3d.autotune.fingerprint import hardware_id, lk3d_version

FORMAT_VERSION = 1
# Writers hold the lock for one read and one small write; a minute means something is stuck.
_LOCK_TIMEOUT_S = 60.0


def problem_key(op: str, dtype: torch.dtype | str, input_shape: Sequence[int],
                weight_shape: Sequence[int], stride: int | Sequence[int],
                padding: int | str | Sequence[int], dilation: int | Sequence[int],
                groups: int) -> str:
    """The cache key of one convolution, e.g.
    ``"conv3d|float32|N2|C16->16|g16|S64x64x64|k7x7x7|s1x1x1|d1x1x1|p3x3x3x3x3x3"``.

    ``input_shape`` is (N, Cin, D, H, W), ``weight_shape`` (Cout, Cin/groups, kd, kh, kw).
    Exact: op, dtype, Cin, Cout, groups, kernel size, stride, dilation, padding. Bucketed to the
    next power of two (so nearby shapes share a plan): the batch N and each spatial size.
    ``stride``/``dilation`` are an int or 3 ints; ``padding`` is an int, 3 ints (symmetric),
    6 ints ``(d_l, h_l, w_l, d_r, h_r, w_r)`` or a string ("same"/"valid"), written as given
    after ints are expanded to 6.
    """
    if len(input_shape) != 5:
        raise ValueError(
            f"problem_key: input_shape must be (N, C, D, H, W), got {tuple(input_shape)}")
    if len(weight_shape) != 5:
        raise ValueError(f"problem_key: weight_shape must be (Cout, Cin/groups, kd, kh, kw), "
                         f"got {tuple(weight_shape)}")
    n, cin, *spatial = (int(s) for s in input_shape)
    cout, _, *kernel = (int(s) for s in weight_shape)
    dt = str(dtype).removeprefix("torch.")
    if isinstance(padding, str):
        pad = padding
    else:
        p = _ints("padding", padding, (1, 3, 6))
        pad = _x(p * 6 if len(p) == 1 else p * 2 if len(p) == 3 else p)
    return (f"{op}|{dt}|N{_bucket(n)}|C{cin}->{cout}|g{int(groups)}"
            f"|S{_x(_bucket(s) for s in spatial)}|k{_x(kernel)}"
            f"|s{_x(_triple('stride', stride))}|d{_x(_triple('dilation', dilation))}|p{pad}")


def space_hash(configs: Sequence[dict]) -> str:
    """12 hex digits naming a config list (its order included); any edit of the list changes it."""
    text = json.dumps(list(configs), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _bucket(n: int) -> int:
    """The next power of two >= n (0 stays 0)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def _x(values) -> str:
    return "x".join(str(v) for v in values)


def _ints(name: str, value, lengths: tuple[int, ...]) -> tuple[int, ...]:
    try:
        t = tuple(map(operator.index, value if isinstance(value, Sequence) else (value,)))
    except TypeError:
        t = ()
    if len(t) not in lengths:
        counts = " or ".join(map(str, lengths[1:]))
        raise ValueError(f"problem_key: {name} must be an int or {counts} ints, got {value!r}")
    return t


def _triple(name: str, value) -> tuple[int, ...]:
    t = _ints(name, value, (1, 3))
    return t * 3 if len(t) == 1 else t


def _entry_key(fingerprint_id: str, key: str, space: str) -> str:
    return f"{fingerprint_id}|{space}|{key}"


class _Parsed(NamedTuple):
    entries: dict[str, dict]  # the well-formed entries
    problem: str | None       # what is wrong with the file, None if nothing
    kind: str = "ok"          # "ok"; "garbage": nothing readable; "malformed": some entries
                              # dropped; "foreign": another format version, not ours to rewrite


def _parse(data: bytes) -> _Parsed:
    """The entries of a cache file's bytes, and what is wrong with them."""
    try:
        doc = json.loads(data)
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for binary garbage
        return _Parsed({}, f"is not valid JSON ({e})", "garbage")
    if not isinstance(doc, dict):
        return _Parsed({}, f"holds a JSON {type(doc).__name__}, not an object", "garbage")
    v = doc.get("version")
    if type(v) is not int or v != FORMAT_VERSION:
        return _Parsed({}, f"has format version {v!r}, this lk3d reads version {FORMAT_VERSION}",
                       "foreign")
    entries = doc.get("entries")
    if not isinstance(entries, dict):
        return _Parsed({}, "has no 'entries' object", "garbage")
    good = {k: plan for k, plan in entries.items() if k.count("|") >= 2 and isinstance(plan, dict)}
    if len(good) == len(entries):
        return _Parsed(entries, None)
    bad = [k for k in entries if k not in good]
    return _Parsed(good, f"has {len(bad)} malformed {'entry' if len(bad) == 1 else 'entries'} "
                         f"(first: {bad[0]!r}; want '<fingerprint>|<space>|<key>': {{...}})",
                   "malformed")


def _write_atomic(path: Path, entries: dict[str, dict]) -> None:
    """Write ``entries`` to ``path``: a temporary file in its directory, then ``os.replace``."""
    doc = {"version": FORMAT_VERSION, "lk3d": lk3d_version(), "entries": entries}
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_mtime_ns, st.st_size


@functools.cache
def _seed_entries() -> dict[str, dict]:
    """The entries of the packaged ``seeds.json``, read once per process."""
    try:
        data = importlib.resources.files("lk3d.autotune").joinpath("seeds.json").read_bytes()
    except OSError as e:
        warnings.warn(f"lk3d seed plans: cannot read the packaged seeds.json ({e})", RuntimeWarning,
                      stacklevel=2)
        return {}
    parsed = _parse(data)
    if parsed.problem is not None:
        warnings.warn(f"lk3d seed plans: the packaged seeds.json {parsed.problem}",
                      RuntimeWarning, stacklevel=2)
    return parsed.entries


# Where platformdirs is not installed (a minimal image): the folders it gives on Linux.
_XDG = {"cache": ("XDG_CACHE_HOME", ".cache"), "data": ("XDG_DATA_HOME", ".local/share")}


def user_dir(kind: str) -> str:
    """lk3d's user folder of ``kind`` ("cache" or "data"): ``platformdirs.user_cache_dir("lk3d")``
    or ``user_data_dir``. platformdirs is imported only here, when the folder is first needed,
    not by ``import lk3d``; where it is not installed, ``$XDG_CACHE_HOME/lk3d`` (else
    ``~/.cache/lk3d``), likewise ``$XDG_DATA_HOME`` (``~/.local/share``)."""
    env, default = _XDG[kind]
    try:
        import platformdirs
    except ImportError:
        return os.path.join(os.environ.get(env) or os.path.join(os.path.expanduser("~"), default),
                            "lk3d")
    return {"cache": platformdirs.user_cache_dir, "data": platformdirs.user_data_dir}[kind]("lk3d")


class PlanCache:
    """The plans of one cache directory; see the module docstring for the file and its rules.

    Thread-safe; one object per process is enough (``default_cache``).
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        if directory is None:
            directory = os.environ.get("LK3D_CACHE_DIR") or user_dir("cache")
        self.directory = Path(directory).expanduser()
        self.path = self.directory / f"plans-v{FORMAT_VERSION}.json"
        self._lock = filelock.FileLock(f"{self.path}.lock", timeout=_LOCK_TIMEOUT_S)
        self._mutex = threading.RLock()
        self._saved: dict[str, dict] = {}    # the file's entries as last read or written
        self._stamp: tuple | None = None      # (inode, mtime_ns, size) of that file; None: absent
        self._unsaved: dict[str, dict] = {}  # plans the file could not take, or must not
        self._keep_out: str | None = None     # why the file must not be written, None: it may
        self._warned = False                  # a fault has been reported (once per PlanCache)

    def __repr__(self) -> str:
        return f"PlanCache({str(self.directory)!r})"

    def get(self, fingerprint_id: str, key: str, space: str) -> dict | None:
        """The plan stored for (device, problem, config space), else a seed plan, else None.

        Returns a copy; a seed plan carries ``"source": "seed"``.
        """
        entry = _entry_key(fingerprint_id, key, space)
        with self._mutex:
            plan = self._unsaved.get(entry)
            if plan is None:
                self._refresh()
                plan = self._saved.get(entry)
        if plan is not None:
            return copy.deepcopy(plan)
        seeds = _seed_entries()
        plan = seeds.get(entry)
        if plan is None:
            plan = seeds.get(_entry_key(hardware_id(fingerprint_id), key, space))
        return None if plan is None else copy.deepcopy(plan) | {"source": "seed"}

    def put(self, fingerprint_id: str, key: str, space: str, plan: dict) -> None:
        """Store ``plan`` (a JSON-able dict), merged with what other processes stored meanwhile."""
        if not isinstance(plan, dict):
            raise TypeError(f"PlanCache.put: plan must be a dict, got {type(plan).__name__}")
        try:
            plan = json.loads(json.dumps(plan))
        except (TypeError, ValueError) as e:
            raise TypeError(f"PlanCache.put: plan must be JSON-able, got {plan!r} ({e})") from None
        self._store({_entry_key(fingerprint_id, key, space): plan}, strict=False)

    def entries(self) -> int:
        """How many plans this cache holds (file and in-memory ones; seeds not counted)."""
        with self._mutex:
            self._refresh()
            return len(self._saved.keys() | self._unsaved.keys())

    def clear(self) -> None:
        """Drop every plan, on disk too (raises ``OSError`` if the file cannot be written)."""
        with self._mutex:
            self._unsaved.clear()
            self.directory.mkdir(parents=True, exist_ok=True)
            with self._lock:
                _write_atomic(self.path, {})
                self._saved, self._stamp = {}, _stamp(os.stat(self.path))

    def export(self, path: str | os.PathLike) -> int:
        """Write every plan to ``path`` in the cache's own format; returns how many."""
        with self._mutex:
            self._refresh()
            entries = self._saved | self._unsaved
        _write_atomic(Path(path), entries)
        return len(entries)

    def import_(self, path: str | os.PathLike) -> int:
        """Merge the plans of an exported file (they win over entries with the same key); returns
        how many it held. A file that is not a cache file of this version raises ``ValueError``."""
        path = Path(path)
        parsed = _parse(path.read_bytes())
        if parsed.problem is not None:
            raise ValueError(f"lk3d plan cache import: {path} {parsed.problem}")
        self._store(parsed.entries, strict=True)
        return len(parsed.entries)

    def _store(self, new: dict[str, dict], *, strict: bool) -> None:
        """Merge ``new`` into the file under the lock; where the file cannot or must not be
        written, raise (strict) or warn once and keep them in memory."""
        with self._mutex:
            unsaved_before = dict(self._unsaved)
            self._unsaved.update(new)
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                with self._lock:
                    self._stamp = None  # re-read: a reused inode + coarse mtime can hide a change
                    self._refresh()
                    if self._keep_out is not None:
                        raise _KeepOut(self._keep_out)
                    entries = self._saved | self._unsaved
                    _write_atomic(self.path, entries)
                    self._saved, self._stamp = entries, _stamp(os.stat(self.path))
            except _KeepOut as e:
                if strict:
                    self._unsaved = unsaved_before
                    raise OSError(f"lk3d plan cache {self.path}: {e}; it is left as it is "
                                  "(`lk3d cache clear` replaces it)") from None
                self._warn(f"{e}; it is left as it is and plans are kept in memory for this "
                           "process")
                return
            except (OSError, filelock.Timeout) as e:
                if strict:
                    self._unsaved = unsaved_before
                    raise
                self._warn(f"cannot be written ({e}); plans are kept in memory for this process")
                return
            self._unsaved.clear()

    def _refresh(self) -> None:
        """Re-read the file if it changed since the last read. A file that cannot be read or is
        of another version: no entries, and ``_keep_out`` says why it must not be written; a
        malformed one: the entries that can be read (warned once)."""
        try:
            st = os.stat(self.path)
            if self._stamp is not None and _stamp(st) == self._stamp:
                return
            with open(self.path, "rb") as f:
                stamp, data = _stamp(os.fstat(f.fileno())), f.read()
        except (FileNotFoundError, NotADirectoryError):  # no file yet (writing will say why)
            self._saved, self._stamp, self._keep_out = {}, None, None
            return
        except OSError as e:  # it is there, but not for us to read: never to be replaced
            self._saved, self._stamp = {}, None
            self._keep_out = f"cannot be read ({e})"
            self._warn(f"{self._keep_out}; it is left as it is and plans are kept in memory for "
                       "this process")
            return
        parsed = _parse(data)
        self._saved, self._stamp = parsed.entries, stamp
        self._keep_out = parsed.problem if parsed.kind == "foreign" else None
        if parsed.kind == "foreign":
            self._warn(f"{parsed.problem}; it is left as it is and plans are kept in memory for "
                       "this process")
        elif parsed.kind == "malformed":
            self._warn(f"{parsed.problem}; they are ignored, the other {len(parsed.entries)} "
                       "kept, and the next stored plan rewrites the file without them")
        elif parsed.problem is not None:
            self._warn(f"{parsed.problem}; it is ignored and rewritten by the next stored plan")

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"lk3d plan cache {self.path}: {message}", RuntimeWarning, stacklevel=4)


class _KeepOut(Exception):
    """The cache file is there but must not be written (unreadable, another format version)."""


_DEFAULT: tuple[str | None, PlanCache] | None = None
_DEFAULT_LOCK = threading.Lock()


def default_cache() -> PlanCache:
    """The process-wide cache, made anew when ``LK3D_CACHE_DIR`` has changed since the last call."""
    global _DEFAULT
    env = os.environ.get("LK3D_CACHE_DIR") or None
    with _DEFAULT_LOCK:
        if _DEFAULT is None or _DEFAULT[0] != env:
            _DEFAULT = (env, PlanCache(env))
        return _DEFAULT[1]
