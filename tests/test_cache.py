"""The per-device plan cache: round trip, concurrent writers, bad files, config-space invalidation,
problem-key bucketing, the device fingerprint, export/import, an unwritable directory and seeds.

Every test works in its own ``tmp_path``; ``LK3D_CACHE_DIR`` points there too, so the user's real
cache is never touched.
"""
import copy
import json
import subprocess
import sys
import time
import warnings

import pytest
import torch

from lk3d.autotune import cache
from lk3d.autotune.cache import PlanCache, default_cache, problem_key, space_hash
from lk3d.kernels.tiled_configs import CONFIG_SPACES
from lk3d.autotune.fingerprint import device_fingerprint, fingerprint_id, hardware_id

FP = "0123abcd-4567ef01"
KEY = problem_key("conv3d", torch.float32, (2, 16, 64, 64, 64), (16, 1, 7, 7, 7), 1, [3] * 6, 1, 16)
SPACE = space_hash(CONFIG_SPACES["conv3d_fwd"])
PACKAGED_SEEDS = cache._seed_entries  # before the fixture below stubs it out
PLAN = {"algo": "tiled", "config": dict(CONFIG_SPACES["conv3d_fwd"][0]), "ms": 1.25,
        "source": "measured"}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test sees the user's cache or a seed plan it did not ask for."""
    monkeypatch.setenv("LK3D_CACHE_DIR", str(tmp_path / "env-cache"))
    monkeypatch.setattr(cache, "_DEFAULT", None)
    monkeypatch.setattr(cache, "_seed_entries", dict)


def _runtime_warnings(record):
    return [w for w in record if issubclass(w.category, RuntimeWarning)]


def test_round_trip(tmp_path):
    PlanCache(tmp_path).put(FP, KEY, SPACE, PLAN)
    fresh = PlanCache(tmp_path)
    assert fresh.get(FP, KEY, SPACE) == PLAN
    assert fresh.get(FP, KEY + "x", SPACE) is None
    assert fresh.entries() == 1
    doc = json.loads(fresh.path.read_text())
    assert doc["version"] == 1 and list(doc["entries"]) == [f"{FP}|{SPACE}|{KEY}"]


def test_get_returns_a_copy(tmp_path):
    c = PlanCache(tmp_path)
    c.put(FP, KEY, SPACE, PLAN)
    c.get(FP, KEY, SPACE)["config"]["BLOCK_M"] = -1
    assert c.get(FP, KEY, SPACE) == PLAN


def test_sees_other_writers(tmp_path):
    reader, writer = PlanCache(tmp_path), PlanCache(tmp_path)
    assert reader.get(FP, KEY, SPACE) is None
    writer.put(FP, KEY, SPACE, PLAN)
    assert reader.get(FP, KEY, SPACE) == PLAN


def test_put_rejects_what_json_cannot_hold(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        PlanCache(tmp_path).put(FP, KEY, SPACE, {"algo": object()})


_WRITER = """
import os, sys, time
from lk3d.autotune.cache import PlanCache
directory, sync, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = PlanCache(directory)
open(os.path.join(sync, f"ready{rank}"), "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(os.path.join(sync, "go")):
    if time.monotonic() > deadline:
        sys.exit("no go signal")
    time.sleep(0.002)
for i in range(25):
    c.put("fp", f"key{rank}-{i}", "space", {"rank": rank, "i": i})
"""


def test_four_processes_lose_nothing(tmp_path):
    """Four writers start their 25 puts each at the same moment; all 100 plans survive."""
    directory, sync = tmp_path / "cache", tmp_path / "sync"
    sync.mkdir()
    procs = [subprocess.Popen([sys.executable, "-W", "error::RuntimeWarning", "-c", _WRITER,
                               str(directory), str(sync), str(rank)], stderr=subprocess.PIPE)
             for rank in range(4)]
    try:
        deadline = time.monotonic() + 120
        while len(list(sync.glob("ready*"))) < 4 and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), "a writer died before the start"
            time.sleep(0.01)
        (sync / "go").touch()
        errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * 4, errors
    c = PlanCache(directory)
    assert c.entries() == 100
    for rank in range(4):
        for i in range(25):
            assert c.get("fp", f"key{rank}-{i}", "space") == {"rank": rank, "i": i}
    assert not list(directory.glob("*.tmp")), "a temporary file was left behind"


def _truncated(path):
    c = PlanCache(path.parent)
    for i in range(5):
        c.put(FP, f"{KEY}{i}", SPACE, PLAN)
    text = path.read_bytes()
    return text[: len(text) // 2]


BAD_FILES = {
    "garbage": lambda path: bytes(range(256)) * 4,
    "truncated": _truncated,
    "wrong-version": lambda path: json.dumps(
        {"version": 0, "entries": {f"{FP}|{SPACE}|{KEY}": PLAN}}).encode(),
    "not-an-object": lambda path: b"[1, 2, 3]",
    "bad-entry": lambda path: json.dumps({"version": 1, "entries": {"no-bars": PLAN}}).encode(),
}


@pytest.mark.parametrize("kind", [k for k in BAD_FILES if k != "wrong-version"])
def test_bad_file_warns_once_and_is_rewritten(tmp_path, kind):
    """Nothing in the file can be read (or only malformed entries): it is rewritten. A file of
    another format version is not: ``test_file_of_another_format_version_is_never_replaced``."""
    path = PlanCache(tmp_path).path
    path.write_bytes(BAD_FILES[kind](path))
    c = PlanCache(tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert c.get(FP, KEY, SPACE) is None
        assert c.get(FP, KEY, SPACE) is None
        assert c.entries() == 0
        c.put(FP, KEY, SPACE, PLAN)
        assert c.get(FP, KEY, SPACE) == PLAN
    found = _runtime_warnings(record)
    assert len(found) == 1, [str(w.message) for w in found]
    assert str(path) in str(found[0].message)
    doc = json.loads(path.read_text())
    assert doc["version"] == 1 and doc["entries"] == {f"{FP}|{SPACE}|{KEY}": PLAN}
    assert PlanCache(tmp_path).get(FP, KEY, SPACE) == PLAN


def test_config_space_change_invalidates_only_its_kernel(tmp_path):
    spaces = copy.deepcopy(CONFIG_SPACES)
    c = PlanCache(tmp_path)
    before = {kind: space_hash(spaces[kind]) for kind in ("conv3d_fwd", "conv3d_dw")}
    for kind, space in before.items():
        c.put(FP, KEY, space, {"algo": kind})
    spaces["conv3d_fwd"][0]["num_stages"] += 1
    after = {kind: space_hash(spaces[kind]) for kind in before}
    assert after["conv3d_fwd"] != before["conv3d_fwd"]
    assert after["conv3d_dw"] == before["conv3d_dw"]
    fresh = PlanCache(tmp_path)
    assert fresh.get(FP, KEY, after["conv3d_fwd"]) is None
    assert fresh.get(FP, KEY, after["conv3d_dw"]) == {"algo": "conv3d_dw"}


def test_space_hash_ignores_key_order_within_a_config():
    configs = CONFIG_SPACES["conv3d_dw"]
    assert space_hash([dict(reversed(c.items())) for c in configs]) == space_hash(configs)
    assert space_hash(configs[::-1]) != space_hash(configs)


def _key(n=2, spatial=(64, 64, 64), padding=(3,) * 6, **kw):
    args = dict(op="conv3d", dtype=torch.float32, input_shape=(n, 16, *spatial),
                weight_shape=(16, 1, 7, 7, 7), stride=1, padding=padding, dilation=1, groups=16)
    return problem_key(**(args | kw))


def test_problem_key_format():
    assert _key() == "conv3d|float32|N2|C16->16|g16|S64x64x64|k7x7x7|s1x1x1|d1x1x1|p3x3x3x3x3x3"


def test_problem_key_buckets_batch_and_space():
    assert _key(n=3) == _key(n=4) != _key(n=5)
    assert _key(spatial=(33, 64, 64)) == _key(spatial=(64, 64, 64)) != _key(spatial=(65, 64, 64))
    assert _key(spatial=(64, 64, 33)) == _key() != _key(spatial=(64, 64, 65))


def test_problem_key_is_exact_elsewhere():
    assert _key(padding=(3,) * 6) != _key(padding=(3, 3, 3, 3, 3, 4))
    assert _key(padding=(3,) * 6) != _key(padding="same")
    assert _key(padding=3) == _key(padding=(3, 3, 3)) == _key(padding=[3] * 6)
    assert _key(stride=(1, 1, 1)) == _key() != _key(stride=(1, 2, 1))
    assert _key(dilation=2) != _key()
    assert _key(dtype=torch.bfloat16) != _key()
    assert _key(op="conv3d_wgrad") != _key()
    assert _key(groups=1, weight_shape=(16, 16, 7, 7, 7)) != _key()
    assert _key(weight_shape=(16, 1, 7, 7, 5)) != _key()


@pytest.mark.parametrize("bad", [dict(input_shape=(2, 16, 64, 64)), dict(stride=(1, 2)),
                                 dict(padding=(1, 2, 3, 4)), dict(dilation="2")],
                         ids=["input-4d", "stride-2", "padding-4", "dilation-str"])
def test_problem_key_rejects_malformed_arguments(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        _key(**bad)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield threads
    torch.set_num_threads(threads)


def test_fingerprint_is_stable_and_follows_the_thread_count(restore_threads):
    fp = device_fingerprint(torch.device("cpu"))
    json.dumps(fp)
    assert fp["type"] == "cpu" and fp["name"] and fp["threads"] == restore_threads
    assert fp["torch"] == torch.__version__ and fp["lk3d"]
    fp["name"] = "changed by the caller"
    again = device_fingerprint("cpu")
    assert again == device_fingerprint("cpu") != fp
    assert fingerprint_id(again) == fingerprint_id(dict(reversed(again.items())))
    torch.set_num_threads(restore_threads + 1)
    other = device_fingerprint("cpu")
    assert other["threads"] == restore_threads + 1
    assert fingerprint_id(other) != fingerprint_id(again)
    assert hardware_id(fingerprint_id(other)) != hardware_id(fingerprint_id(again))


def test_fingerprint_id_splits_hardware_from_software():
    fp = device_fingerprint("cpu")
    upgraded = fp | {"torch": "99.0"}
    assert fingerprint_id(upgraded) != fingerprint_id(fp)
    assert hardware_id(fingerprint_id(upgraded)) == hardware_id(fingerprint_id(fp))


def test_export_import_round_trip(tmp_path):
    source = PlanCache(tmp_path / "a")
    for i in range(3):
        source.put(FP, f"{KEY}{i}", SPACE, PLAN | {"ms": float(i)})
    assert source.export(tmp_path / "plans.json") == 3
    target = PlanCache(tmp_path / "b")
    target.put(FP, "already there", SPACE, PLAN)
    assert target.import_(tmp_path / "plans.json") == 3
    fresh = PlanCache(tmp_path / "b")
    assert fresh.entries() == 4
    assert [fresh.get(FP, f"{KEY}{i}", SPACE)["ms"] for i in range(3)] == [0.0, 1.0, 2.0]
    fresh.clear()
    assert fresh.entries() == 0
    assert PlanCache(tmp_path / "b").get(FP, "already there", SPACE) is None


@pytest.mark.parametrize("kind", ["garbage", "wrong-version", "not-an-object", "bad-entry"])
def test_import_of_a_bad_file_names_it(tmp_path, kind):
    bad = tmp_path / "bad.json"
    bad.write_bytes(BAD_FILES[kind](bad))
    c = PlanCache(tmp_path / "cache")
    with pytest.raises(ValueError, match="bad.json"):
        c.import_(bad)
    assert c.entries() == 0


@pytest.mark.parametrize("how", ["read-only", "file-in-the-way"])
def test_unwritable_directory_warns_once_and_works_in_memory(tmp_path, how):
    if how == "read-only":
        directory = tmp_path / "ro"
        directory.mkdir()
        directory.chmod(0o500)
        try:  # root (with CAP_DAC_OVERRIDE) ignores directory permissions
            (directory / "probe").touch()
        except PermissionError:
            pass
        else:
            directory.chmod(0o700)
            pytest.skip("this user can write into a read-only directory (root)")
    else:  # works as root too: the cache directory's parent is a regular file
        (tmp_path / "file").write_text("")
        directory = tmp_path / "file" / "cache"
    c = PlanCache(directory)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            c.put(FP, KEY, SPACE, PLAN)
            c.put(FP, KEY + "2", SPACE, PLAN)
            assert c.get(FP, KEY, SPACE) == PLAN and c.entries() == 2
        found = _runtime_warnings(record)
        assert len(found) == 1 and str(c.path) in str(found[0].message)
        assert PlanCache(directory).get(FP, KEY, SPACE) is None
    finally:
        if how == "read-only":
            directory.chmod(0o700)


def test_seeds_are_consulted_after_the_user_cache(tmp_path, monkeypatch):
    seeded = {"algo": "fft", "config": {}, "ms": 3.0, "source": "measured"}
    hw_only = fingerprint_id(device_fingerprint("cpu") | {"torch": "0.0"})
    monkeypatch.setattr(cache, "_seed_entries", lambda: {
        f"{FP}|{SPACE}|{KEY}": seeded,
        f"{hardware_id(hw_only)}|{SPACE}|other": seeded,
    })
    c = PlanCache(tmp_path)
    assert c.get(FP, KEY, SPACE) == seeded | {"source": "seed"}
    assert c.get(FP, KEY, space_hash([])) is None
    fid = fingerprint_id(device_fingerprint("cpu"))
    assert c.get(fid, "other", SPACE) == seeded | {"source": "seed"}  # matched on hardware alone
    c.put(FP, KEY, SPACE, PLAN)
    assert c.get(FP, KEY, SPACE) == PLAN
    assert c.entries() == 1


def test_packaged_seeds_file_loads_cleanly():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seeds = PACKAGED_SEEDS.__wrapped__()
    assert isinstance(seeds, dict)


def test_default_cache_follows_the_environment(tmp_path, monkeypatch):
    first = default_cache()
    assert first.directory == tmp_path / "env-cache" and default_cache() is first
    monkeypatch.setenv("LK3D_CACHE_DIR", str(tmp_path / "elsewhere"))
    second = default_cache()
    assert second is not first and second.path.parent == tmp_path / "elsewhere"
    monkeypatch.delenv("LK3D_CACHE_DIR")
    assert PlanCache().directory != tmp_path / "elsewhere"


def test_device_id_is_the_fingerprint_id_memoised():
    from lk3d.autotune.fingerprint import device_id
    assert device_id("cpu") == fingerprint_id(device_fingerprint("cpu"))
    assert device_id(torch.device("cpu")) is device_id("cpu")
    threads = torch.get_num_threads()
    try:  # the thread count is part of a CPU fingerprint: a new count, a new id
        torch.set_num_threads(threads + 1)
        assert device_id("cpu") == fingerprint_id(device_fingerprint("cpu"))
        assert device_id("cpu") != fingerprint_id(device_fingerprint("cpu") | {"threads": threads})
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# a file that cannot be read is never replaced
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def unreadable(monkeypatch):
    """``unreadable(path)``: from now on opening ``path`` raises PermissionError, as a file of
    mode 000 does for a user without CAP_DAC_OVERRIDE (these tests also run as root, where chmod
    would not stop the read); ``unreadable.heal()`` makes it readable again."""
    real_open = open
    blocked = set()

    def fake_open(file, *args, **kwargs):
        if str(file) in blocked:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(cache, "open", fake_open, raising=False)

    def block(path):
        blocked.add(str(path))
    block.heal = blocked.clear
    return block


def test_unreadable_file_is_never_replaced(tmp_path, unreadable):
    PlanCache(tmp_path).put(FP, KEY, SPACE, PLAN)
    c = PlanCache(tmp_path)
    before = c.path.read_bytes()
    unreadable(c.path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert c.get(FP, KEY, SPACE) is None  # cannot see it, but ...
        c.put(FP, KEY + "2", SPACE, PLAN)
        c.put(FP, KEY + "3", SPACE, PLAN)
        assert c.get(FP, KEY + "2", SPACE) == PLAN  # ... works in memory
        assert c.entries() == 2
    found = _runtime_warnings(record)
    assert len(found) == 1, [str(w.message) for w in found]
    assert str(c.path) in str(found[0].message) and "Permission denied" in str(found[0].message)
    assert c.path.read_bytes() == before  # ... and never replaces it
    with pytest.raises(OSError, match="cannot be read"):  # an explicit import raises instead
        c.import_(_exported(tmp_path))
    assert c.path.read_bytes() == before
    unreadable.heal()  # readable again: the next plan is merged with what the file held
    c.put(FP, KEY + "4", SPACE, PLAN)
    fresh = PlanCache(tmp_path)
    assert fresh.entries() == 4
    assert all(fresh.get(FP, KEY + s, SPACE) == PLAN for s in ("", "2", "3", "4"))


def _exported(tmp_path):
    source = PlanCache(tmp_path / "source")
    source.put(FP, KEY + "x", SPACE, PLAN)
    source.export(tmp_path / "exported.json")
    return tmp_path / "exported.json"


def test_directory_in_place_of_the_file_warns_once(tmp_path):
    c = PlanCache(tmp_path)
    c.path.mkdir(parents=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        c.put(FP, KEY, SPACE, PLAN)
        c.put(FP, KEY + "2", SPACE, PLAN)
        assert c.get(FP, KEY, SPACE) == PLAN and c.entries() == 2
    found = _runtime_warnings(record)
    assert len(found) == 1, [str(w.message) for w in found]
    assert str(c.path) in str(found[0].message)
    assert c.path.is_dir() and not any(c.path.iterdir())


def test_file_of_another_format_version_is_never_replaced(tmp_path):
    path = PlanCache(tmp_path).path
    path.parent.mkdir(parents=True, exist_ok=True)
    foreign = json.dumps({"version": 2, "entries": {"whatever": {"algo": "new"}}}).encode()
    path.write_bytes(foreign)
    c = PlanCache(tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        c.put(FP, KEY, SPACE, PLAN)
        assert c.get(FP, KEY, SPACE) == PLAN
    found = _runtime_warnings(record)
    assert len(found) == 1 and "version 2" in str(found[0].message), found
    assert path.read_bytes() == foreign


def test_malformed_entries_are_dropped_the_rest_kept(tmp_path):
    path = PlanCache(tmp_path).path
    path.parent.mkdir(parents=True, exist_ok=True)
    good = f"{FP}|{SPACE}|{KEY}"
    path.write_text(json.dumps({"version": 1, "entries": {good: PLAN, "no-bars": PLAN,
                                                          f"{FP}|{SPACE}|odd": [1]}}))
    c = PlanCache(tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert c.get(FP, KEY, SPACE) == PLAN
        c.put(FP, KEY + "2", SPACE, PLAN)
    found = _runtime_warnings(record)
    assert len(found) == 1 and "2 malformed entries" in str(found[0].message), found
    assert set(json.loads(path.read_text())["entries"]) == {good, f"{FP}|{SPACE}|{KEY}2"}
