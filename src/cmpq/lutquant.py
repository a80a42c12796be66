"""Non-uniform (look-up-table) quantization of one linear layer with mixed
per-channel widths and sparse fp16 outliers: the pure-tensor core of CMPQ.

Columns (input channels) are permuted so channels of equal width are
contiguous ("bit-groups"). Each bit-group has look-up tables of ``2**bits``
fp16 entries:

- ``row`` layout: one table per output row per bit-group, fitted by k-means
  over the row's weights in that group, weighted by each channel's activation
  energy E[x_j²] (the output error is ``sum_j (dW_ij x_j)²``);
- ``column`` layout: one table per input column, fitted by k-means over the
  column's ``out`` weights (one activation scale per column, so no weighting).

Outliers are kept exactly in fp16 and left out of the table fits:

- O_act: the entries with the largest ``|W_ij| * s_j`` (weights on extreme
  activation channels);
- O_q: after a first fit, the entries with the largest activation-weighted
  error ``|W_ij - Q(W_ij)| * s_j``; the tables are then refitted without them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .allocate import groups_of, index_bits
from .kmeans import nearest_centroid, weighted_kmeans_1d, weighted_kmeans_1d_each
from .packing import pack_groups, unpack_groups


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


def _group_table_fit(
    values: torch.Tensor,
    weights: torch.Tensor,
    bits: int,
    layout: str,
    iters: int,
    seed: int,
    start: torch.Tensor | None = None,
    refine: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one bit-group's tables; returns fp16 tables and codes for ``values [out, n]``.

    With ``start`` (the tables of a first fit) only Lloyd's iterations run from
    there: a refit after removing a few outliers moves the tables little, and
    the partition search is what costs time.
    """
    if layout == "column":
        values, weights = values.t(), weights.t()
    options = {"iters": iters, "seed": seed, "refine": refine}
    if start is not None:
        options.update(init=start.float(), refine=False)
    centroids, _ = weighted_kmeans_1d(values, weights, 2**bits, **options)
    tables = centroids.half()
    codes = nearest_centroid(values, tables.float()).to(torch.uint8)
    return tables, codes if layout == "row" else codes.t().contiguous()


def _group_dequantize(codes: torch.Tensor, table: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "row":
        return table.float().gather(1, codes.long())
    return table.float().gather(1, codes.t().long()).t()


def _fit_tables(
    weight: torch.Tensor,
    energy: torch.Tensor,
    keep: torch.Tensor,
    group_bits: list[int],
    offsets: list[int],
    perm: torch.Tensor,
    layout: str,
    iters: int,
    seed: int,
    start: list[torch.Tensor] | None = None,
    refine: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Tables and codes for every bit-group; entries with ``keep=False`` weigh nothing.

    ``refine=False`` skips k-means' partition search (Lloyd only): a quicker, rougher fit.
    """
    permuted = weight[:, perm]
    importance = energy[perm].float().unsqueeze(0) * keep[:, perm].float()
    if layout == "column":  # one activation scale per column: only the outlier mask matters
        importance = keep[:, perm].float()
    luts, codes = [], []
    for g, bits in enumerate(group_bits):
        cols = slice(offsets[g], offsets[g + 1])
        table, code = _group_table_fit(
            permuted[:, cols],
            importance[:, cols],
            bits,
            layout,
            iters,
            seed,
            None if start is None else start[g],
            refine,
        )
        luts.append(table)
        codes.append(code)
    return luts, codes


def top_entries(score: torch.Tensor, count: int, exclude: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the ``count`` largest scores outside ``exclude``."""
    mask = torch.zeros(exclude.shape, dtype=torch.bool, device=exclude.device)  # contiguous
    if count <= 0:
        return mask
    score = score.masked_fill(exclude, float("-inf")).flatten()
    mask.view(-1)[torch.topk(score, count).indices] = True
    return mask


def storage_order(bits_per_channel: torch.Tensor):
    """Bit-group widths and sizes, the column permutation, and the group offsets."""
    group_bits, group_sizes = groups_of(bits_per_channel)
    perm = torch.argsort(bits_per_channel, stable=True)
    return group_bits, group_sizes, perm, group_offsets(group_sizes)


def activation_scale(energy: torch.Tensor) -> torch.Tensor:
    """``[1, in]`` RMS activation per input channel: the weight of an error in its column."""
    return energy.float().clamp_min(0).sqrt().unsqueeze(0)


def activation_outliers(weight: torch.Tensor, scale: torch.Tensor, count: int) -> torch.Tensor:
    """O_act: the ``count`` entries with the largest ``|W_ij| * s_j``."""
    nothing = torch.zeros_like(weight, dtype=torch.bool)
    return top_entries(weight.abs() * scale, count, nothing)


def quantize_layer(
    weight: torch.Tensor,
    bits_per_channel: torch.Tensor,
    energy: torch.Tensor,
    *,
    layout: str = "row",
    act_outliers: int = 0,
    q_outliers: int = 0,
    iters: int = 25,
    seed: int = 0,
) -> LUTLayer:
    """Quantize ``weight [out, in]`` with the given per-channel widths.

    ``energy[j]`` is the mean squared activation of input channel j; its square
    root is the activation scale used to rank outliers. ``act_outliers`` and
    ``q_outliers`` are exact entry counts of the two outlier kinds.
    """
    weight = weight.float().contiguous()
    out_features, in_features = weight.shape
    group_bits, group_sizes, perm, offsets = storage_order(bits_per_channel)
    scale = activation_scale(energy)
    act_mask = activation_outliers(weight, scale, act_outliers)
    fit = (weight, energy, ~act_mask, group_bits, offsets, perm, layout, iters, seed)
    luts, codes = _fit_tables(*fit)
    outlier_mask = act_mask
    if q_outliers > 0:
        fitted = (luts, codes, perm, offsets, layout)
        outlier_mask = add_error_outliers(weight, scale, act_mask, fitted, q_outliers)
        luts, codes = _fit_tables(weight, energy, ~outlier_mask, *fit[3:], start=luts)
    rows, cols = outlier_mask.nonzero(as_tuple=True)
    return LUTLayer(
        out_features=out_features,
        in_features=in_features,
        layout=layout,
        group_bits=group_bits,
        group_sizes=group_sizes,
        perm=perm,
        codes=codes,
        luts=luts,
        outlier_rows=rows,
        outlier_cols=cols,
        outlier_values=weight[rows, cols].half(),
    )


def add_error_outliers(
    weight: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor, fitted: tuple, count: int
) -> torch.Tensor:
    """``mask`` plus the ``count`` entries outside it that the fit rounds worst, by
    activation-weighted error; ``fitted`` is ``(luts, codes, perm, offsets, layout)``."""
    luts, codes, perm, offsets, layout = fitted
    error = (weight - _assemble(weight.shape, perm, offsets, codes, luts, layout)).abs()
    return mask | top_entries(error * scale, count, mask)


def _assemble(shape, perm, offsets, codes, luts, layout) -> torch.Tensor:
    permuted = torch.empty(shape, dtype=torch.float32)
    for g, (code, table) in enumerate(zip(codes, luts, strict=True)):
        permuted[:, offsets[g] : offsets[g + 1]] = _group_dequantize(code, table, layout)
    weight = torch.empty(shape, dtype=torch.float32)
    weight[:, perm] = permuted
    return weight


def dequantize_layer(layer: LUTLayer) -> torch.Tensor:
    """The ``[out, in]`` float32 weight the stored tensors represent."""
    shape = (layer.out_features, layer.in_features)
    weight = _assemble(shape, layer.perm, layer.offsets, layer.codes, layer.luts, layer.layout)
    weight[layer.outlier_rows, layer.outlier_cols] = layer.outlier_values.float()
    return weight


def stored_dtypes(in_features: int) -> dict[str, torch.dtype]:
    """The dtype of every stored tensor of a layer with ``in_features`` input columns.

    Column indices (the permutation, outlier columns) take int16 when they fit
    (``allocate.index_bits``), as the cost model counts them. The loader
    requires exactly these dtypes, so the writer and the checks cannot drift.
    """
    index = torch.int16 if index_bits(in_features) == 16 else torch.int32
    return {
        "codes": torch.uint8,
        "lut": torch.float16,
        "perm": index,
        "group_bits": torch.uint8,
        "group_sizes": torch.int32,
        "outlier_crow": torch.int32,
        "outlier_cols": index,
        "outlier_values": torch.float16,
    }


def to_tensors(layer: LUTLayer) -> dict[str, torch.Tensor]:
    """The tensors stored for this layer (packed codes, tables, metadata, CSR outliers)."""
    dtypes = stored_dtypes(layer.in_features)
    tensors = {
        "codes": pack_groups([c.flatten() for c in layer.codes], layer.group_bits),
        "lut": torch.cat([t.flatten() for t in layer.luts]).to(dtypes["lut"]),
        "perm": layer.perm.to(dtypes["perm"]),
        "group_bits": torch.tensor(layer.group_bits, dtype=dtypes["group_bits"]),
        "group_sizes": torch.tensor(layer.group_sizes, dtype=dtypes["group_sizes"]),
    }
    if layer.outlier_values.numel():
        counts = torch.bincount(layer.outlier_rows, minlength=layer.out_features)
        crow = torch.zeros(layer.out_features + 1, dtype=dtypes["outlier_crow"])
        crow[1:] = counts.cumsum(0)
        tensors["outlier_crow"] = crow
        tensors["outlier_cols"] = layer.outlier_cols.to(dtypes["outlier_cols"])
        tensors["outlier_values"] = layer.outlier_values.to(dtypes["outlier_values"])
    return tensors


def from_tensors(
    tensors: dict[str, torch.Tensor], out_features: int, in_features: int, layout: str
) -> LUTLayer:
    """Rebuild a layer from its stored tensors (inverse of :func:`to_tensors`)."""
    group_bits = [int(b) for b in tensors["group_bits"]]
    group_sizes = [int(n) for n in tensors["group_sizes"]]
    flat = unpack_groups(tensors["codes"], group_bits, [out_features * n for n in group_sizes])
    codes = [c.reshape(out_features, n) for c, n in zip(flat, group_sizes, strict=True)]
    luts, start = [], 0
    for bits, size in zip(group_bits, group_sizes, strict=True):
        rows = out_features if layout == "row" else size
        luts.append(tensors["lut"][start : start + rows * 2**bits].reshape(rows, 2**bits))
        start += rows * 2**bits
    if "outlier_values" in tensors:
        counts = tensors["outlier_crow"].long().diff()
        rows = torch.repeat_interleave(torch.arange(out_features), counts)
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
        tensors["perm"].long(),
        codes,
        luts,
        rows,
        cols,
        values,
    )


def stored_bits(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Bits actually stored, by kind: what the file holds for this layer."""
    kinds = {
        "codes": ("codes",),
        "lut": ("lut",),
        "outliers": ("outlier_crow", "outlier_cols", "outlier_values"),
        "metadata": ("perm", "group_bits", "group_sizes"),
    }
    return {
        kind: sum(8 * tensors[n].numel() * tensors[n].element_size() for n in names if n in tensors)
        for kind, names in kinds.items()
    }


def column_distortions(
    weight: torch.Tensor,
    energy: torch.Tensor,
    keep: torch.Tensor,
    widths: tuple[int, ...],
    iters: int = 10,
    seed: int = 0,
) -> torch.Tensor:
    """``[in, len(widths)]``: each input column's output distortion at each width.

    The distortion of column j at width b is ``E[x_j²] * sum_i (W_ij - Q_b(W_ij))²``
    with ``Q_b`` the column's own 2**b-entry k-means table (the column layout's
    quantizer, fitted with plain Lloyd iterations for speed); entries with
    ``keep=False`` (outliers) count nothing.
    """
    values, mask = weight.float().t(), keep.t().float()
    columns = []
    fits = weighted_kmeans_1d_each(
        values, mask, [2**bits for bits in widths], iters=iters, seed=seed, refine=False
    )
    for centroids, assignment in fits:
        error = (values - centroids.half().float().gather(1, assignment)).square() * mask
        columns.append(error.sum(dim=1).double() * energy.double())
    return torch.stack(columns, dim=1)
