"""Reading a layer's weights from its stored tensors: stripes and single positions."""

import pytest
import torch

from cmpq.format.layer import dequantize_layer, dequantize_rows, table_values_at, to_tensors

from tiny import random_layer


@pytest.mark.parametrize("layout", ["row", "column"])
@pytest.mark.parametrize("widths", [[1], [3], [8], [1, 2, 5, 8]])
def test_stripes_and_positions_match_the_whole_weight(layout, widths):
    layer = random_layer(21, 19, widths, layout=layout, outliers=7)
    tensors = to_tensors(layer)
    weight = dequantize_layer(layer)
    assert torch.equal(dequantize_rows(tensors, 21, 19, layout, (0, 21)), weight)
    assert torch.equal(dequantize_rows(tensors, 21, 19, layout, (8, 16)), weight[8:16])
    plain = dequantize_rows(tensors, 21, 19, layout, (0, 21), outliers=False)
    rows, cols = torch.meshgrid(torch.arange(21), torch.arange(19), indexing="ij")
    values = table_values_at(tensors, 21, layout, rows.flatten(), cols.flatten())
    assert torch.equal(values.view(21, 19), plain)
    changed = plain != weight  # exactly the outliers differ
    assert changed.sum() <= 7 and torch.equal(
        weight[layer.outlier_rows, layer.outlier_cols], layer.outlier_values.float()
    )
    with pytest.raises(ValueError, match="multiple of 8"):
        dequantize_rows(tensors, 21, 19, layout, (3, 9))
