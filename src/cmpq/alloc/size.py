"""Byte budgets: the CMPQ bits per weight that fit a whole model into N bytes.

A packed checkpoint's ``model.safetensors`` holds the quantized linears' stored
tensors, every other parameter in fp16 (embeddings, norms, an untied lm_head,
biases), and a JSON header naming each tensor. Everything but the quantized
linears is known before quantizing, so the budget left for them, divided by
their weight count, is the total bits per weight to ask CMPQ for.
"""

from __future__ import annotations

import json
import math
import re

from torch import nn

from ..errors import CmpqError
from ..format.spec import STORED_NAMES
from ..models.graph import in_features, quantizable_linears
from .budget import MAX_TOTAL_BITS, MIN_TOTAL_BITS

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}  # fmt: skip
HEADER_FIXED_BYTES = 1024  # braces, the format metadata, padding
UNQUANTIZED_BYTES_PER_VALUE = 2  # fp16


def parse_size(text: str) -> int:
    """``"60MB"``, ``"600MiB"``, ``"1.5GB"`` or a plain byte count, as bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise CmpqError(f"`max_size` must be a size such as 60MB, 600MiB or 1.5GB (got {text!r})")
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    size = int(number * UNITS[unit])
    if size <= 0:
        raise CmpqError(f"`max_size` must be positive (got {text!r})")
    return size


def unquantized_bytes(model: nn.Module) -> int:
    """Bytes of every parameter that is not a quantized weight, stored in fp16."""
    quantized = {id(m.weight) for m in quantizable_linears(model).values()}
    return UNQUANTIZED_BYTES_PER_VALUE * sum(
        p.numel() for p in model.parameters() if id(p) not in quantized
    )


def header_bytes(model: nn.Module, max_bytes: int = 10**12) -> int:
    """An upper bound of the safetensors header of the packed checkpoint: each entry
    written as safetensors writes it (compact JSON), with the parameters' own shapes,
    and for the quantized tensors a length and offsets of ``max_bytes``'s digit count."""
    linears = quantizable_linears(model)
    quantized = {id(m.weight) for m in linears.values()}
    shapes = {n: list(p.shape) for n, p in model.named_parameters() if id(p) not in quantized}
    shapes.update({f"{n}.{s}": [max_bytes] for n in linears for s in STORED_NAMES})
    offsets = [max_bytes, max_bytes]
    entries = sum(
        len(
            json.dumps(
                {name: {"dtype": "F16", "shape": shape, "data_offsets": offsets}},
                separators=(",", ":"),
            )
        )
        for name, shape in shapes.items()
    )
    return HEADER_FIXED_BYTES + entries


def bits_for_size(model: nn.Module, max_bytes: int) -> float:
    """Total bits per weight of the decoder linears that fill ``max_bytes`` (capped at 8)."""
    fixed = unquantized_bytes(model) + header_bytes(model, max_bytes)
    params = sum(m.weight.numel() for m in quantizable_linears(model).values())
    bits = (max_bytes - fixed) * 8 / params
    if bits < MIN_TOTAL_BITS:
        smallest = fixed + MIN_TOTAL_BITS * params / 8
        raise CmpqError(
            f"`max_size` {max_bytes:,} bytes cannot hold this model: the parts kept in fp16 "
            f"(embeddings, norms, lm_head, biases) take {fixed / 1e6:.2f} MB, and the smallest "
            f"CMPQ model ({MIN_TOTAL_BITS:g} bits per weight) is {smallest / 1e6:.2f} MB"
        )
    return min(bits, MAX_TOTAL_BITS)


def estimated_packed_bytes(model: nn.Module, total_bits: float) -> int:
    """About what a CMPQ output at ``total_bits`` writes (an upper bound: the solver
    lands under ``total_bits``): ``model.safetensors`` and the float32 channel
    statistics beside it. Used to check the free space before quantizing."""
    linears = quantizable_linears(model).values()
    params = sum(m.weight.numel() for m in linears)
    statistics = 4 * sum(in_features(m) for m in linears)  # float32 per input channel
    fixed = unquantized_bytes(model) + header_bytes(model)
    return fixed + math.ceil(total_bits * params / 8) + statistics
