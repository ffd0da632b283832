"""Test set-up shared by every test module.

The Triton interpreter must be switched on before Triton is first imported, so this happens here,
at collection time: on a machine without a GPU every test runs the real kernel code on CPU tensors
(``TRITON_INTERPRET=1``). With ``LK3D_TEST_DEVICE=cuda`` the interpreter stays off and the same
tests run on the GPU.

``LK3D_RECORD_SPECIALISATIONS=PATH`` (under the interpreter): the compile key of every kernel
launch the session runs (``lk3d.tools.launch_record.interpreted_compile_keys``: the kernel
binaries a GPU would compile for the same calls) is appended to PATH, one JSON object a line,
each distinct key once per process. tests/test_gpu_run.py counts those of the CUDA subset.
"""
import contextlib
import json
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


_RECORDING = contextlib.ExitStack()


def pytest_configure(config):
    path = os.environ.get("LK3D_RECORD_SPECIALISATIONS")
    if path and DEVICE == "cpu":
        from lk3d.tools.launch_record import interpreted_compile_keys

        keys = _RECORDING.enter_context(interpreted_compile_keys())
        _RECORDING.callback(_append_keys, path, keys)


def pytest_unconfigure(config):
    _RECORDING.close()


def _append_keys(path, keys):
    lines = dict.fromkeys(json.dumps(k, sort_keys=True) for k in keys)
    with open(path, "a") as f:
        f.writelines(line + "\n" for line in lines)


@pytest.fixture
def device():
    return torch.device(DEVICE)


@pytest.fixture
def needs_tensorly():
    """Skips a test of lk3d.decompose's solvers (and what calls them: ``from_conv``,
    ``convert(to="cp")``) where TensorLy, the decompose extra, does not import; the rest of
    lk3d.decompose runs without it. ``@pytest.mark.usefixtures("needs_tensorly")``."""
    try:
        import tensorly  # noqa: F401
    except ImportError as e:
        pytest.skip(f"needs TensorLy, the solver of lk3d.decompose (pip install "
                    f"'lk3d[decompose]'), which does not import here: {e}")


@pytest.fixture
def no_tf32():
    """fp32 comparisons on CUDA: switch TF32 off for the test and restore it after."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
