"""The two kinds of fp16 outliers, kept exactly and left out of the table fits.

- O_act: the entries with the largest ``|W_ij| * s_j`` (weights on extreme
  activation channels), chosen before any table is fitted;
- O_q: after a first fit, the entries with the largest activation-weighted
  error ``|W_ij - Q(W_ij)| * s_j``; the tables are then refitted without them.

``s_j`` is the RMS activation of input channel j (:func:`activation_scale`).
Neither puts more than :data:`~cmpq.format.spec.MAX_OUTLIERS_PER_ROW` outliers
of both kinds in one output row (the format stores a row's count in a byte).
"""

from __future__ import annotations

import torch

from ..format.layer import assemble
from ..format.spec import MAX_OUTLIERS_PER_ROW


def top_entries(
    score: torch.Tensor,
    count: int,
    exclude: torch.Tensor | None,
    row_limit: int = MAX_OUTLIERS_PER_ROW,
) -> torch.Tensor:
    """Boolean mask of the ``count`` largest scores of the ``[rows, columns]`` ``score``
    outside ``exclude`` (``None``: none excluded), with at most ``row_limit`` entries
    of the mask and ``exclude`` together in a row (fewer than ``count`` only when the
    rows have no more room); ``score``, a temporary of the caller's, is overwritten."""
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)  # contiguous
    if count <= 0:
        return mask
    taken = torch.zeros(score.shape[0], dtype=torch.int64, device=score.device)
    if exclude is not None:
        score.masked_fill_(exclude, float("-inf"))
        taken = exclude.sum(1)
    room = (row_limit - taken).clamp_min(0)
    count = min(count, int(torch.minimum(room, score.shape[1] - taken).sum()))
    mask.view(-1)[torch.topk(score.flatten(), count).indices] = True
    if bool((mask.sum(1) <= room).all()):
        return mask
    # a row over its room: the count largest among each row's largest `room` scores
    # (taking scores largest first while their row has room is optimal, and picks these)
    width = min(int(room.max()), score.shape[1])
    best, columns = torch.topk(score, width, dim=1)
    best[torch.arange(width, device=score.device) >= room.unsqueeze(1)] = float("-inf")
    chosen = torch.topk(best.flatten(), count).indices
    mask.zero_()
    mask[chosen // width, columns.flatten()[chosen]] = True
    return mask


def activation_scale(energy: torch.Tensor) -> torch.Tensor:
    """``[1, in]`` RMS activation per input channel: the weight of an error in its column."""
    return energy.float().clamp_min(0).sqrt().unsqueeze(0)


def activation_outliers(weight: torch.Tensor, scale: torch.Tensor, count: int) -> torch.Tensor:
    """O_act: the ``count`` entries with the largest ``|W_ij| * s_j``."""
    return top_entries(weight.abs().mul_(scale), count, None)


def add_error_outliers(
    weight: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor, fitted: tuple, count: int
) -> torch.Tensor:
    """``mask`` plus the ``count`` entries outside it that the fit rounds worst, by
    activation-weighted error; ``fitted`` is ``(luts, codes, perm, offsets, layout)``."""
    luts, codes, perm, offsets, layout = fitted
    error = assemble(weight.shape, perm, offsets, codes, luts, layout).sub_(weight).abs_()
    return mask | top_entries(error.mul_(scale), count, mask)
