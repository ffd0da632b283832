"""lk3d.autotune: config spaces, device fingerprint, persistent plan cache, algorithm choice.

    with lk3d.autotune.tune():     # measure every convolution whose plan is not cached yet
        model(x).sum().backward()
"""
from lk3d.autotune.select import Plan, tune

__all__ = ["Plan", "tune"]
