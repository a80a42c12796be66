"""Error-compensated look-up-table quantization: GPTQ's column-by-column error
feedback with non-uniform tables, mixed per-channel widths and fp16 outliers.

With ``H = XᵀX`` (the layer's input Gram matrix) the output error of a weight
change ``dW`` is ``tr(dW H dWᵀ)``. Quantizing the input columns one at a time
and spreading each column's rounding error onto the columns not yet quantized,
weighted by the inverse Hessian (GPTQ, Frantar et al. 2022), makes the later
columns absorb the earlier ones' error. Here a column is rounded to its own
look-up table instead of a uniform grid:

- ``column`` layout: the tables of a block of columns are fitted (k-means) on
  the weights as they are when the block starts, i.e. after the feedback of
  every earlier block;
- ``row`` layout: the row tables are fitted once on the original weights and
  every column rounds to its row's table.

Columns are visited in GPTQ's act-order (largest ``E[x_j²]`` first), whatever
their width; ``order="storage"`` visits them fewest bits first instead.
Outliers (chosen as in :func:`cmpq.quant.tables.quantize_layer`) are stored
exactly as their value at their turn, so they carry no error forward.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Protocol

import torch

from ..errors import CmpqWarning
from ..format.layer import LUTLayer, storage_order
from .kmeans import weighted_kmeans_1d
from .outliers import activation_outliers, activation_scale, add_error_outliers
from .tables import fit_tables

DAMPING_STEPS = 6  # the damping is raised tenfold up to this many times


class StoredMatrix(Protocol):
    """A Gram matrix kept elsewhere (:class:`cmpq.quant.workdir.StoredGram`)."""

    def diagonal(self) -> torch.Tensor: ...

    def permuted(self, order: torch.Tensor) -> torch.Tensor:
        """A new float64 copy with rows and columns in ``order``."""
        ...


GramSource = torch.Tensor | StoredMatrix


def inverse_hessian_factor(
    gram: torch.Tensor | Callable[[], torch.Tensor], damp: float = 0.01
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` (float32), GPTQ's update operator,
    and the damping it took.

    ``λ`` is ``damp`` times the mean diagonal; channels that never activate get
    a unit diagonal (their weights do not affect the output). When ``H + λI`` is
    not positive definite (a rank-deficient Gram matrix from too few calibration
    tokens, or rounding) the damping is raised tenfold until the factorization
    succeeds. If it never does (non-finite entries), the identity is returned
    with damping ``inf``: every column is then rounded on its own, no feedback.

    ``gram`` is the matrix, or a callable that builds a new copy of it for this
    function to overwrite (once per attempt). The factorization, inverse and
    second factorization all happen in that one float64 matrix, so at most one
    ``[in, in]`` float64 matrix lives here at a time (plus ``gram`` itself when
    it is a tensor, copied for each attempt).
    """
    fresh = gram if callable(gram) else (lambda: gram.to(torch.float64, copy=True))
    size, device = None, None
    for attempt in range(DAMPING_STEPS):
        hessian = fresh().to(torch.float64)
        size, device = hessian.shape[0], hessian.device
        diagonal = hessian.diagonal()
        diagonal[diagonal <= 0] = 1.0
        used = damp * 10**attempt
        diagonal += used * diagonal.mean().item()
        info = torch.zeros((), dtype=torch.int32, device=device)
        torch.linalg.cholesky_ex(hessian, out=(hessian, info))
        if info == 0:
            torch.cholesky_inverse(hessian, out=hessian)
            torch.linalg.cholesky_ex(hessian, upper=True, out=(hessian, info))
            if info == 0 and bool(torch.isfinite(hessian).all()):
                return hessian.float(), used
        del hessian, diagonal
    return torch.eye(size, device=device), math.inf


FeedbackOperator = tuple[torch.Tensor, torch.Tensor, float]


def feedback_operator(
    gram: GramSource, damp: float = 0.01, visit: torch.Tensor | None = None
) -> FeedbackOperator:
    """``(visit, factor, used)``: the order the columns are quantized in (``visit``,
    by default GPTQ's act-order, the loudest input channels first), the
    :func:`inverse_hessian_factor` of the Gram matrix in that order, and the
    damping it took.

    ``gram`` may be stored instead (:class:`~cmpq.quant.workdir.StoredGram`:
    ``diagonal()`` and ``permuted(order)``): each copy needed is read from disk,
    and nothing is held in between.
    """
    if visit is None:
        visit = torch.argsort(gram.diagonal(), descending=True, stable=True)
    visit = visit.cpu()
    if isinstance(gram, torch.Tensor):
        permuted = lambda: gram[visit[:, None], visit]  # noqa: E731
    else:
        permuted = lambda: gram.permuted(visit)  # noqa: E731
    factor, used = inverse_hessian_factor(permuted, damp)
    return visit, factor, used


def _warn_damping(label: str, damp: float, used: float) -> None:
    """Say, in one line, that a layer's Gram matrix needed more damping than asked."""
    if used == damp:
        return
    if math.isinf(used):
        message = (
            f"{label}: the calibration Gram matrix is not positive definite even damped "
            f"{damp * 10 ** (DAMPING_STEPS - 1):g} (non-finite activations?); quantized without "
            "error feedback"
        )
    else:
        message = (
            f"{label}: the calibration Gram matrix is not positive definite at damp {damp:g}; "
            f"error feedback used damp {used:g}"
        )
    warnings.warn(message, CmpqWarning, stacklevel=3)


def _column_tables(values: torch.Tensor, keep: torch.Tensor, bits: int, iters: int, seed: int):
    """k-means tables (fp16) for each column of ``values [out, n]``: ``[n, 2^bits]``."""
    centroids, _ = weighted_kmeans_1d(values.t(), keep.t().float(), 2**bits, iters=iters, seed=seed)
    return centroids.half()


def quantize_layer_feedback(
    weight: torch.Tensor,
    bits_per_channel: torch.Tensor,
    energy: torch.Tensor,
    gram: torch.Tensor | None,
    *,
    layout: str = "column",
    act_outliers: int = 0,
    q_outliers: int = 0,
    iters: int = 25,
    seed: int = 0,
    block_size: int = 128,
    damp: float = 0.01,
    order: str = "act",
    label: str = "layer",
    operator: FeedbackOperator | None = None,
) -> LUTLayer:
    """Like :func:`cmpq.quant.tables.quantize_layer`, with GPTQ-style error feedback.

    ``gram`` is the ``[in, in]`` sum of ``x xᵀ`` over the calibration tokens;
    ``label`` names the layer in the warning given when it needs more damping.
    ``operator`` is :func:`feedback_operator` of ``gram`` when already computed
    (linears fed the same input share it: act order depends on ``gram`` alone);
    ``gram`` may then be ``None``.
    """
    weight = weight.float().contiguous()
    out_features, in_features = weight.shape
    group_bits, group_sizes, perm, offsets = storage_order(bits_per_channel)
    scale = activation_scale(energy)
    outliers = activation_outliers(weight, scale, act_outliers)
    if q_outliers > 0:  # ranked by the error of a quick feedback-free fit (Lloyd only)
        fit = (weight, energy, ~outliers, group_bits, offsets, perm, layout, iters, seed)
        luts, codes = fit_tables(*fit, refine=False)
        fitted = (luts, codes, perm, offsets, layout)
        outliers = add_error_outliers(weight, scale, outliers, fitted, q_outliers)

    if operator is None or order != "act":
        operator = feedback_operator(gram, damp, perm if order == "storage" else None)
    visit, factor, used = operator
    widths = bits_per_channel[visit]
    group_of_width = {bits: g for g, bits in enumerate(group_bits)}
    work = weight[:, visit].clone()
    exact = outliers[:, visit]
    _warn_damping(label, damp, used)
    if layout == "row":
        fit = (weight, energy, ~outliers, group_bits, offsets, perm, layout, iters, seed)
        row_tables, _ = fit_tables(*fit)
    tables: list[torch.Tensor | None] = [None] * in_features  # per visited column
    codes = torch.zeros(out_features, in_features, dtype=torch.uint8, device=weight.device)
    quantized = torch.zeros_like(work)

    for start in range(0, in_features, block_size):
        stop = min(start + block_size, in_features)
        for bits in widths[start:stop].unique().tolist():
            index = start + (widths[start:stop] == bits).nonzero().flatten()
            if layout == "column":
                fitted = _column_tables(work[:, index], ~exact[:, index], bits, iters, seed)
                chosen = fitted.float()
            else:
                chosen = row_tables[group_of_width[bits]].float().unsqueeze(0)
                chosen = chosen.expand(index.numel(), -1, -1)
            for position, table in zip(index.tolist(), chosen, strict=True):
                tables[position] = table
        block = work[:, start:stop]
        errors = torch.zeros_like(block)
        for j in range(stop - start):
            column = start + j
            values = block[:, j]
            table = tables[column]
            table = table.unsqueeze(0) if table.dim() == 1 else table
            code = (values.unsqueeze(1) - table).abs().argmin(dim=1)
            rounded = table.expand(out_features, -1).gather(1, code.unsqueeze(1)).squeeze(1)
            keep = exact[:, column]
            rounded = torch.where(keep, values.half().float(), rounded)
            codes[:, column] = code.to(torch.uint8)
            quantized[:, column] = rounded
            error = (values - rounded) / factor[column, column]
            block[:, j + 1 :] -= error.unsqueeze(1) * factor[column, column + 1 : stop].unsqueeze(0)
            errors[:, j] = error
        work[:, stop:] -= errors @ factor[start:stop, stop:]

    # back from visiting order to the original columns, then to storage order
    original_codes = torch.empty_like(codes)
    original_codes[:, visit] = codes
    restored = torch.empty_like(quantized)
    restored[:, visit] = quantized
    stored_codes = original_codes[:, perm]
    if layout == "column":
        position_of = torch.empty(in_features, dtype=torch.int64)
        position_of[visit] = torch.arange(in_features)
        luts = [
            torch.stack(
                [tables[int(position_of[c])] for c in perm[offsets[g] : offsets[g + 1]]]
            ).half()
            for g in range(len(group_bits))
        ]
    else:
        luts = row_tables
    rows, cols = outliers.nonzero(as_tuple=True)
    return LUTLayer(
        out_features=out_features,
        in_features=in_features,
        layout=layout,
        group_bits=group_bits,
        group_sizes=group_sizes,
        perm=perm,
        codes=[
            stored_codes[:, offsets[g] : offsets[g + 1]].contiguous()
            for g in range(len(group_bits))
        ],
        luts=luts,
        outlier_rows=rows,
        outlier_cols=cols,
        outlier_values=restored[rows, cols].half(),
    )
