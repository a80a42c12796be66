"""One quantized linear in memory (:class:`LUTLayer`) and as stored tensors.

Columns (input channels) are permuted so channels of equal width are
contiguous ("bit-groups", narrowest first). Each bit-group has look-up tables
of ``2**bits`` fp16 entries: one per output row (``row`` layout) or one per
input column (``column`` layout). Outliers are kept exactly in fp16 as a CSR
matrix over the original columns. docs/format.md lists every stored tensor.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .packing import (
    TILE_ROWS,
    group_byte_offsets,
    pack_codes,
    pack_groups,
    unpack_codes,
    unpack_groups,
    unpack_tiled,
)
from .spec import MAX_OUTLIERS_PER_ROW, group_index_bits, stored_dtypes


@dataclass
class LUTLayer:
    """One quantized linear: codes per bit-group, tables, permutation, outliers.

    ``perm[k]`` is the original column stored at position ``k``; group ``g``
    holds stored columns ``offsets[g]:offsets[g + 1]``. Codes are kept
    unpacked (uint8) in memory and packed only for storage.
    """

    out_features: int
    in_features: int
    layout: str
    group_bits: list[int]
    group_sizes: list[int]
    perm: torch.Tensor  # [in] int64
    codes: list[torch.Tensor]  # per group: [out, n_g] uint8
    luts: list[torch.Tensor]  # per group: row [out, 2^b] / column [n_g, 2^b], fp16
    outlier_rows: torch.Tensor  # [n] int64, sorted with cols
    outlier_cols: torch.Tensor  # [n] int64 (original column index)
    outlier_values: torch.Tensor  # [n] fp16

    @property
    def offsets(self) -> list[int]:
        return group_offsets(self.group_sizes)


def group_offsets(group_sizes: list[int]) -> list[int]:
    """Where each bit-group starts among the permuted columns, plus the end."""
    return [0, *itertools.accumulate(group_sizes)]


def groups_of(bits_per_channel: torch.Tensor) -> tuple[list[int], list[int]]:
    """The bit widths present (ascending) and how many channels have each."""
    widths, counts = torch.unique(bits_per_channel, return_counts=True)
    return [int(w) for w in widths], [int(c) for c in counts]


def storage_order(bits_per_channel: torch.Tensor):
    """Bit-group widths and sizes, the column permutation, and the group offsets.

    The permutation is the stable sort of the columns by bit-group, so each
    column's group index is all a checkpoint stores of it (``column_groups``)."""
    group_bits, group_sizes = groups_of(bits_per_channel)
    perm = torch.argsort(bits_per_channel, stable=True)
    return group_bits, group_sizes, perm, group_offsets(group_sizes)


def column_groups(perm: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
    """The bit-group index of each original column (int64 ``[in]``)."""
    groups = torch.repeat_interleave(torch.arange(len(group_sizes)), torch.tensor(group_sizes))
    index = torch.empty_like(groups)
    index[perm.long().cpu()] = groups
    return index


def unpack_column_groups(packed: torch.Tensor, n_groups: int, in_features: int) -> torch.Tensor:
    """Inverse of the ``column_groups`` packing: each column's group index (int64)."""
    return unpack_codes(packed, group_index_bits(n_groups), in_features).long()


def permutation_of(groups: torch.Tensor) -> torch.Tensor:
    """The column permutation (int64) from each column's group index: the stable sort
    :func:`storage_order` stores the columns in."""
    return torch.argsort(groups, stable=True)


def stored_permutation(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The int64 column permutation of a layer's stored tensors: the ``perm`` a
    runtime module keeps beside them when there, else decoded from ``column_groups``."""
    if "perm" in tensors:
        return tensors["perm"].long()
    in_features = int(tensors["group_sizes"].sum())
    packed = tensors["column_groups"].cpu()
    groups = unpack_column_groups(packed, tensors["group_bits"].numel(), in_features)
    return permutation_of(groups).to(tensors["column_groups"].device)


def group_dequantize(codes: torch.Tensor, table: torch.Tensor, layout: str) -> torch.Tensor:
    """One bit-group's ``[out, n_g]`` float32 values from its codes and tables."""
    if layout == "row":
        return table.float().gather(1, codes.long())
    return table.float().gather(1, codes.t().long()).t()


def assemble(shape, perm, offsets, codes, luts, layout) -> torch.Tensor:
    """The ``[out, in]`` float32 weight the tables give, in the original column
    order (outliers not applied)."""
    device = codes[0].device if codes else None
    permuted = torch.empty(shape, dtype=torch.float32, device=device)
    for g, (code, table) in enumerate(zip(codes, luts, strict=True)):
        permuted[:, offsets[g] : offsets[g + 1]] = group_dequantize(code, table, layout)
    weight = torch.empty(shape, dtype=torch.float32, device=device)
    weight[:, perm] = permuted
    return weight


def dequantize_layer(layer: LUTLayer) -> torch.Tensor:
    """The ``[out, in]`` float32 weight the stored tensors represent."""
    shape = (layer.out_features, layer.in_features)
    weight = assemble(shape, layer.perm, layer.offsets, layer.codes, layer.luts, layer.layout)
    weight[layer.outlier_rows, layer.outlier_cols] = layer.outlier_values.float()
    return weight


def to_tensors(layer: LUTLayer) -> dict[str, torch.Tensor]:
    """The tensors stored for this layer (packed codes, tables, metadata, CSR outliers)."""
    dtypes = stored_dtypes(layer.in_features)
    tensors = {
        "codes": pack_groups(layer.codes, layer.group_bits),
        "lut": torch.cat([t.flatten() for t in layer.luts]).to(dtypes["lut"]),
        "column_groups": pack_codes(
            column_groups(layer.perm, layer.group_sizes), group_index_bits(len(layer.group_bits))
        ),
        "group_bits": torch.tensor(layer.group_bits, dtype=dtypes["group_bits"]),
        "group_sizes": torch.tensor(layer.group_sizes, dtype=dtypes["group_sizes"]),
    }
    if layer.outlier_values.numel():
        counts = torch.bincount(layer.outlier_rows, minlength=layer.out_features)
        if int(counts.max()) > MAX_OUTLIERS_PER_ROW:
            row = int(counts.argmax())
            raise ValueError(
                f"row {row} holds {int(counts[row])} outliers; the format stores at most "
                f"{MAX_OUTLIERS_PER_ROW} a row"
            )
        tensors["outlier_counts"] = counts.to(dtypes["outlier_counts"])
        tensors["outlier_cols"] = layer.outlier_cols.to(dtypes["outlier_cols"])
        tensors["outlier_values"] = layer.outlier_values.to(dtypes["outlier_values"])
    return tensors


def from_tensors(
    tensors: dict[str, torch.Tensor], out_features: int, in_features: int, layout: str
) -> LUTLayer:
    """Rebuild a layer from its stored tensors (inverse of :func:`to_tensors`)."""
    group_bits = [int(b) for b in tensors["group_bits"]]
    group_sizes = [int(n) for n in tensors["group_sizes"]]
    codes = unpack_groups(tensors["codes"], group_bits, out_features, group_sizes)
    luts = group_tables(tensors["lut"], layout, out_features, group_bits, group_sizes)
    if "outlier_values" in tensors:
        rows = outlier_rows(tensors["outlier_counts"], (0, out_features))
        cols = tensors["outlier_cols"].long()
        values = tensors["outlier_values"]
    else:
        rows = cols = torch.zeros(0, dtype=torch.int64)
        values = torch.zeros(0, dtype=torch.float16)
    return LUTLayer(
        out_features,
        in_features,
        layout,
        group_bits,
        group_sizes,
        stored_permutation(tensors),
        codes,
        luts,
        rows,
        cols,
        values,
    )


def lut_offsets(layout: str, out_features: int, group_bits: list[int], group_sizes: list[int]):
    """Where each bit-group's tables start in the stored ``lut``, plus the end."""
    offsets = [0]
    for bits, size in zip(group_bits, group_sizes, strict=True):
        offsets.append(offsets[-1] + (out_features if layout == "row" else size) * 2**bits)
    return offsets


def group_tables(
    lut: torch.Tensor, layout: str, out_features: int, group_bits: list[int], group_sizes
) -> list[torch.Tensor]:
    """Each bit-group's tables as a ``[rows, 2**bits]`` view of the stored ``lut``."""
    offsets = lut_offsets(layout, out_features, group_bits, group_sizes)
    return [lut[offsets[g] : offsets[g + 1]].view(-1, 2**bits) for g, bits in enumerate(group_bits)]


def row_pointers(counts: torch.Tensor) -> torch.Tensor:
    """The int32 CSR row pointers (``[out + 1]``, from 0) of the stored per-row outlier
    ``counts``: row ``i``'s outliers are entries ``pointers[i]:pointers[i + 1]``."""
    pointers = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    pointers[1:] = counts.to(torch.int64).cumsum(0)
    return pointers


def outlier_entries(counts: torch.Tensor, rows: tuple[int, int]) -> tuple[int, int]:
    """The entries (``start, end``) of the outliers stored for rows ``rows[0]:rows[1]``."""
    first, stop = rows
    start = int(counts[:first].sum())
    return start, start + int(counts[first:stop].sum())


def outlier_rows(counts: torch.Tensor, rows: tuple[int, int]) -> torch.Tensor:
    """The row, counted from ``rows[0]``, of each outlier stored for rows
    ``rows[0]:rows[1]`` (the entries :func:`outlier_entries` gives)."""
    first, stop = rows
    return torch.repeat_interleave(torch.arange(stop - first), counts[first:stop].long())


def dequantize_rows(
    tensors: dict[str, torch.Tensor],
    out_features: int,
    in_features: int,
    layout: str,
    rows: tuple[int, int],
    outliers: bool = True,
) -> torch.Tensor:
    """Rows ``first:stop`` of the float32 weight the stored tensors represent, in the
    original column order, read from their own bytes (``first`` a multiple of 8): a
    stripe, so the whole weight never needs to exist at once. Without ``outliers``,
    every position holds what its code gives."""
    first, stop = rows
    if first % TILE_ROWS or not 0 <= first <= stop <= out_features:
        raise ValueError(f"rows {first}:{stop} of {out_features} (the first a multiple of 8)")
    group_bits = [int(b) for b in tensors["group_bits"]]
    group_sizes = [int(n) for n in tensors["group_sizes"]]
    code_offsets = group_byte_offsets(out_features, group_bits, group_sizes)
    tables = group_tables(tensors["lut"], layout, out_features, group_bits, group_sizes)
    tiles = (first // TILE_ROWS, -(-stop // TILE_ROWS))
    codes = [
        unpack_tiled(
            tensors["codes"][code_offsets[g] : code_offsets[g + 1]], bits, out_features, size, tiles
        )[: stop - first]
        for g, (bits, size) in enumerate(zip(group_bits, group_sizes, strict=True))
    ]
    if layout == "row":
        tables = [table[first:stop] for table in tables]
    shape = (stop - first, in_features)
    perm = stored_permutation(tensors)
    weight = assemble(shape, perm, group_offsets(group_sizes), codes, tables, layout)
    if outliers and "outlier_values" in tensors:
        counts = tensors["outlier_counts"]
        start, end = outlier_entries(counts, rows)
        cols = tensors["outlier_cols"][start:end].long()
        weight[outlier_rows(counts, rows), cols] = tensors["outlier_values"][start:end].float()
    return weight


def table_values_at(
    tensors: dict[str, torch.Tensor],
    out_features: int,
    layout: str,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """What the codes and tables give at positions ``(rows, cols)`` (original columns),
    float32, read from the packed stream position by position (no matrix is built)."""
    group_bits = tensors["group_bits"].long()
    sizes = tensors["group_sizes"].long()
    code_offsets = torch.tensor(
        group_byte_offsets(out_features, group_bits.tolist(), sizes.tolist())
    )
    table_offsets = torch.tensor(
        lut_offsets(layout, out_features, group_bits.tolist(), sizes.tolist())
    )
    starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    perm = stored_permutation(tensors)
    stored = torch.empty_like(perm)
    stored[perm] = torch.arange(stored.numel(), device=perm.device)
    position = stored[cols.long()]
    group = torch.searchsorted(starts, position, right=True) - 1
    bits, column = group_bits[group], position - starts[group]
    rows = rows.long()
    first_bit = (rows % TILE_ROWS) * bits
    byte = code_offsets[group] + ((rows // TILE_ROWS) * sizes[group] + column) * bits
    byte = byte + first_bit // 8
    codes = tensors["codes"].long()
    following = torch.where(byte + 1 < codes.numel(), byte + 1, byte)
    word = codes[byte] | (codes[following] << 8)
    code = (word >> (first_bit % 8)) & ((1 << bits) - 1)
    owner = rows if layout == "row" else column
    entry = table_offsets[group] + owner * (1 << bits) + code
    return tensors["lut"][entry].float()


def table_positions(layer: LUTLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each weight's value sits in the stored (flat) ``lut``, in three parts:
    ``codes`` ``[out, in]`` uint8 in the original column order, ``column_base`` and
    ``row_stride`` ``[in]`` int64, so that weight ``(o, c)`` (outliers aside) is
    ``lut[column_base[c] + o * row_stride[c] + codes[o, c]]``."""
    offsets = layer.offsets
    tables = lut_offsets(layer.layout, layer.out_features, layer.group_bits, layer.group_sizes)
    base = torch.empty(layer.in_features, dtype=torch.int64)
    stride = torch.empty(layer.in_features, dtype=torch.int64)
    for g, bits in enumerate(layer.group_bits):
        start, stop = offsets[g], offsets[g + 1]
        if layer.layout == "row":  # one table per output row: rows step over the tables
            base[start:stop], stride[start:stop] = tables[g], 2**bits
        else:  # one table per column
            base[start:stop] = tables[g] + torch.arange(stop - start) * 2**bits
            stride[start:stop] = 0
    codes = torch.empty((layer.out_features, layer.in_features), dtype=torch.uint8)
    if layer.codes:
        codes[:, layer.perm] = torch.cat([c.cpu() for c in layer.codes], dim=1)
    column_base, row_stride = torch.empty_like(base), torch.empty_like(stride)
    column_base[layer.perm], row_stride[layer.perm] = base, stride
    return codes, column_base, row_stride
