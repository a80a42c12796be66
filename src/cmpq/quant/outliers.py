"""The two kinds of fp16 outliers, kept exactly and left out of the table fits.

- O_act: the entries with the largest ``|W_ij| * s_j`` (weights on extreme
  activation channels), chosen before any table is fitted;
- O_q: after a first fit, the entries with the largest activation-weighted
  error ``|W_ij - Q(W_ij)| * s_j``; the tables are then refitted without them.

``s_j`` is the RMS activation of input channel j (:func:`activation_scale`).
"""

from __future__ import annotations

import torch

from ..format.layer import assemble


def top_entries(score: torch.Tensor, count: int, exclude: torch.Tensor | None) -> torch.Tensor:
    """Boolean mask of the ``count`` largest scores outside ``exclude`` (``None``:
    none excluded); ``score``, a temporary of the caller's, is overwritten."""
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)  # contiguous
    if count <= 0:
        return mask
    if exclude is not None:
        score.masked_fill_(exclude, float("-inf"))
    mask.view(-1)[torch.topk(score.flatten(), count).indices] = True
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
