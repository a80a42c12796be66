import pytest
import torch

from cmpq.alloc.budget import model_cost, solve_budget
from cmpq.alloc.paper import paper_allocation, paper_groups
from cmpq.format.cost import LayerShape, layer_cost
from cmpq.format.layer import groups_of


def test_paper_rule_gives_the_top_channels_one_more_bit():
    statistic = torch.tensor([0.1, 5.0, 0.3, 9.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8])
    bits = paper_allocation(statistic, 2.2)
    assert bits.tolist() == [2, 3, 2, 3, 2, 2, 2, 2, 2, 2]  # 20 % of 10 channels
    assert paper_allocation(statistic, 3.0).tolist() == [3] * 10
    assert paper_allocation(statistic, 2.7, mixed=False).tolist() == [2] * 10


@pytest.mark.parametrize("code_bits", [1.0, 1.5, 2.0, 2.2, 2.5, 3.3, 4.0, 7.9, 8.0])
def test_groups_from_the_rule_match_the_allocation(code_bits):
    statistic = torch.rand(576, generator=torch.Generator().manual_seed(0))
    assert groups_of(paper_allocation(statistic, code_bits)) == paper_groups(576, code_bits, True)


def test_layer_cost_counts_every_kind():
    cost = layer_cost(LayerShape(4, 10), [2, 3], [8, 2], "row", outliers=3)
    assert cost["codes"] == 8 * 8 * 2 + 8 * 2 * 3  # 4 rows padded to one tile of 8
    assert cost["lut"] == 4 * (4 + 8) * 16
    assert cost["metadata"] == 2 * 8 + 2 * 40  # 10 one-bit group indices in 2 bytes
    assert cost["outliers"] == 4 * 8 + 3 * (16 + 16)  # a uint8 count per row
    column = layer_cost(LayerShape(4, 10), [2, 3], [8, 2], "column", outliers=0)
    assert column["lut"] == (8 * 4 + 2 * 8) * 16 and column["outliers"] == 0


SHAPES = [LayerShape(576, 576)] * 4 + [LayerShape(192, 576)] * 2 + [LayerShape(1536, 576)] * 2
SHAPES += [LayerShape(576, 1536), LayerShape(100, 37)]


@pytest.mark.parametrize("layout", ["row", "column"])
@pytest.mark.parametrize("target", [2.0, 2.2, 2.5, 2.77, 3.0, 3.3, 4.0, 4.5, 6.1, 8.0])
def test_budget_lands_within_a_hundredth_under_the_target(layout, target):
    budget = solve_budget(SHAPES, target, layout, outlier_fraction=0.0045)
    exact = model_cost(SHAPES, budget.code_bits, layout, budget.outlier_fraction, True)
    params = sum(s.numel for s in SHAPES)
    assert exact == budget.stored_bits
    assert target - 0.01 <= exact / params <= target
    assert budget.outlier_fraction >= 0.0045


def test_more_bits_buy_more_code_bits():
    code_bits = [solve_budget(SHAPES, t, "row", 0.0045).code_bits for t in (2.2, 2.5, 3.0, 4.0)]
    assert code_bits == sorted(code_bits) and len(set(code_bits)) == 4


def test_impossible_budget_is_an_error():
    with pytest.raises(ValueError, match="below the smallest"):
        solve_budget([LayerShape(8, 8)], 2.0, "row", 0.0)


def test_lagrangian_widths_match_brute_force_on_convex_channels():
    import itertools

    from cmpq.alloc.rd import lagrangian_widths

    generator = torch.Generator().manual_seed(1)
    cost = torch.tensor([[1.0, 2.0, 3.0, 4.0]]).expand(5, -1).double()
    scale = torch.rand(5, 1, generator=generator).double() * 10 + 0.1
    distortion = scale * torch.tensor([[1.0, 0.3, 0.1, 0.04]]).double()  # convex, decreasing
    for budget in (5.0, 9.0, 12.0, 17.0, 20.0):
        choice = lagrangian_widths(distortion, cost, budget)
        spent = cost.gather(1, choice.unsqueeze(1)).sum().item()
        got = distortion.gather(1, choice.unsqueeze(1)).sum().item()
        assert spent <= budget
        # optimal among allocations spending no more than it does
        assert (
            got
            <= min(
                sum(distortion[i, o].item() for i, o in enumerate(options))
                for options in itertools.product(range(4), repeat=5)
                if sum(cost[i, o].item() for i, o in enumerate(options)) <= spent
            )
            + 1e-9
        )


def test_rd_plan_lands_under_the_target_and_favours_costly_channels():
    from cmpq.alloc.rd import RD_WIDTHS, rd_plan

    shapes = {"a": LayerShape(256, 128), "b": LayerShape(192, 128)}
    generator = torch.Generator().manual_seed(0)
    widths = torch.tensor(RD_WIDTHS).double()
    distortions = {
        name: (torch.rand(128, 1, generator=generator).double() * 100 + 1) * 4.0 ** (-widths)
        for name in shapes
    }
    distortions["a"][0] *= 1000  # one channel matters far more
    for target in (2.2, 3.0, 4.0):
        plan = rd_plan(shapes, distortions, target, 0.0045)
        assert target - 0.05 <= plan.total_bits <= target
        assert int(plan.widths["a"][0]) == max(int(w) for w in plan.widths["a"])
        for name, shape in shapes.items():
            assert plan.widths[name].shape == (shape.in_features,)
