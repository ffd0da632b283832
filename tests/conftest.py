"""Test set-up shared by every test module.

The Triton interpreter must be switched on before Triton is first imported, so this happens here,
at collection time: on a machine without a GPU every test runs the real kernel code on CPU tensors
(``TRITON_INTERPRET=1``). With ``LK3D_TEST_DEVICE=cuda`` the interpreter stays off and the same
tests run on the GPU.
"""
import os
import tempfile

DEVICE = os.environ.get("LK3D_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Plans measured or cached by the tests never touch the user's cache, nor read from it; reports
# written by the tests go to a temporary folder, not the user's.
os.environ["LK3D_CACHE_DIR"] = tempfile.mkdtemp(prefix="lk3d-test-cache-")
os.environ["LK3D_REPORT_DIR"] = tempfile.mkdtemp(prefix="lk3d-test-reports-")
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), "lk3d-triton-cache"))

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=40, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def device():
    return torch.device(DEVICE)


@pytest.fixture
def no_tf32():
    """fp32 comparisons on CUDA: switch TF32 off for the test and restore it after."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
