"""The CMPQ paper's allocation rule, per layer.

For average code bits ``c``, ``lo = floor(c)`` and ``hi = lo + 1``; the
``round((c - lo) * in)`` channels with the largest activation statistic get
``hi`` bits, the rest ``lo``. Every layer gets the same ``c``.
"""

from __future__ import annotations

import math

import torch

from ..format.spec import MAX_CODE_BITS


def paper_allocation(statistic: torch.Tensor, code_bits: float, mixed: bool = True) -> torch.Tensor:
    """Per-channel code widths (int64 ``[in]``) for average ``code_bits``.

    ``mixed=False`` gives every channel ``floor(code_bits)`` (the integer-only ablation).
    """
    lo = math.floor(code_bits + 1e-9)
    bits = torch.full((statistic.numel(),), lo, dtype=torch.int64)
    if not mixed or lo >= MAX_CODE_BITS:
        return bits
    high = round((code_bits - lo) * statistic.numel())
    if high:
        order = torch.argsort(statistic, descending=True, stable=True)
        bits[order[:high]] = lo + 1
    return bits


def paper_groups(in_features: int, code_bits: float, mixed: bool) -> tuple[list[int], list[int]]:
    """Group widths and sizes the paper rule gives, without needing the statistic."""
    lo = math.floor(code_bits + 1e-9)
    high = round((code_bits - lo) * in_features) if mixed and lo < MAX_CODE_BITS else 0
    pairs = [(lo, in_features - high), (lo + 1, high)]
    pairs = [(b, n) for b, n in pairs if n > 0]
    return [b for b, _ in pairs], [n for _, n in pairs]
