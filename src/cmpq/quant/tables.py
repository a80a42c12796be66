"""Look-up-table quantization of one linear with mixed per-channel widths and
fp16 outliers, without error feedback (the CMPQ paper's quantizer).

Each bit-group's tables are fitted by 1-D k-means (:mod:`cmpq.quant.kmeans`):

- ``row`` layout: one table per output row per bit-group, over the row's
  weights in that group, weighted by each channel's activation energy E[x_j²]
  (the output error is ``sum_j (dW_ij x_j)²``);
- ``column`` layout: one table per input column, over the column's ``out``
  weights (one activation scale per column, so no weighting).

The result is a :class:`cmpq.format.layer.LUTLayer`, what the format stores.
"""

from __future__ import annotations

import torch

from ..format.layer import LUTLayer, storage_order
from .kmeans import nearest_centroid, row_chunks, weighted_kmeans_1d, weighted_kmeans_1d_each
from .outliers import activation_outliers, activation_scale, add_error_outliers


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


def fit_tables(
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
    luts, codes = fit_tables(*fit)
    outlier_mask = act_mask
    if q_outliers > 0:
        fitted = (luts, codes, perm, offsets, layout)
        outlier_mask = add_error_outliers(weight, scale, act_mask, fitted, q_outliers)
        luts, codes = fit_tables(weight, energy, ~outlier_mask, *fit[3:], start=luts)
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
    ``keep=False`` (outliers) count nothing. The rate-distortion allocation
    (:mod:`cmpq.alloc.rd`) chooses widths from these.
    """
    values, mask = weight.float().t(), keep.t()
    chunks = []
    for rows in row_chunks(*values.shape):  # a chunk of columns at a time: bounded memory
        part, part_mask = values[rows], mask[rows].float()
        fits = weighted_kmeans_1d_each(
            part, part_mask, [2**bits for bits in widths], iters=iters, seed=seed, refine=False
        )
        columns = []
        for centroids, assignment in fits:
            error = (part - centroids.half().float().gather(1, assignment)).square() * part_mask
            columns.append(error.sum(dim=1).double() * energy[rows].double())
        chunks.append(torch.stack(columns, dim=1))
    return torch.cat(chunks)
