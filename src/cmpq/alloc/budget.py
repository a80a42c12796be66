"""The total-bits budget: the code bits whose exact stored cost lands just under
the target, and the outliers that fill what is left.

The user's target is the *total* stored bits per weight of the quantized
linears (codes, look-up tables, outliers and metadata), so :func:`solve_budget`
searches for the average code bits whose exact cost (:func:`cmpq.format.cost.layer_cost`,
the same arithmetic as the stored tensors; a test checks that) comes closest
to the target from below.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from ..format.cost import LayerShape, layer_cost
from ..format.spec import MAX_CODE_BITS, MIN_CODE_BITS, OUTLIER_VALUE_BITS
from .paper import paper_groups

MIN_TOTAL_BITS, MAX_TOTAL_BITS = 2.0, 8.0  # what a user may ask for, in total bits per weight
ALLOCATIONS = ("paper", "rd", "rd-layer", "rd-fisher")


def outlier_count(out_features: int, in_features: int, fraction: float) -> int:
    """How many entries a fraction of an ``[out, in]`` layer is."""
    return round(fraction * out_features * in_features)


def model_cost(
    shapes: list[LayerShape], code_bits: float, layout: str, outlier_fraction: float, mixed: bool
) -> int:
    """Total stored bits of all layers under the paper rule at ``code_bits``."""
    total = 0
    for shape, repeats in Counter(shapes).items():
        widths, sizes = paper_groups(shape.in_features, code_bits, mixed)
        outliers = outlier_count(shape.out_features, shape.in_features, outlier_fraction)
        total += repeats * sum(layer_cost(shape, widths, sizes, layout, outliers).values())
    return total


class TotalBits:
    stored_bits: int
    params: int

    @property
    def total_bits(self) -> float:
        return self.stored_bits / self.params


@dataclass(frozen=True)
class Budget(TotalBits):
    """The solved operating point: code bits and the outlier fraction that fill the target."""

    code_bits: float
    outlier_fraction: float
    stored_bits: int
    params: int


def solve_budget(
    shapes: list[LayerShape],
    target_bits: float,
    layout: str,
    outlier_fraction: float,
    mixed: bool = True,
    step: float = 1 / 1024,
) -> Budget:
    """Code bits and outlier fraction whose exact total lands just under ``target_bits``.

    First the largest code bits on a ``step`` grid that fit with the requested
    outlier fraction (cost is not monotone in the code bits: a mixed layer pays
    for two tables, an integer one for one, so every grid point is tried); then
    what is left of the budget (a grid step, or the gap a second table opens
    just above an integer) buys more fp16 outliers, so the total lands within a
    few hundredths of a bit of the target.
    """
    params = sum(shape.numel for shape in shapes)
    budget = target_bits * params
    grid = (
        torch.arange(MIN_CODE_BITS, MAX_CODE_BITS + step / 2, step).tolist()
        if mixed
        else list(range(MIN_CODE_BITS, MAX_CODE_BITS + 1))
    )
    fitting = [c for c in grid if model_cost(shapes, c, layout, outlier_fraction, mixed) <= budget]
    if not fitting:
        lowest = model_cost(shapes, MIN_CODE_BITS, layout, outlier_fraction, False) / params
        raise ValueError(
            f"{target_bits} bits per weight is below the smallest this layout can store "
            f"({lowest:.3f} with 1-bit codes and {outlier_fraction:.2%} outliers)"
        )
    code_bits = max(fitting)

    def cost_at(fraction: float) -> int:
        return model_cost(shapes, code_bits, layout, fraction, mixed)

    fraction, cost = top_up_outliers(cost_at, outlier_fraction, budget, params)
    return Budget(code_bits, fraction, cost, params)


def top_up_outliers(cost_at, fraction: float, budget: float, params: int) -> tuple[float, int]:
    """The largest outlier fraction from ``fraction`` up whose total ``cost_at`` fits
    ``budget``: what the code widths leave of the budget buys more fp16 outliers.
    A ``fraction`` of 0 (outliers off) stays 0: what is left stays unspent."""
    cost = cost_at(fraction)
    if fraction <= 0:
        return fraction, cost
    per_outlier = OUTLIER_VALUE_BITS + 16
    extra = (budget - cost) / (per_outlier * params)
    while extra > 0:
        trial = cost_at(fraction + extra)
        if trial <= budget:
            return fraction + extra, trial
        extra -= (trial - budget) / (per_outlier * params) + 1 / params
    return fraction, cost
