"""The Triton kernels (run by Triton's CPU interpreter) against the float64 reference."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it before triton is imported
    pytest.skip("needs TRITON_INTERPRET=1 from the start", allow_module_level=True)

from cmpq.format.layer import (  # noqa: E402
    LUTLayer,
    dequantize_rows,
    row_pointers,
    storage_order,
    stored_permutation,
    to_tensors,
)
from cmpq.runtime import triton_kernels  # noqa: E402
from cmpq.runtime.triton_kernels import DECODE_TOKENS, triton_linear  # noqa: E402

WIDTHS = [[b] for b in range(1, 9)] + [list(range(1, 9))]
PREFILL_TOKENS = DECODE_TOKENS + 1


def random_tensors(out_features, in_features, widths, outliers):
    """A random column-layout layer's stored tensors (with the kernels' ``perm``,
    ``outlier_base`` and ``outlier_crow``) and its weight."""
    bits = torch.tensor([widths[i % len(widths)] for i in range(in_features)])
    group_bits, group_sizes, perm, _ = storage_order(bits)
    codes = [
        torch.randint(0, 2**b, (out_features, n), dtype=torch.uint8)
        for b, n in zip(group_bits, group_sizes, strict=True)
    ]
    luts = [torch.randn(n, 2**b).half() for b, n in zip(group_bits, group_sizes, strict=True)]
    index = torch.randperm(out_features * in_features)[:outliers].sort().values
    rows, cols = index // in_features, index % in_features
    values = torch.randn(outliers).half()
    layer = LUTLayer(
        out_features,
        in_features,
        "column",
        group_bits,
        group_sizes,
        perm,
        codes,
        luts,
        rows,
        cols,
        values,
    )
    tensors = to_tensors(layer)
    tensors["perm"] = stored_permutation(tensors).to(torch.int16)
    whole = (0, out_features)
    weight = dequantize_rows(tensors, out_features, in_features, "column", whole)
    if outliers:
        plain = dequantize_rows(tensors, out_features, in_features, "column", whole, False)
        tensors["outlier_base"] = plain[rows, cols].half()
        tensors["outlier_crow"] = row_pointers(tensors["outlier_counts"])
    return tensors, weight


def assert_matches_reference(out_features, in_features, widths, outliers, tokens):
    tensors, weight = random_tensors(out_features, in_features, widths, outliers)
    x = torch.randn(tokens, in_features)
    reference = x.double() @ weight.double().T
    y = triton_linear(tensors, out_features, in_features, x)
    assert y.shape == (tokens, out_features) and y.dtype == torch.float32
    error = (y.double() - reference).abs().max().item()
    assert error < 1e-4 * reference.abs().max().item(), (widths, outliers, tokens, error)


@pytest.mark.parametrize("widths", WIDTHS, ids=str)
@pytest.mark.parametrize("outliers", [0, 9])
@pytest.mark.parametrize("tokens", [1, 3, PREFILL_TOKENS])
def test_every_width_matches_reference(widths, outliers, tokens):
    assert_matches_reference(13, 11, widths, outliers, tokens)


@pytest.mark.parametrize("outliers", [0, 40])
@pytest.mark.parametrize("tokens", [1, 3, PREFILL_TOKENS])
def test_mixed_widths_odd_shape_matches_reference(outliers, tokens):
    assert_matches_reference(37, 29, list(range(1, 9)), outliers, tokens)


def test_prefill_by_several_stripes(monkeypatch):
    monkeypatch.setattr(triton_kernels, "STRIPE_FLOATS", 1)  # one block of rows per stripe
    assert_matches_reference(37, 29, list(range(1, 9)), 40, PREFILL_TOKENS)
