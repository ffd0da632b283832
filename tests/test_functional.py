"""The call path of one ``lk3d.conv3d`` forward, traced with ``sys.setprofile``: the ops layer
calls the planner once (``select.execute``, which calls back the registered algorithm's checks,
cost models and runner) and a kernel family once (the launch); the output size is computed by the
argument check, the op and (with the kernels) the launcher, not again by the planner's callbacks.
``lk3d.kernels``' own shape helpers (``out_size``, ``memory_format``: functions of shapes shared by
both layers) are not counted as crossings."""
import os
import sys

import pytest
import torch

import lk3d
from lk3d import kernels

LAYERS = {"ops": os.path.dirname(lk3d.__file__),
          "autotune": os.path.dirname(lk3d.autotune.__file__),
          "kernels": os.path.dirname(kernels.__file__)}
SHAPE_HELPERS = os.path.join(LAYERS["kernels"], "__init__.py")


def _layer(path):
    # the longest folder first: lk3d.tools lives inside ops/ but is not called here
    for name, folder in sorted(LAYERS.items(), key=lambda kv: -len(kv[1])):
        if path.startswith(folder + os.sep):
            return name
    return None


def _trace(fn):
    calls = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_back is not None:
            calls.append((_layer(frame.f_back.f_code.co_filename),
                          _layer(frame.f_code.co_filename), frame.f_code.co_filename,
                          frame.f_code.co_name))

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.parametrize("algo,cin,launcher", [("aten", 3, None), ("tiled", 3, "conv3d_fwd"),
                                               ("tiled", 16, "conv3d_desc_fwd")],
                         ids=["aten", "tiled", "tiled-descriptor"])
def test_one_forward_crosses_once(monkeypatch, algo, cin, launcher):
    if algo == "tiled" and not kernels.INTERPRETED:
        pytest.skip("the kernels run on CPU tensors only under TRITON_INTERPRET=1")
    monkeypatch.setenv("LK3D_ALGO", algo)
    x, w, b = torch.randn(2, cin, 7, 6, 5), torch.randn(4, cin, 3, 2, 3), torch.randn(4)
    lk3d.conv3d(x, w, b, padding="same")  # first call: imports, caches
    calls = _trace(lambda: lk3d.conv3d(x, w, b, padding="same"))
    to_autotune = [name for src, dst, _, name in calls if src == "ops" and dst == "autotune"]
    to_kernels = [name for src, dst, path, name in calls
                  if src == "ops" and dst == "kernels" and path != SHAPE_HELPERS]
    assert to_autotune == ["execute"]
    assert to_kernels == ([launcher] if launcher else [])
    out_size_calls = sum(name == "out_size" for *_, name in calls)
    assert out_size_calls == (3 if algo == "tiled" else 2)
