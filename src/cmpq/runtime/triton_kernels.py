"""Triton kernels for ``x W^T`` read from a column-layout layer's row-tiled codes, LUTs and CSR."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..format.layer import group_offsets, lut_offsets
from ..format.packing import group_byte_offsets
from .stripes import matmul_by_stripes, stripe_rows

DECODE_TOKENS = 16  # up to this many tokens: the decode kernel; more: de-quantized stripes
BLOCK_ROWS = 32  # output rows per program: whole row tiles of 8
DECODE_PRODUCT = 4096  # tokens x columns a decode program multiplies at once (per row)
OUTLIER_BLOCK = 32  # outliers of one row handled at once
DEQUANTIZE_BLOCK_COLS = 64  # columns per de-quantizing program
STRIPE_FLOATS = 1 << 24  # prefill: rows de-quantized at once, about 64 MB of float32


@triton.jit
def _codes(codes_ptr, code_offset, rows, cols, mask, n_cols, BITS: tl.constexpr):
    """The ``[rows, cols]`` codes of one bit-group: tile ``r // 8``, column ``j`` is ``BITS``
    bytes at ``(tile * n_cols + j) * BITS``; row ``r % 8`` is bits ``[l*BITS, (l+1)*BITS)``."""
    bit = (rows % 8) * BITS
    shift = (bit % 8)[:, None]
    byte = (
        code_offset + ((rows // 8)[:, None] * n_cols + cols[None, :]) * BITS + (bit // 8)[:, None]
    )
    low = tl.load(codes_ptr + byte, mask=mask, other=0).to(tl.int32)
    # the next byte only where the code reaches into it (it may lie past the stream's end)
    high = tl.load(codes_ptr + byte + 1, mask=mask & (shift + BITS > 8), other=0).to(tl.int32)
    return ((low | (high << 8)) >> shift) & ((1 << BITS) - 1)


@triton.jit
def _weights(codes_ptr, lut_ptr, code_offset, lut_offset, rows, cols, mask, n_cols, BITS):
    """The float32 weights at ``[rows, cols]`` of one bit-group (0 where ``mask`` is off)."""
    codes = _codes(codes_ptr, code_offset, rows, cols, mask, n_cols, BITS)
    entry = lut_offset + cols[None, :] * (1 << BITS) + codes
    return tl.load(lut_ptr + entry, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _decode_group_kernel(
    y_ptr,
    x_ptr,
    codes_ptr,
    lut_ptr,
    perm_ptr,
    n_tokens,
    out_features,
    in_features,
    n_cols,
    code_offset,
    lut_offset,
    column_offset,
    BITS: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """``y[:, rows] += x[:, perm[group]] @ W[rows, group]^T`` for one bit-group and one block
    of output rows, looping over the group's columns."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    tokens = tl.arange(0, BLOCK_TOKENS)
    row_mask = rows < out_features
    token_mask = tokens < n_tokens
    acc = tl.zeros((BLOCK_TOKENS, BLOCK_ROWS), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_COLS):
        cols = start + tl.arange(0, BLOCK_COLS)
        col_mask = cols < n_cols
        weights = _weights(
            codes_ptr,
            lut_ptr,
            code_offset,
            lut_offset,
            rows,
            cols,
            row_mask[:, None] & col_mask[None, :],
            n_cols,
            BITS,
        )
        original = tl.load(perm_ptr + column_offset + cols, mask=col_mask, other=0)
        x = tl.load(
            x_ptr + tokens[:, None] * in_features + original[None, :],
            mask=token_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        acc += tl.sum(weights[None, :, :] * x[:, None, :], axis=2)
    y = y_ptr + tokens[:, None] * out_features + rows[None, :]
    y_mask = token_mask[:, None] & row_mask[None, :]
    tl.store(y, tl.load(y, mask=y_mask, other=0.0) + acc, mask=y_mask)


@triton.jit
def _decode_outliers_kernel(
    y_ptr,
    x_ptr,
    crow_ptr,
    cols_ptr,
    values_ptr,
    base_ptr,
    n_tokens,
    out_features,
    in_features,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_OUTLIERS: tl.constexpr,
):
    """``y[:, row] += x[:, col] * (value - base)`` over one output row's outliers."""
    row = tl.program_id(0)
    tokens = tl.arange(0, BLOCK_TOKENS)
    token_mask = tokens < n_tokens
    first = tl.load(crow_ptr + row)
    stop = tl.load(crow_ptr + row + 1)
    acc = tl.zeros((BLOCK_TOKENS,), dtype=tl.float32)
    for start in range(first, stop, BLOCK_OUTLIERS):
        index = start + tl.arange(0, BLOCK_OUTLIERS)
        mask = index < stop
        cols = tl.load(cols_ptr + index, mask=mask, other=0)
        value = tl.load(values_ptr + index, mask=mask, other=0.0).to(tl.float32)
        base = tl.load(base_ptr + index, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(
            x_ptr + tokens[:, None] * in_features + cols[None, :],
            mask=token_mask[:, None] & mask[None, :],
            other=0.0,
        )
        acc += tl.sum(x * (value - base)[None, :], axis=1)
    y = y_ptr + tokens * out_features + row
    tl.store(y, tl.load(y, mask=token_mask, other=0.0) + acc, mask=token_mask)


@triton.jit
def _dequantize_group_kernel(
    stripe_ptr,
    codes_ptr,
    lut_ptr,
    perm_ptr,
    first_row,
    stop_row,
    in_features,
    n_cols,
    code_offset,
    lut_offset,
    column_offset,
    BITS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """One bit-group's weights of rows ``first_row:stop_row`` written in their original columns
    of ``stripe`` (``[stop_row - first_row, in]`` float32)."""
    rows = first_row + tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    mask = (rows < stop_row)[:, None] & col_mask[None, :]
    weights = _weights(codes_ptr, lut_ptr, code_offset, lut_offset, rows, cols, mask, n_cols, BITS)
    original = tl.load(perm_ptr + column_offset + cols, mask=col_mask, other=0)
    stripe = stripe_ptr + (rows - first_row)[:, None] * in_features + original[None, :]
    tl.store(stripe, weights, mask=mask)


@triton.jit
def _write_outliers_kernel(
    stripe_ptr,
    crow_ptr,
    cols_ptr,
    values_ptr,
    first_row,
    in_features,
    BLOCK_OUTLIERS: tl.constexpr,
):
    """Row ``first_row + program`` of ``stripe`` gets its outliers' values."""
    local_row = tl.program_id(0)
    first = tl.load(crow_ptr + first_row + local_row)
    stop = tl.load(crow_ptr + first_row + local_row + 1)
    for start in range(first, stop, BLOCK_OUTLIERS):
        index = start + tl.arange(0, BLOCK_OUTLIERS)
        mask = index < stop
        cols = tl.load(cols_ptr + index, mask=mask, other=0)
        value = tl.load(values_ptr + index, mask=mask, other=0.0).to(tl.float32)
        tl.store(stripe_ptr + local_row * in_features + cols, value, mask=mask)


Header = tuple[list[int], list[int]]  # the bit-groups' widths and column counts, on the host


def bit_groups(
    tensors: dict[str, torch.Tensor], out_features: int, header: Header | None = None
) -> list[tuple[int, ...]]:
    """Per bit-group: ``(bits, columns, code byte offset, lut entry offset, first stored
    column)``. ``header`` spares reading the widths and counts back from the device (a
    synchronisation on every call)."""
    if header is None:
        header = (tensors["group_bits"].tolist(), tensors["group_sizes"].tolist())
    bits, sizes = [int(b) for b in header[0]], [int(n) for n in header[1]]
    code_offsets = group_byte_offsets(out_features, bits, sizes)
    table_offsets = lut_offsets("column", out_features, bits, sizes)
    columns = group_offsets(sizes)
    starts = (code_offsets[:-1], table_offsets[:-1], columns[:-1])
    return list(zip(bits, sizes, *starts, strict=True))


def decode(
    tensors: dict[str, torch.Tensor],
    out_features: int,
    in_features: int,
    x: torch.Tensor,
    header: Header | None = None,
) -> torch.Tensor:
    """``x W^T`` for a few tokens: each bit-group's codes streamed once, outliers added."""
    n_tokens = x.shape[0]
    block_tokens = triton.next_power_of_2(max(n_tokens, 1))
    block_cols = max(16, DECODE_PRODUCT // block_tokens // BLOCK_ROWS)
    y = torch.zeros(n_tokens, out_features, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(out_features, BLOCK_ROWS),)
    groups = bit_groups(tensors, out_features, header)
    for bits, n_cols, code_offset, lut_offset, column_offset in groups:
        _decode_group_kernel[grid](
            y,
            x,
            tensors["codes"],
            tensors["lut"],
            tensors["perm"],
            n_tokens,
            out_features,
            in_features,
            n_cols,
            code_offset,
            lut_offset,
            column_offset,
            BITS=bits,
            BLOCK_TOKENS=block_tokens,
            BLOCK_ROWS=BLOCK_ROWS,
            BLOCK_COLS=block_cols,
        )
    if "outlier_values" in tensors:
        _decode_outliers_kernel[(out_features,)](
            y,
            x,
            tensors["outlier_crow"],
            tensors["outlier_cols"],
            tensors["outlier_values"],
            tensors["outlier_base"],
            n_tokens,
            out_features,
            in_features,
            BLOCK_TOKENS=block_tokens,
            BLOCK_OUTLIERS=OUTLIER_BLOCK,
        )
    return y


def dequantize_stripe(
    tensors: dict[str, torch.Tensor],
    groups: list[tuple[int, ...]],
    in_features: int,
    rows: tuple[int, int],
) -> torch.Tensor:
    """Rows ``first:stop`` of the float32 weight in the original column order, outliers in."""
    first, stop = rows
    stripe = torch.empty(
        stop - first, in_features, dtype=torch.float32, device=tensors["lut"].device
    )
    for bits, n_cols, code_offset, lut_offset, column_offset in groups:
        grid = (triton.cdiv(stop - first, BLOCK_ROWS), triton.cdiv(n_cols, DEQUANTIZE_BLOCK_COLS))
        _dequantize_group_kernel[grid](
            stripe,
            tensors["codes"],
            tensors["lut"],
            tensors["perm"],
            first,
            stop,
            in_features,
            n_cols,
            code_offset,
            lut_offset,
            column_offset,
            BITS=bits,
            BLOCK_ROWS=BLOCK_ROWS,
            BLOCK_COLS=DEQUANTIZE_BLOCK_COLS,
        )
    if "outlier_values" in tensors:
        _write_outliers_kernel[(stop - first,)](
            stripe,
            tensors["outlier_crow"],
            tensors["outlier_cols"],
            tensors["outlier_values"],
            first,
            in_features,
            BLOCK_OUTLIERS=OUTLIER_BLOCK,
        )
    return stripe


def prefill(
    tensors: dict[str, torch.Tensor],
    out_features: int,
    in_features: int,
    x: torch.Tensor,
    header: Header | None = None,
) -> torch.Tensor:
    """``x W^T`` for many tokens: stripes of rows de-quantized, each multiplied by torch."""
    groups = bit_groups(tensors, out_features, header)
    step = stripe_rows(in_features, STRIPE_FLOATS, BLOCK_ROWS)

    def dequantize(first: int, stop: int) -> torch.Tensor:
        return dequantize_stripe(tensors, groups, in_features, (first, stop))

    return matmul_by_stripes(out_features, x, dequantize, step)


def triton_linear(
    tensors: dict[str, torch.Tensor],
    out_features: int,
    in_features: int,
    x: torch.Tensor,
    header: Header | None = None,
) -> torch.Tensor:
    """``x W^T`` (float32 ``[t, out]``) for float32 contiguous ``x`` ``[t, in]``, from a
    column-layout layer's tensors (with ``outlier_base`` where it has outliers); ``header``
    as for :func:`bit_groups`."""
    if x.shape[0] <= DECODE_TOKENS:
        return decode(tensors, out_features, in_features, x, header)
    return prefill(tensors, out_features, in_features, x, header)
