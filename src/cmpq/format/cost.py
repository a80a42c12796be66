"""What a quantized linear costs in stored bits, before it exists and after.

:func:`layer_cost` prices a layer from its shape and bit-groups (the budget
solver plans with it); :func:`stored_bits` counts the tensors a layer actually
stores; a test checks the two agree. :class:`StoredTotals` sums layers the one
way the quantization report, the checkpoint's declared totals and the loader's
check of those totals all use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .packing import packed_nbytes, tiled_nbytes
from .spec import (
    GROUP_HEADER_BITS,
    LUT_ENTRY_BITS,
    OUTLIER_VALUE_BITS,
    ROW_COUNT_BITS,
    group_index_bits,
    index_bits,
)

# the stored tensors of each kind of cost
KINDS = {
    "codes": ("codes",),
    "lut": ("lut",),
    "outliers": ("outlier_counts", "outlier_cols", "outlier_values"),
    "metadata": ("column_groups", "group_bits", "group_sizes"),
}


@dataclass(frozen=True)
class LayerShape:
    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


def layer_cost(
    shape: LayerShape, group_bits: list[int], group_sizes: list[int], layout: str, outliers: int
) -> dict[str, int]:
    """Exact stored bits of one quantized linear, by kind."""
    out_features, in_features = shape.out_features, shape.in_features
    codes = sum(
        8 * tiled_nbytes(out_features, size, bits)
        for bits, size in zip(group_bits, group_sizes, strict=True)
    )
    if layout == "row":
        lut = sum(out_features * 2**bits for bits in group_bits) * LUT_ENTRY_BITS
    else:
        lut = sum(size * 2**bits for bits, size in zip(group_bits, group_sizes, strict=True))
        lut *= LUT_ENTRY_BITS
    column_groups = 8 * packed_nbytes(in_features, group_index_bits(len(group_bits)))
    metadata = column_groups + len(group_bits) * GROUP_HEADER_BITS
    outlier_bits = 0
    if outliers:
        outlier_bits = out_features * ROW_COUNT_BITS + outliers * (
            OUTLIER_VALUE_BITS + index_bits(in_features)
        )
    return {"codes": codes, "lut": lut, "outliers": outlier_bits, "metadata": metadata}


def stored_bits(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Bits actually stored, by kind: what the file holds for this layer (meta
    tensors work too: only shapes and dtypes are read)."""
    return {
        kind: sum(8 * tensors[n].numel() * tensors[n].element_size() for n in names if n in tensors)
        for kind, names in KINDS.items()
    }


@dataclass(kw_only=True)
class StoredTotals:
    """Stored bits summed over quantized linears, by kind (codes, scales, look-up
    tables, outliers, metadata): ``effective_bits`` is the true storage cost per
    quantized weight."""

    quantized_params: int = 0
    bits_breakdown: dict[str, int] = field(default_factory=dict)
    layers: int = 0

    def add_layer(self, params: int, stored_bits: dict[str, int]) -> None:
        self.layers += 1
        self.quantized_params += params
        for kind, bits in stored_bits.items():
            self.bits_breakdown[kind] = self.bits_breakdown.get(kind, 0) + bits

    @property
    def stored_bits(self) -> int:
        return sum(self.bits_breakdown.values())

    @property
    def stored_bytes(self) -> int:
        return math.ceil(self.stored_bits / 8)

    @property
    def effective_bits(self) -> float:
        return self.stored_bits / self.quantized_params if self.quantized_params else 0.0

    def totals_dict(self) -> dict:
        """The totals a checkpoint declares (and its loader recomputes)."""
        return {
            "effective_bits": self.effective_bits,
            "bits_breakdown": {
                kind: bits / self.quantized_params for kind, bits in self.bits_breakdown.items()
            },
            "quantized_params": self.quantized_params,
            "stored_bytes": self.stored_bytes,
            "layers": self.layers,
        }
