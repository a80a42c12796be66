"""Round-to-nearest (RTN) quantization: the baseline every method is compared with.

Asymmetric min/max quantization of a ``[out, in]`` weight, per output channel
(one group spanning the row) or in groups of ``group_size`` consecutive input
channels. When the group size does not divide the width, the last group of a
row is shorter. Each group stores a scale and a minimum in fp16, and the codes
are computed against those fp16 values so that what is stored is exactly what
is de-quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import check_rtn_options

SCALE_BITS = 16  # fp16 scale
MIN_VALUE_BITS = 16  # fp16 minimum ("zero point")


@dataclass(frozen=True)
class RTNQuantized:
    codes: torch.Tensor  # [out, in] uint8
    scales: torch.Tensor  # [out, groups] fp16
    minimums: torch.Tensor  # [out, groups] fp16
    bits: int
    group_size: int  # columns per group; equals `in` for per-channel


def _pad_to_groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Reshape to ``[out, groups, group_size]``; the padding of a short last group
    repeats its last real value so it never widens the group's min/max range."""
    out_features, in_features = weight.shape
    groups = -(-in_features // group_size)
    pad = groups * group_size - in_features
    if pad:
        weight = torch.cat([weight, weight[:, -1:].expand(out_features, pad)], dim=1)
    return weight.reshape(out_features, groups, group_size)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int | None) -> RTNQuantized:
    """Quantize an ``[out, in]`` weight; ``group_size=None`` means per output channel."""
    check_rtn_options(bits, group_size)
    out_features, in_features = weight.shape
    size = in_features if group_size is None else min(group_size, in_features)
    grouped = _pad_to_groups(weight.float(), size)
    levels = 2**bits - 1
    minimums = grouped.amin(dim=2).half()
    scales = ((grouped.amax(dim=2) - minimums.float()) / levels).clamp_min(1e-8).half()
    scale, low = scales.float().unsqueeze(2), minimums.float().unsqueeze(2)
    codes = torch.round((grouped - low) / scale).clamp(0, levels).to(torch.uint8)
    codes = codes.reshape(out_features, -1)[:, :in_features]
    return RTNQuantized(codes, scales, minimums, int(bits), size)


def rtn_dequantize(quantized: RTNQuantized) -> torch.Tensor:
    out_features, in_features = quantized.codes.shape
    group_of_column = torch.arange(in_features) // quantized.group_size
    scale = quantized.scales.float()[:, group_of_column]
    low = quantized.minimums.float()[:, group_of_column]
    return quantized.codes.float() * scale + low


def rtn_stored_bits(out_features: int, in_features: int, bits: int, group_size: int | None) -> dict:
    """Stored bits of one RTN layer, by kind: codes and per-group scale + minimum."""
    size = in_features if group_size is None else min(group_size, in_features)
    groups = -(-in_features // size)
    return {
        "codes": out_features * in_features * bits,
        "scales": out_features * groups * (SCALE_BITS + MIN_VALUE_BITS),
    }
