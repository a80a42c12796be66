import pytest
import torch

from cmpq.alloc.paper import paper_allocation
from cmpq.format.cost import LayerShape, layer_cost, stored_bits
from cmpq.format.layer import dequantize_layer, from_tensors, groups_of, to_tensors
from cmpq.quant.pipeline import column_square_sums
from cmpq.quant.tables import quantize_layer
from cmpq.runtime.qlinear import QuantizedLinear


def _problem(out=48, inp=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=generator)
    energy = torch.rand(inp, generator=generator) ** 4 * 10 + 1e-3
    return weight, energy


@pytest.mark.parametrize("layout", ["row", "column"])
@pytest.mark.parametrize("code_bits", [1.0, 2.0, 2.3, 3.5, 8.0])
def test_stored_bytes_equal_accounted_bits(layout, code_bits):
    weight, energy = _problem()
    bits = paper_allocation(energy, code_bits)
    layer = quantize_layer(weight, bits, energy, layout=layout, act_outliers=3, q_outliers=9)
    widths, sizes = groups_of(bits)
    accounted = layer_cost(LayerShape(48, 40), widths, sizes, layout, outliers=12)
    assert stored_bits(to_tensors(layer)) == accounted


@pytest.mark.parametrize("layout", ["row", "column"])
def test_round_trip_through_stored_tensors(layout):
    weight, energy = _problem()
    layer = quantize_layer(
        weight, paper_allocation(energy, 2.5), energy, layout=layout, act_outliers=2, q_outliers=5
    )
    rebuilt = from_tensors(to_tensors(layer), 48, 40, layout)
    assert torch.equal(dequantize_layer(rebuilt), dequantize_layer(layer))


def test_each_channel_uses_at_most_its_table_size():
    weight, energy = _problem()
    bits = paper_allocation(energy, 2.5)
    restored = dequantize_layer(quantize_layer(weight, bits, energy))
    for row in range(48):  # row layout: a row's channels of one width share 2**b values
        for width in (2, 3):
            values = restored[row, bits == width].unique()
            assert values.numel() <= 2**width


def test_outliers_are_exact_and_counted():
    weight, energy = _problem()
    weight[5, 7] = 50.0  # a huge weight on a channel
    layer = quantize_layer(
        weight, paper_allocation(energy, 2.0), energy, act_outliers=4, q_outliers=6
    )
    assert layer.outlier_values.numel() == 10
    restored = dequantize_layer(layer)
    rows, cols = layer.outlier_rows, layer.outlier_cols
    torch.testing.assert_close(restored[rows, cols], weight[rows, cols].half().float())
    assert (5, 7) in set(zip(rows.tolist(), cols.tolist(), strict=True))


def test_quantization_sensitive_outliers_cut_the_weighted_error():
    weight, energy = _problem(seed=3)
    bits = paper_allocation(energy, 2.0)

    def weighted_error(**outliers):
        restored = dequantize_layer(quantize_layer(weight, bits, energy, **outliers))
        return ((restored - weight) ** 2 * energy).sum()

    assert weighted_error(q_outliers=40) < 0.9 * weighted_error()


def test_more_bits_less_error_and_weighting_helps_heavy_channels():
    weight, energy = _problem(seed=1)

    def weighted_error(code_bits, weighting):
        restored = dequantize_layer(
            quantize_layer(weight, paper_allocation(energy, code_bits), weighting)
        )
        return ((restored - weight) ** 2 * energy).sum()

    # integer widths only: a mixed row has two tables (4 + 8 entries at 2.5 bits), which can
    # beat one 8-entry table; its extra cost is in the table bits, not the code bits
    errors = [weighted_error(b, energy) for b in (1.0, 2.0, 3.0, 4.0)]
    assert errors == sorted(errors, reverse=True)
    assert weighted_error(2.5, energy) < errors[1]
    assert weighted_error(2.0, energy) < weighted_error(2.0, torch.ones(40))


@pytest.mark.parametrize("bias", [False, True])
def test_quantized_linear_equals_dense_dequantized(bias):
    weight, energy = _problem()
    layer = quantize_layer(weight, paper_allocation(energy, 3.3), energy, q_outliers=5)
    bias_tensor = torch.randn(48, generator=torch.Generator().manual_seed(1)) if bias else None
    module = QuantizedLinear.from_layer(layer, bias_tensor)
    dense = torch.nn.Linear(40, 48, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(dequantize_layer(layer))
        if bias:
            dense.bias.copy_(bias_tensor)
    x = torch.randn(5, 7, 40, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(module(x), dense(x))
    state = module.state_dict()
    assert sum(t.numel() * t.element_size() for n, t in state.items() if n != "bias") * 8 == sum(
        stored_bits(module.stored_tensors()).values()
    )


@pytest.mark.parametrize("shape", [(7, 5), (33, 1030), (64, 2100)])
def test_column_square_sums_in_blocks_equal_one_sum(shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    expected = weight.double().square().sum(0)
    assert torch.equal(column_square_sums(weight), expected)
