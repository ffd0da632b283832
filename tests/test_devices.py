"""The named GPUs' figures, the goal cases, and the CUDA plans modelled from a named GPU
(``lk3d explain --device``) on a machine without it."""
import json
import math

import pytest
import torch

from lk3d import _algos
from lk3d.autotune import devices
from lk3d.tools import bench, explain_device
from lk3d.tools.cli import main

GOALS = {"G1": ("depthwise", 2, 48, 48, (96,) * 3, (21,) * 3),
         "G2": ("depthwise", 2, 96, 96, (96,) * 3, (7,) * 3),
         **{f"G3-k{k}": ("dense", 1, 64, 64, (64,) * 3, (k,) * 3) for k in (7, 11, 15)},
         "G4": ("cp", 2, 64, 64, (64,) * 3, (21,) * 3),
         **{f"G5-{d}": ("block_sparse", 1, 64, 64, (32,) * 3, (15,) * 3)
            for d in ("d10", "d50", "dense")}}


def test_goal_cases_parse():
    cases = {c.name: c for c in bench.CASE_SETS["goals"]}
    assert list(cases) == list(GOALS)
    for name, (op, n, cin, cout, size, kernel) in GOALS.items():
        c = cases[name]
        assert (c.op, c.N, c.Cin, c.Cout, c.size, c.kernel) == (op, n, cin, cout, size, kernel)
        assert (c.dtype, c.padding) == ("bfloat16", "same")
    assert cases["G4"].rank == 16
    assert [cases[f"G5-{d}"].density for d in ("d10", "d50", "dense")] == [0.1, 0.5, 1.0]
    assert all(cases[f"G5-{d}"].block == (16, 16, 1, 1, 1) for d in ("d10", "d50", "dense"))


@pytest.mark.parametrize("name", sorted(devices.NAMED))
def test_named_figures_are_positive(name):
    gpu = devices.named(name)
    figures = gpu.as_dict()
    assert all(v > 0 for k, v in figures.items() if k != "name"), figures
    assert gpu.tensor_16 > gpu.tensor_tf32 > gpu.fma_fp32
    with pytest.raises(ValueError, match=r"device: expected one of h100, h200, a100, got 'v100'"):
        devices.named("v100")


def test_a_cuda_device_is_matched_by_name_else_derived(monkeypatch):
    class Props:
        name, multi_processor_count, major = "NVIDIA H100 80GB HBM3", 132, 9

    monkeypatch.setattr(devices, "_LOCAL", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    assert devices.of(torch.device("cuda", 0)) == devices.named("h100")
    Props.name, Props.multi_processor_count, Props.major = "Some GPU", 10, 8
    monkeypatch.setattr(devices, "_LOCAL", {})
    gpu = devices.of(torch.device("cuda", 0))
    assert gpu.sms == 10 and gpu.tensor_16 == 2048 * 10 * gpu.clock_hz


def _explain_json(tmp_path, name, threads, monkeypatch, *args):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    path = tmp_path / f"{name}-{threads}.json"
    assert main(["explain", "--device", "h100", "--case", name, "--json", str(path), *args]) == 0
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", ["G1", "G4", "G5-d10"])
def test_explain_device_does_not_depend_on_host_threads(name, tmp_path, monkeypatch, capsys):
    one = _explain_json(tmp_path, name, 1, monkeypatch)
    sixteen = _explain_json(tmp_path, name, 16, monkeypatch)
    assert one == sixteen
    assert one["device"] == "h100" and one["case"] == name
    for plan in one["passes"].values():
        assert plan["source"] == "model" and "aten" in plan["candidates_ms"]
        assert plan["algorithm"] in plan["candidates_ms"]
        assert all(0 < ms < math.inf for ms in plan["candidates_ms"].values())
    assert f"{name} on h100" in capsys.readouterr().out


def test_g1_depthwise_21_goes_to_the_fft_on_h100(tmp_path, monkeypatch):
    """Depthwise 21³: lk3d's channels-innermost depthwise kernels run at ~58% of the FMA peak
    (their issue ceiling), cuDNN at a few per cent; the FFT, priced from its passes' bytes and
    FLOPs, whose cost does not grow with k, is still several times cheaper than either."""
    passes = _explain_json(tmp_path, "G1", 2, monkeypatch)["passes"]
    assert set(passes) == {"forward", "grad_input", "grad_weight"}
    for plan in passes.values():
        times = plan["candidates_ms"]
        assert plan["algorithm"] == "fft" and 5 * times["fft"] < min(times["tiled"],
                                                                     times["aten"])


@pytest.mark.parametrize("device", sorted(devices.NAMED))
def test_block_sparse_route_on_a_named_device(device):
    """At density 1 the dense route wins every pass (the kernels do the dense work with gathers);
    the sparse route's time grows with the stored blocks."""
    cases = {c.name: c for c in bench.CASE_SETS["goals"]}
    full = explain_device.case_passes(device, cases["G5-dense"])
    tenth = explain_device.case_passes(device, cases["G5-d10"])
    assert set(full) == {"forward", "grad_input", "grad_values"}
    for pass_, plan in full.items():
        assert plan["algorithm"] == "dense", (pass_, plan)
        assert set(plan["candidates_ms"]) == {"sparse", "dense", "aten"}
        assert tenth[pass_]["candidates_ms"]["sparse"] < plan["candidates_ms"]["sparse"] / 5


def test_cuda_model_takes_figures():
    """A named GPU's figures price a CUDA plan; a faster GPU's plan costs less. The CPU model
    model still takes a torch.device."""
    args = ([1, 16, 32, 32, 32], [16, 16, 7, 7, 7], [1] * 3, [3] * 6, [1] * 3, 1, torch.bfloat16)
    for algo in ("tiled", "fft", "aten"):
        a100 = _algos.model_ms(algo, *args, devices.named("a100"))
        h200 = _algos.model_ms(algo, *args, devices.named("h200"))
        assert 0 < h200 < a100 < math.inf
    cpu = _algos.model_ms("aten", *args[:-1], torch.float32, torch.device("cpu"))
    assert 0 < cpu < math.inf


def test_explain_device_raw_shapes_and_bad_arguments(tmp_path, capsys):
    path = tmp_path / "raw.json"
    assert main(["explain", "--device", "a100", "--input", "1,8,9,9,9", "--weight",
                 "8,1,5,5,5", "--groups", "8", "--padding", "same", "--json", str(path)]) == 0
    out = json.loads(path.read_text())
    assert out["device"] == "a100" and set(out["passes"]) == {"forward", "grad_input",
                                                             "grad_weight"}
    with pytest.raises(SystemExit):
        main(["explain", "--device", "cpu", "--case", "G1", "--json", str(path)])
    assert "--json: expected --device one of h100, h200, a100" in capsys.readouterr().err
