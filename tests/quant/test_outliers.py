import pytest
import torch

from cmpq.format.layer import LUTLayer, to_tensors
from cmpq.format.spec import MAX_OUTLIERS_PER_ROW
from cmpq.quant.outliers import top_entries


def _greedy(score, count, exclude, row_limit):
    """Scores largest first, each taken while its row has room: the best capped choice."""
    score = score.clone()
    taken = [0] * score.shape[0]
    if exclude is not None:
        score[exclude] = float("-inf")
        taken = exclude.sum(1).tolist()
    mask = torch.zeros(score.shape, dtype=torch.bool)
    for index in torch.argsort(score.flatten(), descending=True).tolist():
        row, col = divmod(index, score.shape[1])
        if int(mask.sum()) == count or score[row, col] == float("-inf"):
            break
        if taken[row] < row_limit:
            mask[row, col], taken[row] = True, taken[row] + 1
    return mask


@pytest.mark.parametrize("seed", range(40))
def test_top_entries_is_the_best_choice_within_the_row_limit(seed):
    generator = torch.Generator().manual_seed(seed)
    rows, cols = torch.randint(1, 8, (2,), generator=generator).tolist()
    # rows of very different scales, so the limit binds in some of them
    score = torch.randn(rows, cols, generator=generator) * torch.rand(rows, 1, generator=generator)
    row_limit = int(torch.randint(1, cols + 2, (1,), generator=generator))
    exclude = None
    if seed % 2:
        exclude = top_entries(score.clone(), (rows * cols) // 3, None, row_limit)
    count = int(torch.randint(0, rows * cols + 2, (1,), generator=generator))
    chosen = top_entries(score.clone(), count, exclude, row_limit)
    assert torch.equal(chosen, _greedy(score, count, exclude, row_limit))
    together = chosen | exclude if exclude is not None else chosen
    assert int(together.sum(1).max()) <= row_limit


def test_one_heavy_row_gets_the_limit_and_the_rest_goes_elsewhere():
    score = torch.rand(4, 10)
    score[2] += 100.0  # every entry of row 2 beats every other
    chosen = top_entries(score.clone(), 7, None, row_limit=3)
    assert chosen.sum(1).tolist()[2] == 3
    assert int(chosen.sum()) == 7  # the other four from the other rows


def test_a_row_over_the_stored_limit_is_refused_by_the_writer():
    out_features, in_features = 2, MAX_OUTLIERS_PER_ROW + 2
    full_row = torch.arange(MAX_OUTLIERS_PER_ROW + 1)
    layer = LUTLayer(
        out_features,
        in_features,
        "column",
        [1],
        [in_features],
        torch.arange(in_features),
        [torch.zeros(out_features, in_features, dtype=torch.uint8)],
        [torch.zeros(in_features, 2).half()],
        torch.zeros_like(full_row),
        full_row,
        torch.ones(full_row.numel()).half(),
    )
    with pytest.raises(ValueError, match=f"row 0 holds {MAX_OUTLIERS_PER_ROW + 1} outliers"):
        to_tensors(layer)
