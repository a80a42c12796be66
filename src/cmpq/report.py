"""What a quantization run stored and cost, counted honestly."""

from __future__ import annotations

import math
import os
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_bytes() -> int:
    """Resident memory of this process now (Linux /proc), else its peak so far."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return peak_rss_bytes()
    return pages * os.sysconf("SC_PAGE_SIZE")


@dataclass
class QuantizationReport:
    """Totals over the quantized linears.

    ``bits_breakdown`` holds every stored bit by kind (codes, scales, look-up
    tables, outliers, metadata), so ``effective_bits`` is the true storage cost
    per quantized weight.
    """

    method: str
    config: dict
    quantized_params: int = 0
    bits_breakdown: dict[str, int] = field(default_factory=dict)
    layers: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    code_bits: float | None = None  # CMPQ: the solved average code width
    # CMPQ: each linear's per-input-channel allocation statistic (config ``statistic``), by
    # full name; saved beside the checkpoint for `cmpq inspect`, not part of the JSON report
    channel_statistics: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def add_layer(self, params: int, stored_bits: dict[str, int]) -> None:
        self.layers += 1
        self.quantized_params += params
        for kind, bits in stored_bits.items():
            self.bits_breakdown[kind] = self.bits_breakdown.get(kind, 0) + bits

    @property
    def stored_bits(self) -> int:
        return sum(self.bits_breakdown.values())

    @property
    def stored_bytes(self) -> int:
        return math.ceil(self.stored_bits / 8)

    @property
    def effective_bits(self) -> float:
        return self.stored_bits / self.quantized_params if self.quantized_params else 0.0

    def stored_dict(self) -> dict:
        """What was stored and how it was made: a property of the checkpoint, so the
        same model, data, options and seed give the same dict (the checkpoint's
        description holds it)."""
        return {
            "method": self.method,
            "config": self.config,
            "effective_bits": self.effective_bits,
            "bits_breakdown": {
                kind: bits / self.quantized_params for kind, bits in self.bits_breakdown.items()
            },
            "quantized_params": self.quantized_params,
            "stored_bytes": self.stored_bytes,
            "layers": self.layers,
            "code_bits": self.code_bits,
        }

    def as_dict(self) -> dict:
        """:meth:`stored_dict` plus what this run cost (wall-clock time, peak memory)."""
        return {
            **self.stored_dict(),
            "seconds": self.seconds,
            "peak_rss_bytes": self.peak_rss_bytes,
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
