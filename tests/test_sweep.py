"""`lk3d tune`'s sweep: it measures each pass once, stores winners, and reads layer files."""
import json

import pytest
import torch

import lk3d
from lk3d import _algos, _conv_ops
from lk3d.autotune.cache import default_cache
from lk3d.tools import sweep

TINY = [sweep.Layer("dw", 1, 2, 2, 2, (6, 5, 7), (3, 3, 3)),
        sweep.Layer("dense", 2, 3, 4, 1, (5, 6, 5), (3, 2, 3), padding=1, backward=False)]


@pytest.fixture
def no_kernels(monkeypatch, tmp_path):
    """fft and aten only (the interpreted kernels are far too slow to time), fresh cache."""
    monkeypatch.setattr(_algos, "kernels_can_run", lambda t: False)
    monkeypatch.setattr(_conv_ops, "INTERPRETED", False)
    monkeypatch.setenv("LK3D_CACHE_DIR", str(tmp_path / "cache"))


def test_tune_layers_measures_and_stores(no_kernels):
    rows = sweep.tune_layers(TINY, torch.device("cpu"), progress=False)
    assert [(r["layer"], r["pass_"]) for r in rows] == [
        ("dw", "forward"), ("dw", "grad_input"), ("dw", "grad_weight"), ("dense", "forward")]
    for r in rows:
        assert r["algo"] in ("fft", "aten")
        assert r["source"] == "cache"  # measured during the sweep, read back by explain
        assert r["ms"] > 0 and r["aten_ms"] > 0
        assert r["speedup"] == pytest.approx(r["aten_ms"] / r["ms"])
    assert default_cache().entries() == 4
    table = sweep.format_rows(rows)
    assert "grad_weight" in table and "speedup" in table
    # A second sweep measures nothing new.
    sweep.tune_layers(TINY, torch.device("cpu"), progress=False)
    assert default_cache().entries() == 4


def test_tuned_plan_is_used(no_kernels):
    layer = TINY[1]
    sweep.tune_layers([layer], torch.device("cpu"), progress=False)
    x, w = layer.tensors("cpu")
    plan = lk3d.explain(x, w, None, **layer.args())["forward"]
    assert plan["source"] == "cache" and set(plan["times_ms"]) == {"fft", "aten"}
    assert plan["algo"] == min(plan["times_ms"], key=plan["times_ms"].get)
    ref = torch.nn.functional.conv3d(x.double(), w.double(), None, **layer.args())
    y = lk3d.conv3d(x, w, None, **layer.args())
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_load_layers(tmp_path):
    path = tmp_path / "layers.json"
    path.write_text(json.dumps([{"N": 1, "cin": 4, "cout": 4, "groups": 4, "size": 16,
                                 "kernel": [7, 7, 5], "padding": "same"}]))
    (layer,) = sweep.load_layers(path)
    assert layer.size == (16, 16, 16) and layer.kernel == (7, 7, 5) and layer.name == "layer0"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        sweep.load_layers(bad)
    bad.write_text(json.dumps([{"N": 1, "cin": 4, "cout": 4, "groups": 4, "size": 8,
                                "kernel": 3, "colour": "red"}]))
    with pytest.raises(ValueError, match="colour"):
        sweep.load_layers(bad)
    bad.write_text(json.dumps([{"N": 1, "cin": 4, "cout": 4, "groups": 4, "size": 8,
                                "kernel": 3, "dtype": "int8"}]))
    with pytest.raises(ValueError, match="dtype"):
        sweep.load_layers(bad)


def test_builtin_suites_are_real_layers():
    names = [layer.name for layer in sweep.GPU_SUITE]
    assert any("uxnet-dw7" in n for n in names) and any("repux-dw21" in n for n in names)
    assert {layer.kernel for layer in sweep.GPU_SUITE} >= {(7, 7, 7), (21, 21, 21), (15, 15, 15)}
    for layer in sweep.GPU_SUITE + sweep.CPU_SUITE:
        assert layer.cin % layer.groups == 0 and layer.cout % layer.groups == 0
