"""Checks of a checkpoint's description and stored tensors before any module is built.

A truncated, corrupted or hand-edited checkpoint must fail at load time with
one line naming what is wrong: it must never load as a silently different
model, nor fail later inside a gather, far from the file that caused it (a
quantized layer is de-quantized lazily, at its first forward). Every check but
:func:`read_checked_layers` takes plain values (the parsed description,
tensors, shapes) and either returns or raises :class:`CmpqError`;
:func:`read_checked_layers` runs them over an open safetensors file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import CmpqError
from .cost import LayerShape, StoredTotals, layer_cost, stored_bits
from .description import is_json_int
from .layer import unpack_column_groups
from .packing import packed_nbytes
from .spec import (
    FLOAT_STORAGE,
    LUT_ENTRY_BITS,
    MAX_CODE_BITS,
    MIN_CODE_BITS,
    OUTLIER_NAMES,
    REQUIRED_NAMES,
    STORED_NAMES,
    group_index_bits,
    stored_dtypes,
)

# The totals of the description that the stored tensors determine (StoredTotals.totals_dict()).
TOTAL_FIELDS = ("effective_bits", "bits_breakdown", "quantized_params", "stored_bytes")


@dataclass(frozen=True)
class LinearTarget:
    """What the model built from ``config.json`` has where a quantized layer is listed."""

    out_features: int
    in_features: int
    bias: bool


def check_target(name: str, entry: dict, target: LinearTarget | None) -> None:
    """The listed layer is a linear of the model ``config.json`` builds (``target``,
    ``None`` when it is not), of the listed shape and bias, so the tensors checked
    against the entry fit the model."""
    if target is None:
        raise CmpqError(f"{name}: listed in the description but not a linear layer of the model")
    found = (target.out_features, target.in_features)
    listed = (entry["out_features"], entry["in_features"])
    if found != listed:
        raise CmpqError(
            f"{name}: the description lists {listed[0]}x{listed[1]} but the model's layer is "
            f"{found[0]}x{found[1]}"
        )
    if target.bias != entry["bias"]:
        raise CmpqError(
            f"{name}: the description lists bias {str(entry['bias']).lower()} but the model's "
            f"layer {'has' if target.bias else 'has no'} bias"
        )


def check_layer_tensors(
    name: str,
    tensors: Mapping[str, torch.Tensor],
    out_features: int,
    in_features: int,
    layout: str,
) -> None:
    """One quantized layer's stored tensors (``cmpq.format.layer.to_tensors``) against its shape.

    Afterwards every gather and scatter of ``from_tensors`` and
    ``dequantize_layer`` stays in range and every table entry is finite.
    """
    _check_present(name, tensors)
    dtypes = stored_dtypes(in_features)
    for key, tensor in tensors.items():
        if tensor.dtype != dtypes[key]:
            raise CmpqError(f"{name}.{key}: expected dtype {dtypes[key]}, found {tensor.dtype}")
        if tensor.dim() != 1:
            shape = list(tensor.shape)
            raise CmpqError(f"{name}.{key}: expected a 1-D tensor, found shape {shape}")
    bits, sizes = _check_groups(name, tensors["group_bits"], tensors["group_sizes"], in_features)
    cost = layer_cost(LayerShape(out_features, in_features), bits, sizes, layout, 0)
    groups = f"for widths {bits}, sizes {sizes}, {out_features} rows, {layout} tables"
    _check_length(f"{name}.codes", tensors["codes"], cost["codes"] // 8, f"bytes {groups}")
    _check_length(f"{name}.lut", tensors["lut"], cost["lut"] // LUT_ENTRY_BITS, f"entries {groups}")
    _check_finite(f"{name}.lut", tensors["lut"])
    _check_column_groups(name, tensors["column_groups"], sizes, in_features)
    if OUTLIER_NAMES[0] in tensors:
        _check_outliers(name, tensors, out_features, in_features)


def _check_present(name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    missing = [key for key in REQUIRED_NAMES if key not in tensors]
    if missing:
        raise CmpqError(f"{name}.{missing[0]}: missing from the weights file")
    present = [key for key in OUTLIER_NAMES if key in tensors]
    if present and len(present) < len(OUTLIER_NAMES):
        absent = next(key for key in OUTLIER_NAMES if key not in tensors)
        raise CmpqError(f"{name}.{absent}: missing, but {name}.{present[0]} is stored")


def _check_groups(
    name: str, group_bits: torch.Tensor, group_sizes: torch.Tensor, in_features: int
) -> tuple[list[int], list[int]]:
    """The bit-groups' widths and sizes, checked: one size per width, widths 1..8,
    sizes non-negative and covering every input column."""
    bits, sizes = group_bits.tolist(), group_sizes.tolist()
    if len(bits) != len(sizes):
        raise CmpqError(
            f"{name}.group_sizes: expected one size per width ({len(bits)} in group_bits), "
            f"found {len(sizes)}"
        )
    wrong = [b for b in bits if not MIN_CODE_BITS <= b <= MAX_CODE_BITS]
    if wrong:
        raise CmpqError(
            f"{name}.group_bits: expected widths in {MIN_CODE_BITS}..{MAX_CODE_BITS}, "
            f"found {wrong[0]}"
        )
    if any(size < 0 for size in sizes):
        raise CmpqError(f"{name}.group_sizes: expected no negative size, found {min(sizes)}")
    if sum(sizes) != in_features:
        raise CmpqError(
            f"{name}.group_sizes: expected sizes summing to in_features {in_features}, "
            f"found {sum(sizes)}"
        )
    return bits, sizes


def _check_length(label: str, tensor: torch.Tensor, expected: int, unit: str = "entries") -> None:
    if tensor.numel() != expected:
        raise CmpqError(f"{label}: expected {expected} {unit}, found {tensor.numel()}")


def _check_finite(label: str, values: torch.Tensor) -> None:
    """A non-finite table entry or outlier would be a silently broken model."""
    bad = (~torch.isfinite(values)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise CmpqError(f"{label}: expected finite values, found {float(values[i])} at {i}")


def _check_indices(label: str, indices: torch.Tensor, count: int) -> None:
    """Every index lies in ``0..count-1`` (what a gather or scatter over ``count`` needs)."""
    values = indices.long()
    bad = ((values < 0) | (values >= count)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise CmpqError(
            f"{label}: expected indices in 0..{count - 1}, found {int(values[i])} at {i}"
        )


def _check_column_groups(
    name: str, packed: torch.Tensor, sizes: list[int], in_features: int
) -> None:
    """Each column's group index: the right number of bytes, indices below the group
    count, and as many columns in each group as ``group_sizes`` says."""
    label, width = f"{name}.column_groups", group_index_bits(len(sizes))
    need = packed_nbytes(in_features, width)
    _check_length(label, packed, need, f"bytes ({in_features} columns of {width} bits)")
    groups = unpack_column_groups(packed, len(sizes), in_features)
    _check_indices(label, groups, len(sizes))
    counts = torch.bincount(groups, minlength=len(sizes)).tolist()
    if counts != sizes:
        raise CmpqError(f"{label}: expected group sizes {sizes}, found {counts}")


def _check_outliers(
    name: str, tensors: Mapping[str, torch.Tensor], out_features: int, in_features: int
) -> None:
    """Outliers by row: one count per row (the entries are stored row after row),
    as many columns and values as the counts add up to; columns in range and
    strictly increasing within a row (one value per entry)."""
    row_counts, cols, values = (tensors[key] for key in OUTLIER_NAMES)
    _check_length(f"{name}.outlier_counts", row_counts, out_features, "entries (out_features)")
    counts = row_counts.long()
    stored = int(counts.sum())
    total = f"entries (outlier_counts add up to {stored})"
    _check_length(f"{name}.outlier_cols", cols, stored, total)
    _check_length(f"{name}.outlier_values", values, stored, total)
    _check_indices(f"{name}.outlier_cols", cols, in_features)
    rows = torch.repeat_interleave(torch.arange(out_features), counts)
    columns = cols.long()
    unsorted = ((rows[1:] == rows[:-1]) & (columns[1:] <= columns[:-1])).nonzero()
    if unsorted.numel():
        i = int(unsorted[0]) + 1
        raise CmpqError(
            f"{name}.outlier_cols: expected increasing columns within a row, found "
            f"{int(columns[i])} after {int(columns[i - 1])} in row {int(rows[i])}"
        )
    _check_finite(f"{name}.outlier_values", values)


def check_totals(description: dict, stored: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """The bit totals the description declares are what the stored tensors hold.

    They are recomputed the way the quantizer's report computed them (the same
    :class:`StoredTotals` arithmetic over :func:`stored_bits`), so a hand-edited
    total, or tensors swapped in from another run, is refused.
    """
    totals = StoredTotals()
    for name, tensors in stored.items():
        entry = description["layers"][name]
        totals.add_layer(entry["out_features"] * entry["in_features"], stored_bits(tensors))
    actual = totals.totals_dict()
    for field in TOTAL_FIELDS:
        if not _agrees(description.get(field), actual[field]):
            raise CmpqError(
                f"the description's {field} is {description.get(field)!r} but the stored tensors "
                f"hold {actual[field]!r}"
            )


def _agrees(declared: object, actual: object) -> bool:
    """Integers exactly, floats to rounding, dicts key by key."""
    if isinstance(actual, dict):
        return (
            isinstance(declared, dict)
            and declared.keys() == actual.keys()
            and all(_agrees(declared[key], actual[key]) for key in actual)
        )
    if isinstance(actual, int):
        return is_json_int(declared) and declared == actual
    return (is_json_int(declared) or isinstance(declared, float)) and math.isclose(
        declared, actual, rel_tol=1e-9
    )


def check_unquantized(
    expected: Mapping[str, torch.Tensor],
    stored: Mapping[str, tuple[str, list[int]]],
    tied: Mapping[str, str] | None = None,
) -> None:
    """The weights file's other tensors against the model's state dict.

    ``expected`` is ``model.state_dict(keep_vars=True)``: the parameter objects,
    so tied names are one object on any device (on the meta device storage
    addresses tell nothing). ``stored`` maps each tensor name in the file to its
    safetensors dtype (``"F16"``) and shape. Every stored tensor must be one of
    the model's, of its shape, and a floating one must be stored as a float
    (``load_state_dict`` would silently cast integers); every model tensor must
    be stored, itself or through a tied name (tied embeddings are written once).
    ``tied`` maps tied names to their source (transformers' ``all_tied_weights_keys``),
    for models built under transformers' loader, where ties are made only after loading.
    """
    for key, (dtype, shape) in stored.items():
        tensor = expected.get(key)
        if tensor is None:
            raise CmpqError(
                f"{key}: unexpected tensor, neither a parameter of the model nor a stored "
                "tensor of a layer the description lists"
            )
        if list(tensor.shape) != list(shape):
            raise CmpqError(f"{key}: expected shape {list(tensor.shape)}, found {list(shape)}")
        if tensor.is_floating_point() and dtype not in FLOAT_STORAGE:
            raise CmpqError(f"{key}: expected dtype {' or '.join(FLOAT_STORAGE)}, found {dtype}")
    present = {id(expected[key]) for key in stored}
    partners = {}
    for target, source in (tied or {}).items():
        partners.setdefault(target, set()).add(source)
        partners.setdefault(source, set()).add(target)
    for key, tensor in expected.items():
        tied_stored = partners.get(key, set()) & stored.keys()
        if key not in stored and id(tensor) not in present and not tied_stored:
            raise CmpqError(f"{key}: missing from the weights file")


def read_checked_layers(
    handle,
    description: dict,
    targets: Mapping[str, LinearTarget],
    state: Mapping[str, torch.Tensor],
    tied: Mapping[str, str] | None = None,
) -> dict[str, dict]:
    """Read every quantized layer's tensors from the open safetensors ``handle`` and run
    all the checks against the model ``config.json`` builds (not yet loaded):
    ``targets`` are its linear layers by name, ``state`` its
    ``state_dict(keep_vars=True)``, ``tied`` its tied names (see
    :func:`check_unquantized`).

    Returns the checked tensors by layer name. Other tensors are only inspected
    (dtype and shape); transformers loads them afterwards.
    """
    layers = description["layers"]
    keys = set(handle.keys())
    stored = {}
    for name, entry in layers.items():
        check_target(name, entry, targets.get(name))
        tensors = {
            key: handle.get_tensor(f"{name}.{key}")
            for key in STORED_NAMES
            if f"{name}.{key}" in keys
        }
        shape = (entry["out_features"], entry["in_features"])
        check_layer_tensors(name, tensors, *shape, entry["layout"])
        stored[name] = tensors
    check_totals(description, stored)
    quantized = {f"{name}.{key}" for name, tensors in stored.items() for key in tensors}
    replaced = {f"{name}.weight" for name in layers}
    expected = {key: t for key, t in state.items() if key not in replaced}
    specs = {}
    for key in sorted(keys - quantized):
        tensor = handle.get_slice(key)
        specs[key] = (tensor.get_dtype(), tensor.get_shape())
    check_unquantized(expected, specs, tied)
    return stored
