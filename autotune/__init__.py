"""lk3d.autotune: the planner's generic machinery. ``select``: the algorithm choice (forced,
cached, measured, modelled); ``registry``: the algorithms of each op, registered by the ops layer;
``configs``: the launch-config choice over the config spaces the kernel families register;
``cache``: the persistent plan cache; ``fingerprint``: the device and software stack.

    with lk3d.autotune.tune():     # measure every convolution whose plan is not cached yet
        model(x).sum().backward()
"""
from lk3d.autotune.select import Plan, tune

__all__ = ["Plan", "tune"]
