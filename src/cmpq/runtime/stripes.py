"""``x W^T`` for many tokens with ``W`` made a stripe of rows at a time: the prefill of
every backend (each makes its stripes its own way), so the extra memory is one stripe."""

from __future__ import annotations

from collections.abc import Callable

import torch


def stripe_rows(in_features: int, floats: int, multiple: int) -> int:
    """Rows per stripe: a multiple of ``multiple``, about ``floats`` values, at least one
    multiple."""
    return max(multiple, floats // max(in_features, 1) // multiple * multiple)


def matmul_by_stripes(
    out_features: int,
    x: torch.Tensor,
    dequantize: Callable[[int, int], torch.Tensor],
    step: int,
) -> torch.Tensor:
    """``x @ W^T`` (``[t, out]``) with ``W`` produced ``step`` rows at a time by
    ``dequantize(first, stop) -> [stop - first, in]``."""
    parts = [
        dequantize(first, min(first + step, out_features)) @ x.t()
        for first in range(0, out_features, step)
    ]
    return torch.cat(parts).t()
