"""The figures of GPUs that lk3d's CUDA cost models price their candidates from: a table of named
GPUs (``NAMED``) and the figures of a real CUDA device (``of``), matched to the table by name, or
else derived from its SM count, clock and compute capability.

A ``Figures`` can be built and passed to the cost models without a GPU (``named("h100")``), so
``lk3d explain --device h100`` plans for an H100 on any machine. Its ``arch`` says whose kernel
ceilings (``lk3d/autotune/ceilings.json``, by SM version) price lk3d's Triton kernels on it: 90
for Hopper and newer, 80 for Ampere and Ada.

Sources of the table (dense figures, i.e. without structured sparsity; FP32 is the non-tensor FMA
rate; boost clock is the maximum SM clock):
  H100 SXM5 80 GB: NVIDIA H100 Tensor Core GPU datasheet (2023) and the NVIDIA H100 Tensor Core
    GPU Architecture whitepaper (Table 3: 132 SMs; 228 KB shared memory / L1 per SM usable as
    shared memory up to 228 KB): BF16/FP16 989.4 TFLOP/s, TF32 494.7, FP32 66.9, HBM3
    3.35 TB/s, boost 1.98 GHz.
  H200 SXM 141 GB: NVIDIA H200 Tensor Core GPU datasheet (2024): the same GH100 compute as the
    H100 SXM (989 / 494.7 / 67 TFLOP/s, 132 SMs), HBM3e 4.8 TB/s.
  A100 SXM4 80 GB: NVIDIA A100 Tensor Core GPU datasheet (2021) and the NVIDIA A100 Tensor Core
    GPU Architecture whitepaper (108 SMs, 1.41 GHz boost, 164 KB shared memory per SM):
    BF16/FP16 312 TFLOP/s, TF32 156, FP32 19.5, HBM2e 2.039 TB/s.
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Figures:
    """One GPU's figures: FLOP/s, bytes/s, Hz and bytes."""
    name: str
    sms: int
    clock_hz: float
    tensor_16: float    # dense bf16/fp16 tensor-core peak, FLOP/s
    tensor_tf32: float  # dense TF32 tensor-core peak, FLOP/s
    fma_fp32: float     # FP32 FMA peak (CUDA cores), FLOP/s
    bandwidth: float    # HBM bytes/s
    shared_per_sm: int  # bytes of shared memory per SM
    arch: int           # the SM version whose kernel ceilings price it: 90 or 80 (ARCHES)

    def tensor_peak(self, dtype, tf32=True) -> float:
        """The tensor-core peak a matmul of ``dtype`` runs at (fp32: TF32 where allowed, else
        the FP32 FMA peak)."""
        if dtype in (torch.float16, torch.bfloat16):
            return self.tensor_16
        if dtype == torch.float32 and tf32:
            return self.tensor_tf32
        return self.fma_fp32 if dtype == torch.float32 else self.fma_fp32 / 2  # fp64: a guess

    def as_dict(self) -> dict:
        return dict(self.__dict__)


_KB = 1024
NAMED = {
    "h100": Figures("NVIDIA H100 SXM5 80GB", 132, 1.98e9, 989.4e12, 494.7e12, 66.9e12, 3.35e12,
                    228 * _KB, 90),
    "h200": Figures("NVIDIA H200 SXM 141GB", 132, 1.98e9, 989.4e12, 494.7e12, 66.9e12, 4.8e12,
                    228 * _KB, 90),
    "a100": Figures("NVIDIA A100 SXM4 80GB", 108, 1.41e9, 312e12, 156e12, 19.5e12, 2.039e12,
                    164 * _KB, 80),
}
# The SM versions lk3d's kernel ceilings are read for (``lk3d estimate --arch``).
ARCHES = (90, 80)

# Per SM and clock, by compute capability major (the table's GPUs, dense): 16-bit tensor FLOPs,
# FP32 FMA FLOPs. Used for a CUDA device the table does not name.
_PER_SM_CLOCK = {8: (2048, 128), 9: (4096, 256)}
_DEFAULT_CLOCK_HZ = 1.5e9
_DEFAULT_BANDWIDTH = 2.0e12
_DEFAULT_SHARED = 100 * _KB


def named(name: str) -> Figures:
    """The figures of a GPU of ``NAMED`` (h100, h200, a100)."""
    if name not in NAMED:
        raise ValueError(f"device: expected one of {', '.join(NAMED)}, got {name!r}")
    return NAMED[name]


def _match(device_name: str):
    """The table's entry for a CUDA device name (e.g. "NVIDIA H100 80GB HBM3"), else None."""
    text = device_name.lower().replace(" ", "")
    for key in ("h200", "h100", "a100"):
        if key in text and (key != "a100" or "80gb" in text):
            return NAMED[key]
    return None


def arch_of(major: int) -> int:
    """The SM version whose kernel ceilings price a GPU of compute capability ``major``: 90 from
    Hopper on, else 80."""
    return 90 if major >= 9 else 80


def derived(name, sms, clock_hz, major, bandwidth=None, shared_per_sm=None) -> Figures:
    """Figures of a GPU the table lacks, from its SM count, clock and compute capability (Hopper
    rates per SM and clock for majors above 9, Ampere's below 8; the kernel ceilings of
    ``arch_of(major)``)."""
    tensor, fma = _PER_SM_CLOCK[min(9, max(8, major))]
    rate = sms * clock_hz
    return Figures(name, sms, clock_hz, tensor * rate, tensor * rate / 2, fma * rate,
                   bandwidth or _DEFAULT_BANDWIDTH, shared_per_sm or _DEFAULT_SHARED,
                   arch_of(major))


_LOCAL = {}


def of(device) -> Figures:
    """The figures of a CUDA ``device`` (a ``torch.device``, index or name): its table entry
    where its name matches one, else derived from ``torch.cuda.get_device_properties``."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _LOCAL:
        p = torch.cuda.get_device_properties(index)
        found = _match(p.name)
        if found is None:
            clock = getattr(p, "clock_rate", 0) * 1e3 or _DEFAULT_CLOCK_HZ  # kHz where given
            mem_khz, bus = getattr(p, "memory_clock_rate", 0), getattr(p, "memory_bus_width", 0)
            bandwidth = 2 * mem_khz * 1e3 * bus / 8 if mem_khz and bus else None
            found = derived(p.name, p.multi_processor_count, clock, p.major, bandwidth,
                            getattr(p, "shared_memory_per_multiprocessor", None))
        _LOCAL[index] = found
    return _LOCAL[index]


def figures(device):
    """``device`` as the CUDA cost models take it: a ``Figures`` as it is, a CUDA
    ``torch.device`` as ``of`` gives it; None for any other device (the CPU models)."""
    if isinstance(device, Figures):
        return device
    return of(device) if torch.device(device).type == "cuda" else None
