"""What a quantization run stored and cost, counted honestly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..format.cost import StoredTotals

if TYPE_CHECKING:
    import torch


@dataclass(kw_only=True)
class QuantizationReport(StoredTotals):
    """Totals over the quantized linears (:class:`~cmpq.format.cost.StoredTotals`:
    every stored bit by kind, so ``effective_bits`` is the true storage cost per
    quantized weight), plus how the run was made and what it cost."""

    method: str
    config: dict
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    code_bits: float | None = None  # CMPQ: the solved average code width
    # CMPQ: each linear's per-input-channel allocation statistic (config ``statistic``), by
    # full name; saved beside the checkpoint for `cmpq inspect`, not part of the JSON report
    channel_statistics: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    # table tuning: each block's error before and after, the model's KL trend (quant.tuning)
    tuning: dict = field(default_factory=dict)

    def stored_dict(self) -> dict:
        """What was stored and how it was made: a property of the checkpoint, so the
        same model, data, options and seed give the same dict (the checkpoint's
        description holds it)."""
        return {
            "method": self.method,
            "config": self.config,
            **self.totals_dict(),
            "code_bits": self.code_bits,
        }

    def as_dict(self) -> dict:
        """:meth:`stored_dict` plus what this run cost (wall-clock time, peak memory)."""
        return {
            **self.stored_dict(),
            "seconds": self.seconds,
            "peak_rss_bytes": self.peak_rss_bytes,
            "tuning": self.tuning,
        }

    def summary(self) -> str:
        parts = ", ".join(
            f"{kind} {bits / self.quantized_params:.3f}"
            for kind, bits in self.bits_breakdown.items()
        )
        return (
            f"{self.method}: {self.layers} linears, {self.quantized_params:,} weights, "
            f"{self.effective_bits:.3f} bits/weight ({parts}), {self.stored_bytes / 1e6:.2f} MB, "
            f"{self.seconds:.1f} s"
        )
