"""Every shipped kernel config compiles ahead of time for sm_80 and sm_90 (no GPU needed): no
register spills, shared memory within the per-block opt-in limit, and tensor-core instructions
where a ``tl.dot`` on 16-bit or tf32 operands should use them. See ``lk3d.tools.aot``."""
import os
import tempfile

import pytest

pytest.importorskip("triton")

from lk3d.tools import aot  # noqa: E402  (after the skip: it imports triton)

# One xdist worker takes the whole module (``--dist loadgroup``): the compile fixture below
# compiles every selected case once, in parallel child processes, for that worker's tests.
pytestmark = [pytest.mark.skipif(not os.path.exists(aot.CUOBJDUMP),
                                 reason=f"no cuobjdump bundled with triton at {aot.CUOBJDUMP}"),
              pytest.mark.xdist_group("aot")]

CASES = aot.shipped_cases()


@pytest.fixture(scope="module")
def compiled(request):
    """(case id, arch) -> compiled kernel, or the exception its compile raised. The selected
    parameters compile in one batch (child processes, one per core, under the interpreter)."""
    cache_set = "TRITON_CACHE_DIR" in os.environ
    if not cache_set:
        os.environ["TRITON_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "lk3d-triton-cache")
    selected = [item.callspec.params for item in request.session.items
                if getattr(item, "module", None) is request.module and hasattr(item, "callspec")]
    wanted = [(p["case"], p["arch"]) for p in selected if "case" in p]
    try:
        results = aot.compile_many(case.job(arch) for case, arch in wanted)
        yield {(case.id, arch): result for (case, arch), result in zip(wanted, results)}
    finally:
        if not cache_set:
            del os.environ["TRITON_CACHE_DIR"]


@pytest.mark.parametrize("case,arch", [pytest.param(case, arch, id=f"{case.id}-sm{arch}")
                                       for case in CASES for arch in case.archs])
def test_shipped_config(case, arch, compiled):
    kernel = compiled[case.id, arch]
    if isinstance(kernel, Exception):
        raise kernel
    usage = aot.resource_usage(kernel)
    where = f"{case.id} on sm_{arch} ({usage.registers} registers)"
    assert usage.spill_bytes == 0, (
        f"{where}: spills {usage.spill_bytes} B per thread ({usage.spill_ops} STL/LDL)")
    assert usage.shared_bytes <= aot.SHARED_LIMIT[arch], (
        f"{where}: {usage.shared_bytes} B shared > {aot.SHARED_LIMIT[arch]} B")
    if case.expect_tensor_cores:
        assert usage.tensor_cores, (
            f"{where}: no {' or '.join(aot.TENSOR_CORE_OPS[arch])} in the SASS "
            f"(found {usage.mma_ops or 'none'})")


def test_case_ids_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
