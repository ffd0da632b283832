"""``lk3d tune``: measure every algorithm on a list of layers and fill the per-device plan cache.

A layer is a dict (JSON, or YAML when PyYAML is installed)::

    {"name": "uxnet-dw7", "N": 1, "cin": 48, "cout": 48, "groups": 48, "size": [96, 96, 96],
     "kernel": [7, 7, 7], "stride": 1, "padding": "same", "dilation": 1, "dtype": "float32"}

For each layer the forward and backward passes run once inside ``lk3d.autotune.tune()``: each pass
whose plan is not cached yet measures its candidates (Triton tiled with its launch configs, FFT,
aten) and stores the winner. The table printed afterwards has one row per pass: the winner, its
time, aten's time and the speedup over aten.
"""
from dataclasses import asdict, dataclass, field

import torch

from lk3d.autotune import select
from lk3d.tools.data_files import read_data
from lk3d.tools.table import fmt, format_table

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


@dataclass(frozen=True)
class Layer:
    name: str
    N: int
    cin: int
    cout: int
    groups: int
    size: tuple
    kernel: tuple
    stride: object = 1
    padding: object = "same"
    dilation: object = 1
    dtype: str = "float32"
    backward: bool = field(default=True)

    def tensors(self, device):
        dtype = _DTYPES[self.dtype]
        x = torch.randn(self.N, self.cin, *self.size, device=device, dtype=dtype)
        w = torch.randn(self.cout, self.cin // self.groups, *self.kernel, device=device,
                        dtype=dtype) * 0.05
        return x, w

    def args(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups)


def _cube(n):
    return (n, n, n)


# Real layers: 3D UX-Net (depthwise 7³, 96³ patches), RepUX-Net (depthwise 21³), dense 7³–15³.
GPU_SUITE = [
    *[Layer(f"uxnet-dw7-C{c}", 1, c, c, c, _cube(96 // s), _cube(7)) for c, s in
      ((48, 1), (96, 2), (192, 4), (384, 8))],
    *[Layer(f"repux-dw21-C{c}", 1, c, c, c, _cube(96 // s), _cube(21)) for c, s in
      ((48, 1), (96, 2), (192, 4))],
    *[Layer(f"dense-k{k}-C64", 1, 64, 64, 1, _cube(48), _cube(k)) for k in (7, 11, 15)],
]
# The same kinds at sizes a 2-core CPU measures in minutes.
CPU_SUITE = [
    Layer("uxnet-dw7-C48", 1, 48, 48, 48, _cube(48), _cube(7)),
    Layer("repux-dw21-C16", 1, 16, 16, 16, _cube(48), _cube(21)),
    *[Layer(f"dense-k{k}-C16", 1, 16, 16, 1, _cube(48), _cube(k), backward=False)
      for k in (7, 15, 21)],
]


def load_layers(path):
    """Layers from a JSON (or, with PyYAML, YAML) file holding a list of layer dicts."""
    items = read_data(path, "layers")
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ValueError(f"{path}: expected a list of layer objects, got {type(items).__name__}")
    layers = []
    for i, item in enumerate(items):
        item = dict(item)
        item.setdefault("name", f"layer{i}")
        for key in ("size", "kernel"):
            if isinstance(item.get(key), int):
                item[key] = _cube(item[key])
            elif key in item:
                item[key] = tuple(item[key])
        if item.get("dtype", "float32") not in _DTYPES:
            raise ValueError(f"{path}: layer {item['name']}: dtype expected one of "
                             f"{sorted(_DTYPES)}, got {item['dtype']!r}")
        try:
            layers.append(Layer(**item))
        except TypeError as e:
            raise ValueError(f"{path}: layer {item['name']}: {e}") from None
    return layers


def tune_layers(layers, device, progress=True):
    """Run each layer under ``tune()``; return one result row (dict) per pass. ``progress``: a
    progress bar on stderr where it is a terminal (``lk3d.tools.bench.progress_bar``)."""
    import lk3d
    from lk3d.tools.bench import progress_bar

    rows = []
    for layer in progress_bar(layers, enabled=progress, desc="lk3d tune"):
        x, w = layer.tensors(device)
        if layer.backward:
            x.requires_grad_()
            w.requires_grad_()
        with select.tune():
            y = lk3d.conv3d(x, w, None, **layer.args())
            if layer.backward:
                y.backward(torch.randn_like(y))
        plans = lk3d.explain(x.detach(), w.detach(), None, **layer.args())
        for name, plan in plans.items():
            if name != "forward" and not layer.backward:
                continue
            times = plan["times_ms"]
            best = times.get(plan["algo"])
            aten = times.get("aten")
            rows.append(dict(layer=layer.name, pass_=name, algo=plan["algo"],
                             source=plan["source"], ms=best, aten_ms=aten,
                             speedup=(aten / best) if best and aten else None,
                             config=plan["config"], layer_spec=asdict(layer)))
    return rows


def format_rows(rows):
    header = ("layer", "pass", "winner", "source", "ms", "aten ms", "speedup")
    lines = [(r["layer"], r["pass_"], r["algo"], r["source"], fmt(r["ms"], ".2f"),
              fmt(r["aten_ms"], ".2f"), fmt(r["speedup"], ".2f", "x")) for r in rows]
    return format_table(header, lines, right=(4, 5, 6))
