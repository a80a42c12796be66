"""The load-time checks, one at a time: what the writer stores passes, and each
kind of damage is refused with one line naming the tensor or field."""

import math

import pytest
import torch
from torch import nn

from cmpq.alloc.paper import paper_allocation
from cmpq.errors import CmpqError
from cmpq.format.cost import stored_bits
from cmpq.format.description import check_description
from cmpq.format.layer import to_tensors
from cmpq.format.validate import (
    LinearTarget,
    check_layer_tensors,
    check_target,
    check_totals,
    check_unquantized,
)
from cmpq.quant.report import QuantizationReport
from cmpq.quant.tables import quantize_layer

NAME = "model.layers.0.mlp.up_proj"
OUT, IN = 12, 20


def _tensors(layout="column", outliers=True, code_bits=2.5):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(OUT, IN, generator=generator)
    energy = torch.rand(IN, generator=generator) + 0.1
    layer = quantize_layer(
        weight,
        paper_allocation(energy, code_bits),
        energy,
        layout=layout,
        act_outliers=2 if outliers else 0,
        q_outliers=4 if outliers else 0,
        iters=3,
    )
    return to_tensors(layer)


def _check(tensors, layout="column", out=OUT, inp=IN):
    check_layer_tensors(NAME, tensors, out, inp, layout)


@pytest.mark.parametrize("layout", ["row", "column"])
@pytest.mark.parametrize("outliers", [True, False])
@pytest.mark.parametrize("code_bits", [1.0, 2.5, 8.0])
def test_what_the_writer_stores_passes(layout, outliers, code_bits):
    _check(_tensors(layout, outliers, code_bits), layout)


def test_wide_layers_use_int32_indices_and_pass():
    in_features = 2**15 + 1  # past int16
    layer = quantize_layer(
        torch.randn(1, in_features, generator=torch.Generator().manual_seed(0)),
        torch.ones(in_features, dtype=torch.int64),
        torch.ones(in_features),
        act_outliers=1,
        iters=1,
    )
    tensors = to_tensors(layer)
    assert tensors["outlier_cols"].dtype == torch.int32
    check_layer_tensors(NAME, tensors, 1, in_features, "row")
    tensors["outlier_cols"] = tensors["outlier_cols"].to(torch.int16)  # wraps past 32767
    expected = r"outlier_cols: expected dtype torch\.int32, found torch\.int16"
    with pytest.raises(CmpqError, match=expected):
        check_layer_tensors(NAME, tensors, 1, in_features, "row")


def _set(tensors, key, index, value):
    tensors[key] = tensors[key].clone()
    tensors[key][index] = value


def _damage_groups_moved(t):
    _set(t, "column_groups", 0, int(t["column_groups"][0]) ^ 1)  # column 0 to the other group


def _damage_groups_length(t):
    t["column_groups"] = t["column_groups"][:-1]


def _damage_bits_zero(t):
    _set(t, "group_bits", 0, 0)


def _damage_bits_nine(t):
    _set(t, "group_bits", 1, 9)


def _damage_sizes_sum(t):
    _set(t, "group_sizes", 0, int(t["group_sizes"][0]) + 1)


def _damage_sizes_negative(t):
    _set(t, "group_sizes", 0, -1)


def _damage_group_count(t):
    t["group_sizes"] = t["group_sizes"][:1]


def _damage_codes_length(t):
    t["codes"] = torch.cat([t["codes"], t["codes"][:1]])


def _damage_lut_length(t):
    t["lut"] = t["lut"][:-1]


def _damage_lut_nan(t):
    _set(t, "lut", 5, math.nan)


def _damage_lut_inf(t):
    _set(t, "lut", 0, -math.inf)


def _damage_dtype(t):
    t["group_sizes"] = t["group_sizes"].long()


def _damage_shape(t):
    t["lut"] = t["lut"].reshape(2, -1)


def _damage_missing(t):
    del t["column_groups"]


def _damage_partial_outliers(t):
    del t["outlier_values"]


def _damage_counts_more(t):
    _set(t, "outlier_counts", 0, int(t["outlier_counts"][0]) + 1)


def _damage_counts_fewer(t):
    row = int(t["outlier_counts"].argmax())
    _set(t, "outlier_counts", row, int(t["outlier_counts"][row]) - 1)


def _damage_counts_length(t):
    t["outlier_counts"] = t["outlier_counts"][:-1]


def _damage_counts_dtype(t):
    t["outlier_counts"] = t["outlier_counts"].to(torch.int32)


def _damage_cols_range(t):
    _set(t, "outlier_cols", 0, -1)


def _damage_cols_repeated(t):
    # two outliers in one row at one column: which value wins would be arbitrary
    t["outlier_counts"] = torch.tensor([2] + [0] * (OUT - 1), dtype=torch.uint8)
    t["outlier_cols"] = torch.tensor([4, 4], dtype=t["outlier_cols"].dtype)
    t["outlier_values"] = torch.ones(2, dtype=torch.float16)


def _damage_outlier_nan(t):
    _set(t, "outlier_values", 0, math.nan)


DAMAGE = [
    (_damage_groups_moved, r"column_groups: expected group sizes \[\d+, \d+\], found \[\d+, \d+\]"),
    (_damage_groups_length, r"column_groups: expected 3 bytes \(20 columns of 1 bits\), found 2"),
    (_damage_bits_zero, r"group_bits: expected widths in 1\.\.8, found 0"),
    (_damage_bits_nine, r"group_bits: expected widths in 1\.\.8, found 9"),
    (_damage_sizes_sum, r"group_sizes: expected sizes summing to in_features 20, found 21"),
    (_damage_sizes_negative, r"group_sizes: expected no negative size, found -1"),
    (_damage_group_count, r"group_sizes: expected one size per width \(2 in group_bits\), found 1"),
    (_damage_codes_length, r"codes: expected \d+ bytes for widths \[2, 3\]"),
    (_damage_lut_length, r"lut: expected \d+ entries for widths \[2, 3\]"),
    (_damage_lut_nan, r"lut: expected finite values, found nan at 5"),
    (_damage_lut_inf, r"lut: expected finite values, found -inf at 0"),
    (_damage_dtype, r"group_sizes: expected dtype torch\.int32, found torch\.int64"),
    (_damage_shape, r"lut: expected a 1-D tensor, found shape \[2, \d+\]"),
    (_damage_missing, r"column_groups: missing from the weights file"),
    (_damage_partial_outliers, r"outlier_values: missing, but .*outlier_counts is stored"),
    (_damage_counts_more, r"outlier_cols: expected \d+ entries \(outlier_counts add up to \d+\)"),
    (_damage_counts_fewer, r"outlier_cols: expected \d+ entries \(outlier_counts add up to \d+\)"),
    (_damage_counts_length, r"outlier_counts: expected 12 entries \(out_features\), found 11"),
    (_damage_counts_dtype, r"outlier_counts: expected dtype torch\.uint8, found torch\.int32"),
    (_damage_cols_range, r"outlier_cols: expected indices in 0\.\.19, found -1 at 0"),
    (_damage_cols_repeated, r"outlier_cols: expected increasing columns within a row, found 4"),
    (_damage_outlier_nan, r"outlier_values: expected finite values, found nan at 0"),
]


@pytest.mark.parametrize(("damage", "message"), DAMAGE, ids=[d.__name__[8:] for d, _ in DAMAGE])
def test_damaged_layer_is_refused_naming_the_tensor(damage, message):
    tensors = _tensors()
    damage(tensors)
    with pytest.raises(CmpqError, match=f"^{NAME}\\.{message}") as caught:
        _check(tensors)
    assert "\n" not in str(caught.value)


def test_flipped_layout_is_refused_by_the_table_count():
    with pytest.raises(CmpqError, match=r"lut: expected \d+ entries .* row tables"):
        _check(_tensors("column"), "row")


def test_shape_that_does_not_fit_the_codes_is_refused():
    with pytest.raises(CmpqError, match="codes: expected"):
        _check(_tensors(), out=OUT + 8)  # one more tile of rows
    with pytest.raises(CmpqError, match="outlier_counts: expected"):
        _check(_tensors(), out=OUT + 1)  # same tiles: the row counts tell
    with pytest.raises(CmpqError, match="group_sizes: expected sizes summing to in_features 21"):
        _check(_tensors(), inp=IN + 1)


# --- cmpq.json ------------------------------------------------------------------


def _description():
    return {
        "format_version": 2,
        "format": "packed",
        "config": {"layout": "column"},
        "layers": {
            NAME: {"out_features": OUT, "in_features": IN, "layout": "column", "bias": False}
        },
    }


def test_written_description_passes():
    check_description(_description(), 2)
    check_description({"format_version": 1, "format": "dequantized", "layers": 14}, 2)


def _edit(path, value):
    description = _description()
    target = description
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return description


_DELETE = object()
ENTRY = ("layers", NAME)
DESCRIPTION_DAMAGE = [
    (("format_version",), 3, r"format version 3 is newer than this cmpq reads .*: upgrade cmpq"),
    (("format_version",), 0, "format_version must be a positive integer, found 0"),
    (("format_version",), True, "format_version must be a positive integer, found True"),
    (("format_version",), "2", "format_version must be a positive integer, found '2'"),
    (("format_version",), _DELETE, "format_version must be a positive integer, found None"),
    (("format",), "rtn", "format must be one of packed, dequantized, found 'rtn'"),
    (("format",), "dequantized", "format is 'dequantized' but layers lists packed layers"),
    (("layers",), {}, "layers must map every quantized layer to its shape, found none"),
    (("layers",), [NAME], "layers must map every quantized layer to its shape"),
    ((*ENTRY,), [OUT, IN], f"{NAME}: expected an object with the layer's shape"),
    ((*ENTRY, "out_features"), 0, f"{NAME}: out_features must be a positive integer, found 0"),
    ((*ENTRY, "in_features"), "20", f"{NAME}: in_features must be a positive integer, found '20'"),
    ((*ENTRY, "in_features"), 20.0, f"{NAME}: in_features must be a positive integer, found 20.0"),
    ((*ENTRY, "layout"), "diag", f"{NAME}: layout must be one of row, column, found 'diag'"),
    ((*ENTRY, "layout"), "row", f"{NAME}: layout 'row' differs from config.layout 'column'"),
    ((*ENTRY, "bias"), 1, f"{NAME}: bias must be true or false, found 1"),
]


@pytest.mark.parametrize(("path", "value", "message"), DESCRIPTION_DAMAGE)
def test_damaged_description_is_refused(path, value, message):
    with pytest.raises(CmpqError, match=f"^{message}"):
        check_description(_edit(path, value), 2)


def test_description_must_be_an_object():
    with pytest.raises(CmpqError, match="expected a JSON object, found list"):
        check_description([1, 2], 2)


# --- declared totals ---------------------------------------------------------------


def _with_totals(tensors):
    report = QuantizationReport(method="cmpq", config={})
    report.add_layer(OUT * IN, stored_bits(tensors))
    return {**report.stored_dict(), **_description()}


def test_totals_of_the_stored_tensors_pass():
    tensors = _tensors()
    check_totals(_with_totals(tensors), {NAME: tensors})


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("effective_bits", lambda v: v + 0.01),
        ("effective_bits", lambda v: str(v)),
        ("quantized_params", lambda v: v + 1),
        ("quantized_params", lambda v: float(v)),
        ("stored_bytes", lambda v: v - 1),
        ("bits_breakdown", lambda v: {**v, "lut": v["lut"] / 2}),
        ("bits_breakdown", lambda v: {k: x for k, x in v.items() if k != "outliers"}),
    ],
)
def test_hand_edited_totals_are_refused(field, change):
    tensors = _tensors()
    description = _with_totals(tensors)
    description[field] = change(description[field])
    with pytest.raises(
        CmpqError, match=f"^the description's {field} is .* but the stored tensors hold"
    ):
        check_totals(description, {NAME: tensors})


def test_totals_agree_within_float_rounding():
    tensors = _tensors()
    description = _with_totals(tensors)
    description["effective_bits"] *= 1 + 1e-13
    check_totals(description, {NAME: tensors})


def test_totals_count_what_is_stored_not_what_is_declared():
    tensors, other = _tensors(code_bits=2.5), _tensors(code_bits=3.5)
    with pytest.raises(CmpqError, match="effective_bits"):  # tensors swapped in from another run
        check_totals(_with_totals(tensors), {NAME: other})


# --- the model the config builds ---------------------------------------------------


def test_target_must_be_a_linear_of_the_listed_shape_and_bias():
    entry = {"out_features": OUT, "in_features": IN, "layout": "column", "bias": True}
    check_target(NAME, entry, LinearTarget(OUT, IN, bias=True))
    with pytest.raises(CmpqError, match="not a linear layer of the model"):
        check_target(NAME, entry, None)
    with pytest.raises(
        CmpqError, match=f"the description lists {OUT}x{IN} but the model's layer is"
    ):
        check_target(NAME, entry, LinearTarget(IN, OUT, bias=True))
    with pytest.raises(CmpqError, match="lists bias true but the model's layer has no bias"):
        check_target(NAME, entry, LinearTarget(OUT, IN, bias=False))


def test_targets_are_the_models_linears_as_out_by_in():
    from transformers.pytorch_utils import Conv1D

    from cmpq.runtime.hf import linear_targets

    model = nn.ModuleDict(
        {"fc": nn.Linear(IN, OUT, bias=False), "conv": Conv1D(OUT, IN), "norm": nn.LayerNorm(IN)}
    )
    targets = linear_targets(model)
    assert targets == {
        "fc": LinearTarget(OUT, IN, bias=False),
        "conv": LinearTarget(OUT, IN, bias=True),  # GPT-2's Conv1D stores [in, out]
    }


# --- everything else in the weights file -------------------------------------------


def _model_state():
    embedding = torch.zeros(10, 4)
    return {"embed.weight": embedding, "head.weight": embedding, "norm.weight": torch.ones(4)}


def _specs(**changes):
    specs = {"embed.weight": ("F16", [10, 4]), "norm.weight": ("F16", [4])}
    specs.update(changes)
    return {key: spec for key, spec in specs.items() if spec is not None}


def test_unquantized_tensors_pass_and_tied_ones_are_stored_once():
    check_unquantized(_model_state(), _specs())
    check_unquantized(_model_state(), _specs(**{"norm.weight": ("F32", [4])}))  # fp32: exact


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"norm.weight": ("F16", [5])}, r"norm\.weight: expected shape \[4\], found \[5\]"),
        ({"norm.weight": ("I32", [4])}, r"norm\.weight: expected dtype F16 or F32, found I32"),
        ({"norm.weight": ("BF16", [4])}, r"norm\.weight: expected dtype F16 or F32, found BF16"),
        ({"norm.weight": None}, r"norm\.weight: missing from the weights file"),
        ({"embed.weight": None}, r"embed\.weight: missing from the weights file"),
        ({"extra": ("F16", [1])}, r"extra: unexpected tensor"),
    ],
)
def test_damaged_unquantized_tensors_are_refused(changes, message):
    with pytest.raises(CmpqError, match=f"^{message}"):
        check_unquantized(_model_state(), _specs(**changes))
