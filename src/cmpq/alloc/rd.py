"""Rate-distortion allocation (column layout): each input channel's width chosen
from its measured distortion per stored bit.

Every channel prices its codes and its own fp16 table at each candidate width;
one Lagrange multiplier (per layer for ``rd-layer``, shared by all layers for
``rd``) picks each channel's width on the lower convex hull of its
(cost, distortion) points, so no bit can move between channels and lower the
summed distortion. The distortions come from the quantizer
(:func:`cmpq.quant.tables.column_distortions`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..format.cost import LayerShape, layer_cost
from ..format.layer import groups_of
from ..format.spec import LUT_ENTRY_BITS
from .budget import TotalBits, outlier_count, top_up_outliers
from .paper import paper_groups

RD_WIDTHS = (1, 2, 3, 4, 5, 6, 8)


def column_width_costs(out_features: int, widths: tuple[int, ...] = RD_WIDTHS) -> torch.Tensor:
    """Stored bits of one input column at each width: its codes and its fp16 table."""
    return torch.tensor(
        [out_features * b + 2**b * LUT_ENTRY_BITS for b in widths], dtype=torch.float64
    )


def lagrangian_widths(
    distortion: torch.Tensor, cost: torch.Tensor, budget: float, iters: int = 100
) -> torch.Tensor:
    """For every channel (rows of ``distortion``/``cost`` ``[N, W]``) the option index
    minimising ``D + λ C``, with the smallest ``λ`` whose total cost fits ``budget``.

    The total cost falls as ``λ`` grows, so ``λ`` is found by bisection on its
    logarithm; every channel then sits on the lower convex hull of its own
    (cost, distortion) points, at the slope shared by all channels: no bit can be
    moved from one channel to another and lower the total distortion.
    """

    def choice(lam: float) -> torch.Tensor:
        return (distortion + lam * cost).argmin(dim=1)

    def total(index: torch.Tensor) -> float:
        return cost.gather(1, index.unsqueeze(1)).sum().item()

    cheapest = cost.argmin(dim=1)
    if total(cheapest) > budget:
        raise ValueError("the budget is below the cheapest width of every channel")
    lo, hi = -60.0, 60.0  # log2 of λ: 2^-60 takes the richest option, 2^60 the cheapest
    if total(choice(2.0**lo)) <= budget:
        return choice(2.0**lo)
    for _ in range(iters):
        mid = (lo + hi) / 2
        if total(choice(2.0**mid)) <= budget:
            hi = mid
        else:
            lo = mid
    return choice(2.0**hi)


def _rd_reserved_bits(shape: LayerShape, outlier_fraction: float, widths: tuple[int, ...]) -> int:
    """What a layer stores besides codes and tables, at most: permutation, a header
    and a byte of packing slack per possible width, and the requested outliers."""
    outliers = outlier_count(shape.out_features, shape.in_features, outlier_fraction)
    empty = layer_cost(shape, list(widths), [0] * len(widths), "column", outliers)
    return empty["outliers"] + empty["metadata"] + 8 * len(widths)


def rd_layer_budgets(
    shapes: dict[str, LayerShape],
    code_bits: float,
    outlier_fraction: float,
    mixed: bool,
    widths: tuple[int, ...] = RD_WIDTHS,
) -> dict[str, float]:
    """Bits each layer may spend on codes and tables under ``rd-layer``: all the paper
    rule at ``code_bits`` stores for it (column layout, the requested outliers), less
    what rd's widths may store besides codes and tables (:func:`_rd_reserved_bits`:
    up to one group per width, where the paper rule has two), so the layers together
    never exceed the budget the paper rule was solved for."""
    budgets = {}
    for name, shape in shapes.items():
        outliers = outlier_count(shape.out_features, shape.in_features, outlier_fraction)
        groups = paper_groups(shape.in_features, code_bits, mixed)
        paper = sum(layer_cost(shape, *groups, "column", outliers).values())
        budgets[name] = float(paper - _rd_reserved_bits(shape, outlier_fraction, widths))
    return budgets


@dataclass(frozen=True)
class RDPlan(TotalBits):
    """Rate-distortion allocation: widths per layer and the outlier fraction filling the rest."""

    widths: dict[str, torch.Tensor]
    outlier_fraction: float
    stored_bits: int
    params: int


def rd_plan(
    shapes: dict[str, LayerShape],
    distortions: dict[str, torch.Tensor],
    target_bits: float,
    outlier_fraction: float,
    widths: tuple[int, ...] = RD_WIDTHS,
    layer_budgets: dict[str, float] | None = None,
) -> RDPlan:
    """Widths for every channel of every layer at once, minimising the summed
    distortion under the exact total budget (column layout).

    Codes and tables are priced per channel; metadata (permutation, one header
    per width) and the requested outliers are set aside first, and what the
    chosen widths leave is spent on more outliers, as with the paper rule.
    With ``layer_budgets`` (bits for codes and tables, per layer) each layer
    is solved alone within its own budget: the trade is made between the
    channels of a layer only, never between layers.
    """
    params = sum(shape.numel for shape in shapes.values())
    budget = target_bits * params
    reserved = sum(_rd_reserved_bits(shape, outlier_fraction, widths) for shape in shapes.values())
    names = list(shapes)

    def costs(n: str) -> torch.Tensor:
        return column_width_costs(shapes[n].out_features, widths).expand(shapes[n].in_features, -1)

    table = torch.tensor(widths)
    try:
        if layer_budgets is not None:
            chosen = {
                n: table[lagrangian_widths(distortions[n], costs(n), layer_budgets[n])]
                for n in names
            }
        else:
            choice = lagrangian_widths(
                torch.cat([distortions[n] for n in names]),
                torch.cat([costs(n) for n in names]),
                budget - reserved,
            )
            sizes = [shapes[n].in_features for n in names]
            chosen = dict(zip(names, (table[c] for c in choice.split(sizes)), strict=True))
    except ValueError:
        raise ValueError(
            f"{target_bits} bits per weight is below the smallest rd allocation can store"
        ) from None

    def cost_at(fraction: float) -> int:
        total = 0
        for n in names:
            group_bits, group_sizes = groups_of(chosen[n])
            outliers = outlier_count(shapes[n].out_features, shapes[n].in_features, fraction)
            total += sum(
                layer_cost(shapes[n], group_bits, group_sizes, "column", outliers).values()
            )
        return total

    fraction, stored = top_up_outliers(cost_at, outlier_fraction, budget, params)
    return RDPlan(chosen, fraction, stored, params)
