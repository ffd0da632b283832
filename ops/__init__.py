"""lk3d: fast large 3D convolution kernels for PyTorch (dense, grouped, depthwise) in Triton.

    import lk3d
    y = lk3d.conv3d(x, w, b, stride=1, padding="same", groups=x.shape[1])   # like F.conv3d
    model = lk3d.nn.convert(model)                                           # swap nn.Conv3d
    factors, err = lk3d.decompose.cp(w, rank=16)                             # rank-16 CP kernel
    y = lk3d.cp_conv3d(x, factors, b, padding="same")                        # = F.conv3d(x, W_cp)
    ws = lk3d.BlockSparseWeight.from_dense(w, (4, 4, 1, 1, 1), density=0.25)  # keep 1/4 of blocks
    y = lk3d.block_sparse_conv3d(x, ws, b, padding="same")                   # = F.conv3d(x, dense)
"""
from importlib.metadata import PackageNotFoundError, version

from lk3d import decompose, nn
from lk3d.block_sparse import BlockSparseWeight, block_sparse_conv3d
from lk3d.cp import CPFactors, cp_conv3d
from lk3d.functional import conv3d, explain
from lk3d.kernels.weight_cache import clear_weight_cache

try:
    __version__ = version("lk3d")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["conv3d", "explain", "cp_conv3d", "CPFactors", "block_sparse_conv3d",
           "BlockSparseWeight", "clear_weight_cache", "decompose", "nn", "__version__"]
