"""A small cache of the weight copies launchers make (``lk3d.kernels.implicit_gemm`` packs the
weight as [G, taps, KC, NC] before each launch): repeated calls with an unchanged weight reuse the
copy, as a module's forward and backward do, and the next steps of an inference loop.

A copy is keyed by the weight's identity (the Python object, held by a weak reference and
compared on a hit), its version counter (``Tensor._version``: every in-place write through
torch bumps it, an optimizer's step included), data pointer, shape, strides, dtype and device,
and what the launcher derives from it (groups, transposed or not, the stride phase's taps); on
CUDA also the current stream (a copy is made and read in that stream's order only). A
freed weight cannot hit: its entry dies with it, and a new tensor at the same address is another
object. In eager mode the tensor that reaches a launcher through ``lk3d.conv3d``'s custom op is
the caller's own object (the same ``nn.Parameter`` in the forward and, through the saved tensors,
in the backward), so a module's weight hits across calls and passes.

Bypassed (a fresh copy each call): inference tensors (they keep no version counter), tensor
subclasses (fake and functional tensors under ``torch.compile``'s tracing), meta tensors, while
tracing, and while a CUDA stream is being captured into a graph (the captured pack must replay
from the live weight). At most ``CAPACITY`` copies are kept, least recently used first out; a
weight keeps only the copies of its current version. ``LK3D_WEIGHT_CACHE=0`` switches the cache
off; ``lk3d.clear_weight_cache()`` empties it.

Known limit: writes that bypass the version counter (through ``.data``, ``.numpy()``, DLPack or
the storage) leave a stale copy: call ``lk3d.clear_weight_cache()`` after them.

No Triton is imported here.
"""
import collections
import os
import threading
import weakref

import torch

CAPACITY = 16
ENV = "LK3D_WEIGHT_CACHE"

_lock = threading.RLock()
_entries = collections.OrderedDict()  # key -> (weak reference to the weight, the copy)


def enabled():
    """Whether the cache is on: ``LK3D_WEIGHT_CACHE`` unset, empty or "1" (on), "0" (off)."""
    raw = os.environ.get(ENV, "").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"{ENV}: expected '0' or '1', got {raw!r}")
    return raw != "0"


def cacheable(w):
    """Whether a copy of ``w`` may be kept: a plain tensor or parameter with a version counter,
    on a real device, outside tracing and CUDA graph capture, with the cache on."""
    if not enabled() or type(w) not in (torch.Tensor, torch.nn.Parameter):
        return False
    if w.device.type == "meta" or w.is_inference() or torch.compiler.is_compiling():
        return False
    return not (w.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _key(w, spec):
    # On CUDA the current stream too: a copy is made and read in one stream's order only.
    stream = torch.cuda.current_stream(w.device).cuda_stream if w.device.type == "cuda" else None
    return (id(w), w._version, w.data_ptr(), tuple(w.shape), w.stride(), w.dtype, w.device,
            stream, spec)


def _forget(key):
    """The weak reference's callback: the weight is gone, and its copy with it."""
    def forget(ref):
        with _lock:
            entry = _entries.get(key)
            if entry is not None and entry[0] is ref:
                del _entries[key]
    return forget


def get(w, spec, make):
    """The copy ``make()`` of weight ``w``, from the cache where ``w`` (same object, same
    version, same memory) was copied with the same ``spec`` (a hashable tuple naming what the
    copy derives from ``w`` besides its data), else made now and kept."""
    if not cacheable(w):
        return make()
    key = _key(w, spec)
    with _lock:
        entry = _entries.get(key)
        if entry is not None and entry[0]() is w:
            _entries.move_to_end(key)
            return entry[1]
    copy = make()
    with _lock:
        state = key[:-1]
        for old in [k for k in _entries if k[0] == key[0] and k[:-1] != state]:
            del _entries[old]  # this weight's copies of an earlier version or memory
        _entries[key] = (weakref.ref(w, _forget(key)), copy)
        _entries.move_to_end(key)
        while len(_entries) > CAPACITY:
            _entries.popitem(last=False)
    return copy


def size():
    """How many copies the cache holds."""
    with _lock:
        return len(_entries)


def clear_weight_cache():
    """Drop every cached weight copy (``lk3d.clear_weight_cache``): needed after writing a weight
    in a way that does not bump its version counter (``w.data``, ``w.numpy()``, DLPack)."""
    with _lock:
        _entries.clear()
