"""Bit allocation: which input channel gets how many code bits, and what it all costs.

The paper's rule (per layer): for code bits ``c``, ``lo = floor(c)`` and
``hi = lo + 1``; the ``round((c - lo) * in)`` channels with the largest
activation statistic get ``hi`` bits, the rest ``lo``.

The user's target is the *total* stored bits per weight (codes, look-up tables,
outliers and metadata), so :func:`solve_code_bits` searches for the code bits
``c`` whose exact total cost comes closest to the target from below; the cost
model here is the same arithmetic as the stored tensors (a test checks that).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from .packing import packed_nbytes

MIN_CODE_BITS, MAX_CODE_BITS = 1, 8
LUT_ENTRY_BITS = 16  # fp16 table entries
OUTLIER_VALUE_BITS = 16  # fp16
ROW_POINTER_BITS = 32  # int32 CSR row pointers
GROUP_HEADER_BITS = 8 + 32  # uint8 width + int32 column count per bit-group
LAYOUTS = ("row", "column")
ALLOCATIONS = ("paper", "rd", "rd-layer")


def index_bits(count: int) -> int:
    """Width of the integer type storing an index below ``count`` (int16 or int32)."""
    return 16 if count <= 2**15 else 32


def paper_allocation(statistic: torch.Tensor, code_bits: float, mixed: bool = True) -> torch.Tensor:
    """Per-channel code widths (int64 ``[in]``) for average ``code_bits``.

    ``mixed=False`` gives every channel ``floor(code_bits)`` (the integer-only ablation).
    """
    lo = math.floor(code_bits + 1e-9)
    bits = torch.full((statistic.numel(),), lo, dtype=torch.int64)
    if not mixed or lo >= MAX_CODE_BITS:
        return bits
    high = round((code_bits - lo) * statistic.numel())
    if high:
        order = torch.argsort(statistic, descending=True, stable=True)
        bits[order[:high]] = lo + 1
    return bits


def outlier_count(out_features: int, in_features: int, fraction: float) -> int:
    return round(fraction * out_features * in_features)


@dataclass(frozen=True)
class LayerShape:
    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


def layer_cost(
    shape: LayerShape, group_bits: list[int], group_sizes: list[int], layout: str, outliers: int
) -> dict[str, int]:
    """Exact stored bits of one quantized linear, by kind."""
    out_features, in_features = shape.out_features, shape.in_features
    codes = sum(
        8 * packed_nbytes(out_features * size, bits)
        for bits, size in zip(group_bits, group_sizes, strict=True)
    )
    if layout == "row":
        lut = sum(out_features * 2**bits for bits in group_bits) * LUT_ENTRY_BITS
    else:
        lut = sum(size * 2**bits for bits, size in zip(group_bits, group_sizes, strict=True))
        lut *= LUT_ENTRY_BITS
    metadata = in_features * index_bits(in_features) + len(group_bits) * GROUP_HEADER_BITS
    outlier_bits = 0
    if outliers:
        outlier_bits = (out_features + 1) * ROW_POINTER_BITS + outliers * (
            OUTLIER_VALUE_BITS + index_bits(in_features)
        )
    return {"codes": codes, "lut": lut, "outliers": outlier_bits, "metadata": metadata}


def groups_of(bits_per_channel: torch.Tensor) -> tuple[list[int], list[int]]:
    """The bit widths present (ascending) and how many channels have each."""
    widths, counts = torch.unique(bits_per_channel, return_counts=True)
    return [int(w) for w in widths], [int(c) for c in counts]


def paper_groups(in_features: int, code_bits: float, mixed: bool) -> tuple[list[int], list[int]]:
    """Group widths and sizes the paper rule gives, without needing the statistic."""
    lo = math.floor(code_bits + 1e-9)
    high = round((code_bits - lo) * in_features) if mixed and lo < MAX_CODE_BITS else 0
    pairs = [(lo, in_features - high), (lo + 1, high)]
    pairs = [(b, n) for b, n in pairs if n > 0]
    return [b for b, _ in pairs], [n for _, n in pairs]


def paper_code_budgets(
    shapes: dict[str, LayerShape], code_bits: float, layout: str, mixed: bool
) -> dict[str, float]:
    """Bits each layer spends on codes and tables under the paper rule at ``code_bits``."""
    budgets = {}
    for name, shape in shapes.items():
        cost = layer_cost(shape, *paper_groups(shape.in_features, code_bits, mixed), layout, 0)
        budgets[name] = float(cost["codes"] + cost["lut"])
    return budgets


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


class _TotalBits:
    stored_bits: int
    params: int

    @property
    def total_bits(self) -> float:
        return self.stored_bits / self.params


@dataclass(frozen=True)
class Budget(_TotalBits):
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
    ``budget``: what the code widths leave of the budget buys more fp16 outliers."""
    cost = cost_at(fraction)
    per_outlier = OUTLIER_VALUE_BITS + 16
    extra = (budget - cost) / (per_outlier * params)
    while extra > 0:
        trial = cost_at(fraction + extra)
        if trial <= budget:
            return fraction + extra, trial
        extra -= (trial - budget) / (per_outlier * params) + 1 / params
    return fraction, cost


# --- rate-distortion allocation (column layout) ---------------------------------

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


@dataclass(frozen=True)
class RDPlan(_TotalBits):
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
