"""What a packed cmpq output holds, layer by layer (``cmpq inspect``).

Everything is read from the output directory itself, never by building the
model: the description (config.json's quantization_config) gives the layers
and their shapes, ``model.safetensors``
the bit-groups and permutation of each layer, and ``channel_stats.safetensors``
(when present) the activation statistic that drove the allocation. Byte counts
come from :func:`cmpq.format.cost.stored_bits`, the same count the quantization
report and the bit budget use, so the table and the report cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import CmpqError
from .format.cost import stored_bits
from .format.description import is_cmpq_output, read_description
from .format.layer import unpack_column_groups
from .format.packing import packed_nbytes
from .format.shards import open_weights
from .format.spec import REQUIRED_NAMES, STATS_FILE, STORED_NAMES, group_index_bits

HEATMAP_FILE = "bits_heatmap.png"
# The dtypes cmpq stores, by their safetensors names: enough to size a tensor from its header.
_DTYPES = {
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "F32": torch.float32,
}


@dataclass(frozen=True)
class LayerInspection:
    """One quantized linear as stored: widths per input channel and bytes by kind."""

    name: str
    out_features: int
    in_features: int
    layout: str
    channel_bits: torch.Tensor  # [in] int64, original channel order
    stored_bytes: dict[str, int]  # codes, lut, outliers, metadata
    activation: torch.Tensor | None  # [in] float32 allocation statistic, original order

    @property
    def params(self) -> int:
        return self.out_features * self.in_features

    @property
    def total_bytes(self) -> int:
        return sum(self.stored_bytes.values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.total_bytes / self.params

    @property
    def histogram(self) -> dict[int, int]:
        return bits_histogram(self.channel_bits)


@dataclass(frozen=True)
class Inspection:
    path: Path
    description: dict
    layers: list[LayerInspection]

    @property
    def statistic(self) -> str:
        return self.description.get("config", {}).get("statistic", "activation")


def channel_bits(groups: torch.Tensor, group_bits: torch.Tensor) -> torch.Tensor:
    """Each input channel's code width, in the original channel order, from each
    column's bit-group index (the unpacked ``column_groups``)."""
    return group_bits.long()[groups.long()]


def bits_histogram(bits: torch.Tensor) -> dict[int, int]:
    """``{width: channel count}``, narrowest first."""
    widths, counts = torch.unique(bits, return_counts=True)
    return {int(w): int(n) for w, n in zip(widths, counts, strict=True)}


def placeholder(handle, key: str) -> torch.Tensor:
    """A meta tensor with the stored tensor's shape and dtype: its size without its data
    (the codes are the bulk of the file and only their size matters here)."""
    view = handle.get_slice(key)
    dtype = _DTYPES.get(view.get_dtype())
    if dtype is None:
        raise ValueError(f"tensor {key} has unexpected dtype {view.get_dtype()}")
    return torch.empty(view.get_shape(), dtype=dtype, device="meta")


def read_layer(
    handle, keys: set[str], name: str, layer: dict, activation: torch.Tensor | None
) -> LayerInspection:
    """Inspect one quantized linear: only its column groups and bit-groups are read."""
    tensors = {
        key: placeholder(handle, f"{name}.{key}") for key in STORED_NAMES if f"{name}.{key}" in keys
    }
    missing = [key for key in REQUIRED_NAMES if key not in tensors]
    if missing:
        raise ValueError(f"tensor {name}.{missing[0]} is missing")
    stored = {
        key: handle.get_tensor(f"{name}.{key}")
        for key in ("column_groups", "group_bits", "group_sizes")
    }
    group_bits, group_sizes = stored["group_bits"], stored["group_sizes"]
    in_features = layer["in_features"]
    width = group_index_bits(group_bits.numel())
    if int(group_sizes.sum()) != in_features or stored["column_groups"].numel() != packed_nbytes(
        in_features, width
    ):
        raise ValueError(
            f"{name}: its column groups and bit-groups do not cover {in_features} inputs"
        )
    groups = unpack_column_groups(stored["column_groups"], group_bits.numel(), in_features)
    if activation is not None and activation.numel() != in_features:
        raise ValueError(f"{name}: its activation statistic has {activation.numel()} channels")
    return LayerInspection(
        name=name,
        out_features=layer["out_features"],
        in_features=in_features,
        layout=layer["layout"],
        channel_bits=channel_bits(groups, group_bits),
        stored_bytes={kind: bits // 8 for kind, bits in stored_bits(tensors).items()},
        activation=activation,
    )


def read_statistics(path: Path) -> dict[str, torch.Tensor]:
    """The per-channel activation statistics saved beside the checkpoint, if any
    (outputs written before they were saved have none)."""
    if not (path / STATS_FILE).is_file():
        return {}
    with safe_open(str(path / STATS_FILE), framework="pt") as handle:
        return {key: handle.get_tensor(key).float() for key in handle.keys()}


def block_order(item: tuple[str, dict]) -> list:
    """Sort key for layer names: numbers by value, so block 10 follows block 9
    (config.json stores the layers with their names sorted as text)."""
    return [int(part) if part.isdigit() else part for part in item[0].split(".")]


def packed_description(path: Path) -> dict:
    """The description of a packed output, or a one-line reason why ``path`` is not one."""
    if not path.exists():
        raise CmpqError(f"{path} does not exist")
    if not path.is_dir():
        raise CmpqError(f"{path} is not a directory")
    if not is_cmpq_output(path):
        raise CmpqError(
            f"{path} is not a cmpq output: no cmpq.json, and no cmpq quantization_config "
            "in config.json"
        )
    description = read_description(path)
    kind = description.get("format")
    if kind == "dequantized":
        raise CmpqError(
            f"{path} is a dequantized ({description.get('method')}) output: its weights are "
            "stored dense, so there is no per-channel layout to inspect"
        )
    return description  # read_description refused unknown formats and empty layer lists


def inspect_output(path: Path) -> Inspection:
    """Read a packed cmpq output directory into an :class:`Inspection`."""
    path = Path(path)
    description = packed_description(path)
    try:
        statistics = read_statistics(path)
        with open_weights(path) as handle:
            keys = set(handle.keys())
            layers = [
                read_layer(handle, keys, name, layer, statistics.get(name))
                for name, layer in sorted(description["layers"].items(), key=block_order)
            ]
    except (OSError, KeyError, TypeError, ValueError, SafetensorError, CmpqError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CmpqError(f"{path} is not a readable cmpq output: {first}") from None
    return Inspection(path, description, layers)


def totals(layers: list[LayerInspection]) -> dict:
    """The totals row: weights, bytes by kind and in all, bits per weight, widths."""
    params = sum(layer.params for layer in layers)
    stored = {
        kind: sum(layer.stored_bytes[kind] for layer in layers) for kind in layers[0].stored_bytes
    }
    histogram: dict[int, int] = {}
    for layer in layers:
        for bits, count in layer.histogram.items():
            histogram[bits] = histogram.get(bits, 0) + count
    total = sum(stored.values())
    return {
        "layers": len(layers),
        "params": params,
        "histogram": dict(sorted(histogram.items())),
        "bytes": {**stored, "total": total},
        "bits_per_weight": 8 * total / params,
    }


def _histogram_json(histogram: dict[int, int]) -> dict[str, int]:
    return {str(bits): count for bits, count in histogram.items()}


def as_dict(inspection: Inspection) -> dict:
    """The table for machines (JSON-able): per layer and in total."""
    description = inspection.description
    summary = totals(inspection.layers)
    return {
        "path": str(inspection.path),
        "method": description.get("method"),
        "format_version": description.get("format_version"),
        "statistic": inspection.statistic,
        "layers": [
            {
                "name": layer.name,
                "out_features": layer.out_features,
                "in_features": layer.in_features,
                "layout": layer.layout,
                "histogram": _histogram_json(layer.histogram),
                "bytes": {**layer.stored_bytes, "total": layer.total_bytes},
                "bits_per_weight": layer.bits_per_weight,
                "activation_profile": layer.activation is not None,
            }
            for layer in inspection.layers
        ],
        "totals": {**summary, "histogram": _histogram_json(summary["histogram"])},
    }


def _widths(histogram: dict[int, int]) -> str:
    return " ".join(f"{bits}:{count}" for bits, count in histogram.items())


def format_table(inspection: Inspection) -> str:
    """The per-layer table for people: shape, channels per width, bytes by kind."""
    summary = totals(inspection.layers)
    kinds = list(inspection.layers[0].stored_bytes)
    rows = [
        (
            layer.name,
            f"{layer.out_features}x{layer.in_features}",
            _widths(layer.histogram),
            *(f"{layer.stored_bytes[kind]:,}" for kind in kinds),
            f"{layer.total_bytes:,}",
            f"{layer.bits_per_weight:.3f}",
        )
        for layer in inspection.layers
    ]
    rows.append(
        (
            f"total ({summary['layers']} linears)",
            f"{summary['params']:,}",
            _widths(summary["histogram"]),
            *(f"{summary['bytes'][kind]:,}" for kind in kinds),
            f"{summary['bytes']['total']:,}",
            f"{summary['bits_per_weight']:.3f}",
        )
    )
    header = ("layer", "shape", "bits:channels", *kinds, "total", "bits/w")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row) -> str:
        left = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=False)]
        right = [cell.rjust(width) for cell, width in zip(row[3:], widths[3:], strict=True)]
        return "  ".join(left + right).rstrip()

    body = [line(header), *map(line, rows[:-1]), line(rows[-1])]
    title = (
        f"{inspection.path}: {inspection.description.get('method')}, bytes of every stored "
        f"tensor of the quantized linears; widths are code bits per input channel"
    )
    return "\n".join([title, *body])


def heatmap_rows(values: list[torch.Tensor | None]) -> torch.Tensor:
    """``[layers, widest]`` float rows, NaN where a layer is narrower or has no values."""
    columns = max((v.numel() for v in values if v is not None), default=0)
    rows = torch.full((len(values), columns), math.nan)
    for i, value in enumerate(values):
        if value is not None:
            rows[i, : value.numel()] = value.float()
    return rows


def relative_profile(activation: torch.Tensor | None) -> torch.Tensor | None:
    """log10 of each channel's statistic over its layer's median.

    The paper rule ranks channels within a layer, and layers differ in loudness
    by orders of magnitude, so each row is shown relative to its own median;
    silent channels (0) are left blank rather than drawn at -inf.
    """
    if activation is None:
        return None
    loud = activation > 0
    if not loud.any():
        return torch.full_like(activation, math.nan)
    logs = activation.clamp_min(1e-30).log10()
    return torch.where(loud, logs - logs[loud].median(), math.nan)


def draw_heatmap(inspection: Inspection, png: Path) -> Path:
    """Write a PNG: the width of every input channel of every layer, and beside it
    the activation statistic in the same layout, so loud channels can be seen to
    get the wide codes.

    matplotlib is an optional dependency (``cmpq[plot]``); the figure is drawn on
    an Agg canvas without pyplot, so no global backend state changes.
    """
    try:
        from matplotlib import colormaps
        from matplotlib.colors import BoundaryNorm, ListedColormap
        from matplotlib.figure import Figure
    except ImportError:
        raise CmpqError(
            "drawing the heat map needs matplotlib: pip install cmpq[plot] (or pass --no-plot)"
        ) from None
    layers = inspection.layers
    bits = heatmap_rows([layer.channel_bits for layer in layers])
    profile = heatmap_rows([relative_profile(layer.activation) for layer in layers])
    present = sorted(totals(layers)["histogram"])
    palette = colormaps["viridis"]  # spread over the widths present, for contrast
    shades = [palette(i / max(len(present) - 1, 1)) for i in range(len(present))]
    cmap = ListedColormap(shades).with_extremes(bad="white")
    edges = [present[0] - 0.5, *(b + 0.5 for b in present)]
    norm = BoundaryNorm(edges, cmap.N)

    height = min(max(3 + 0.09 * len(layers), 4), 30)
    figure = Figure(figsize=(16, height), layout="constrained")
    left, right = figure.subplots(1, 2, sharey=True)
    image = left.imshow(bits.numpy(), aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    bar = figure.colorbar(image, ax=left, ticks=present, fraction=0.04)
    bar.set_label("code bits")
    left.set_title("code bits per input channel")
    if torch.isnan(profile).all():
        right.text(
            0.5,
            0.5,
            "no activation statistics stored",
            ha="center",
            va="center",
            transform=right.transAxes,
        )
    else:
        magma = colormaps["magma"].with_extremes(bad="white")
        image = right.imshow(profile.numpy(), aspect="auto", interpolation="nearest", cmap=magma)
        bar = figure.colorbar(image, ax=right, fraction=0.04)
        bar.set_label(f"log10 ({inspection.statistic} / layer median)")
    right.set_title(f"activation {inspection.statistic} per input channel, relative to its layer")
    step = max(1, math.ceil(len(layers) / 48))
    left.set_yticks(
        range(0, len(layers), step), [layer.name for layer in layers[::step]], fontsize=6
    )
    for axes in (left, right):
        axes.set_xlabel("input channel (original order)")
    try:
        figure.savefig(png, dpi=120)
    except OSError as exc:
        raise CmpqError(f"cannot write {png}: {exc.strerror or exc}") from None
    return Path(png)
