"""Every shipped launch config runs once (under the interpreter on CPU) and matches the reference.

Channel counts are chosen so that each config's tiles are partly masked (channels not a multiple
of the block), and the gradient reductions run split over several programs.
"""
import json

import pytest
import torch
import torch.nn.functional as F

import lk3d
from _cases import TOL, rel_err
from lk3d.autotune.configs import Problem, default_config
from lk3d.kernels import common, tiled
from lk3d.kernels.tiled_configs import CONFIG_SPACES

ARGS = dict(stride=(1, 2, 1), padding=(1, 0, 2), dilation=(2, 1, 1))
# The launchers' geometry: padding as six ints (d_l, h_l, w_l, d_r, h_r, w_r).
GEO = (ARGS["stride"], ARGS["padding"] * 2, ARGS["dilation"])


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(common, "POISON", True)


def _ids(kind):
    return [f"{kind}-" + "-".join(f"{k}{v}" for k, v in c.items()) for c in CONFIG_SPACES[kind]]


def _dense(device, dtype=torch.float64, groups=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2 * 17, 5, 6, 7, generator=g, dtype=torch.float64)
    w = torch.randn(2 * 20, 17, 3, 2, 3, generator=g, dtype=torch.float64)
    return x.to(device, dtype), w.to(device, dtype)


def _depthwise(device, dtype=torch.float64, mult=2):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 9, 6, 7, generator=g, dtype=torch.float64)
    w = torch.randn(3 * mult, 1, 3, 2, 5, generator=g, dtype=torch.float64)
    return x.to(device, dtype), w.to(device, dtype)




@pytest.mark.parametrize("config", CONFIG_SPACES["conv3d_fwd"], ids=_ids("conv3d_fwd"))
def test_fwd_and_grad_input_configs(config, device):
    x, w = _dense(device)
    b = torch.randn(w.shape[0], dtype=x.dtype, device=device)
    ref = F.conv3d(x.cpu(), w.cpu(), b.cpu(), **ARGS, groups=2)
    y = tiled.conv3d_fwd(x, w, b, *GEO, 2, config)
    assert rel_err(y, ref) < TOL[torch.float64]
    gy = torch.randn_like(ref)
    want = torch.nn.grad.conv3d_input(x.shape, w.cpu(), gy, **ARGS, groups=2)
    got = tiled.conv3d_bwd_input(gy.to(device), w, x.shape, *GEO, 2, config)
    assert rel_err(got, want) < TOL[torch.float64]


@pytest.mark.parametrize("config", CONFIG_SPACES["conv3d_wgrad"], ids=_ids("conv3d_wgrad"))
def test_wgrad_configs(config, device):
    x, w = _dense(device)
    gy = torch.randn_like(F.conv3d(x.cpu(), w.cpu(), None, **ARGS, groups=2))
    want = torch.nn.grad.conv3d_weight(x.cpu(), w.shape, gy, **ARGS, groups=2)
    got = tiled.conv3d_bwd_weight(x, gy.to(device), w.shape, *GEO, 2, dict(config, SPLIT=3))
    assert rel_err(got, want) < TOL[torch.float64]


@pytest.mark.parametrize("config", CONFIG_SPACES["conv3d_dw"], ids=_ids("conv3d_dw"))
def test_depthwise_configs(config, device):
    x, w = _depthwise(device)
    b = torch.randn(w.shape[0], dtype=x.dtype, device=device)
    ref = F.conv3d(x.cpu(), w.cpu(), b.cpu(), **ARGS, groups=3)
    y = tiled.conv3d_dw_fwd(x, w, b, *GEO, config)
    assert rel_err(y, ref) < TOL[torch.float64]
    gy = torch.randn_like(ref)
    want = torch.nn.grad.conv3d_input(x.shape, w.cpu(), gy, **ARGS, groups=3)
    got = tiled.conv3d_dw_bwd_input(gy.to(device), w, x.shape, *GEO, config)
    assert rel_err(got, want) < TOL[torch.float64]


@pytest.mark.parametrize("config", CONFIG_SPACES["conv3d_dw_wgrad"], ids=_ids("conv3d_dw_wgrad"))
def test_depthwise_wgrad_configs(config, device):
    x, w = _depthwise(device)
    gy = torch.randn_like(F.conv3d(x.cpu(), w.cpu(), None, **ARGS, groups=3))
    want = torch.nn.grad.conv3d_weight(x.cpu(), w.shape, gy, **ARGS, groups=3)
    got = tiled.conv3d_dw_bwd_weight(x, gy.to(device), w.shape, *GEO, dict(config, SPLIT=3))
    assert rel_err(got, want) < TOL[torch.float64]


@pytest.mark.parametrize("config", CONFIG_SPACES["bias_grad"], ids=_ids("bias_grad"))
def test_bias_grad_configs(config, device):
    gy = torch.randn(3, 5, 4, 7, 9, dtype=torch.float64)
    got = tiled.bias_grad(gy.to(device), dict(config, SPLIT=4))
    assert rel_err(got, gy.sum((0, 2, 3, 4))) < TOL[torch.float64]


def test_forced_config_is_used(monkeypatch, device):
    """LK3D_CONFIG forces the keys it names; the result is unchanged."""
    forced = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
    monkeypatch.setenv("LK3D_CONFIG", json.dumps(forced))
    cfg = default_config(Problem("conv3d_fwd", M=1000, KC=40, NC=40), device)
    assert {k: cfg[k] for k in forced} == forced
    x, w = _dense(device)
    y = lk3d.conv3d(x, w, None, **ARGS, groups=2)
    assert rel_err(y, F.conv3d(x.cpu(), w.cpu(), None, **ARGS, groups=2)) < TOL[torch.float64]


def test_launcher_rejects_incomplete_config(device):
    x, w = _dense(device)
    with pytest.raises(ValueError, match="config: expected keys"):
        tiled.conv3d_fwd(x, w, None, (1, 1, 1), (0,) * 6, (1, 1, 1), 2, {"BLOCK_M": 32})


def test_prune_by_shared_memory_and_extent():
    from lk3d.autotune.configs import prune
    from lk3d.kernels.tiled_configs import shared_bytes

    configs = CONFIG_SPACES["conv3d_fwd"]
    big = Problem("conv3d_fwd", M=10**6, KC=256, NC=256)
    assert prune(configs, big, 10**9, 2) == configs
    limit = 40 * 1024
    kept = prune(configs, big, limit, 4)
    assert kept and all(shared_bytes(c, big, 4) <= limit for c in kept)
    assert len(kept) < len(configs)
    small = Problem("conv3d_fwd", M=10**6, KC=8, NC=8)  # 8 output channels: N tiles <= 16
    assert {c["BLOCK_N"] for c in prune(configs, small, 10**9, 2)} == {16}
    tiny = Problem("conv3d_fwd", M=4, KC=8, NC=8)       # nothing fits: the default pick
    assert len(prune(configs, tiny, 10**9, 2)) == 1
    dw = Problem("conv3d_dw", M=100)
    assert [c["BLOCK"] for c in prune(CONFIG_SPACES["conv3d_dw"], dw, 10**9, 2)] == [128, 256]


def test_config_families_registered():
    """Every family's kinds are known to the config choice; another family cannot claim one; an
    unknown kind is a ValueError naming the known ones."""
    import types

    from lk3d.autotune import configs
    from lk3d.kernels import (block_sparse_configs, cp_configs, depthwise_configs,
                              implicit_gemm_configs, tiled_configs)

    for family in (tiled_configs, depthwise_configs, implicit_gemm_configs, cp_configs,
                   block_sparse_configs):
        for kind, space in family.CONFIG_SPACES.items():
            assert configs.family(kind) is family and configs.space(kind) is space
        configs.register(family)  # again: nothing changes
    impostor = types.SimpleNamespace(CONFIG_SPACES={"conv3d_fwd": []})
    with pytest.raises(ValueError, match="'conv3d_fwd' is already registered by "
                                         "lk3d.kernels.tiled_configs"):
        configs.register(impostor)
    assert configs.space("conv3d_fwd") is CONFIG_SPACES["conv3d_fwd"]
    with pytest.raises(ValueError, match=r"kind: expected one of \[.*'cp_conv'.*\], got 'conv2d'"):
        default_config(Problem("conv2d", M=8), "cpu")


def test_config_spaces_are_the_kind_lists():
    """A family's CONFIG_SPACES holds its <KIND>_CONFIGS lists themselves under their kinds, in
    the order defined; a list that is empty or whose configs name different keys is a ValueError
    naming it. A split reduction takes one program under the interpreter, more on a device."""
    from lk3d.kernels import block_sparse_configs, config_spaces, cp_configs, tiled_configs

    assert list(CONFIG_SPACES) == ["conv3d_fwd", "conv3d_dw", "conv3d_wgrad", "conv3d_dw_wgrad",
                                   "bias_grad"]
    assert CONFIG_SPACES["conv3d_dw_wgrad"] is tiled_configs.CONV3D_DW_WGRAD_CONFIGS
    assert list(block_sparse_configs.CONFIG_SPACES) == [
        "block_sparse_fwd", "block_sparse_desc", "block_sparse_desc_wgrad", "block_sparse_dw",
        "block_sparse_wgrad", "block_sparse_dw_wgrad"]
    assert list(cp_configs.CONFIG_SPACES) == ["cp_conv", "cp_grad", "cp_sep"]
    space = [dict(BLOCK=16, num_warps=4), dict(BLOCK=32, num_warps=8)]
    assert config_spaces({"DW_FWD_CONFIGS": space, "RUNTIME_KEYS": ("SPLIT",)}) == {
        "dw_fwd": space}
    with pytest.raises(ValueError, match=r"^MIXED_CONFIGS: expected a non-empty list of configs "
                                         r"that all name the same keys, got \[\{'BLOCK': 16\}, "
                                         r"\{'BLOCK_M': 16\}\]$"):
        config_spaces({"MIXED_CONFIGS": [dict(BLOCK=16), dict(BLOCK_M=16)]})
    with pytest.raises(ValueError, match=r"^EMPTY_CONFIGS: expected .*, got \[\]$"):
        config_spaces({"EMPTY_CONFIGS": []})

    wgrad = Problem("conv3d_wgrad", M=10**6, programs=7, partial=1000)
    assert tiled_configs.split(wgrad, dict(BLOCK_K=64), None) == 1
    assert tiled_configs.split(wgrad, dict(BLOCK_K=64), 528) == 75  # 528 // 7 programs
    bs = Problem("block_sparse_wgrad", M=10**6, programs=7, block_shape=(4, 4, 1, 1, 1))
    assert block_sparse_configs.split(bs, dict(BLOCK_S=64), None) == 1
    assert block_sparse_configs.split(bs, dict(BLOCK_S=64), 528) == 75
