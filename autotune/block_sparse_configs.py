"""Launch-config spaces of the block-sparse kernels (lk3d.kernels.block_sparse), as data, and their AOT cases.

Filled in with the kernels; ``aot_cases()`` gives the cases ``lk3d.autotune.aot.shipped_cases``
compiles for sm_80 and sm_90.
"""

CONFIG_SPACES = {}


def aot_cases():
    """AOT compile cases (built with ``lk3d.autotune.aot._case``) for every shipped config."""
    return []
