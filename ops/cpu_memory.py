"""Huge pages for large CPU tensors: what they are worth to lk3d, and whether they are on.

Every CPU tensor above glibc's mmap threshold (32 MiB at most) is mapped afresh when it is
allocated and unmapped when freed, so each call that needs such a block page-faults all of it in
again, 4 KiB at a time. An FFT convolution allocates several per call (spectra, transposes):
measured on a 2-core x86 CPU, touching a fresh 64 MiB tensor cost 16,384 page faults, and the
faults were ~40% of ``lk3d.conv3d``'s FFT time at [1,16,48³], k = 21 (227 ms against 129 ms).

PyTorch's own switch ``THP_MEM_ALLOC_ENABLE=1`` (read once, when torch first allocates, so it must
be in the environment before ``import torch``) aligns CPU tensors of 2 MiB and more to 2 MiB and
asks the kernel for transparent huge pages for them (``madvise(MADV_HUGEPAGE)``): the same 64 MiB
tensor then costs ~550 faults. It needs the kernel's THP mode to be ``always`` or ``madvise``
(``/sys/kernel/mm/transparent_hugepage/enabled``). lk3d recommends it for CPU programs that run
large FFT convolutions repeatedly; ``lk3d info`` says whether it is on here, and ``lk3d bench``
runs its CPU measurements in a worker process started with it (``--no-huge-pages``: without).
"""
import os

__all__ = ["THP_ENV", "huge_pages"]

THP_ENV = "THP_MEM_ALLOC_ENABLE"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _kernel_mode():
    """The kernel's THP mode ("always", "madvise", "never"), or None where unknown."""
    try:
        with open(_THP_MODE) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_pages() -> tuple:
    """``(on, why)``: whether CPU tensors of this process get transparent huge pages, and a
    phrase saying why (or why not)."""
    env = os.environ.get(THP_ENV, "").strip()
    mode = _kernel_mode()
    if env != "1":
        return False, f"{THP_ENV} is not 1 (set it before importing torch)"
    if mode is None:
        return False, f"{THP_ENV}=1, but the kernel has no transparent huge pages"
    if mode == "never":
        return False, f"{THP_ENV}=1, but the kernel's THP mode is 'never'"
    return True, f"{THP_ENV}=1, kernel THP mode '{mode}'"
