"""Quantization configs: small validated dataclasses, one per method."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .rtn import check_rtn_options


@dataclass(frozen=True)
class RTNConfig:
    """Round-to-nearest baseline: ``bits`` per code, fp16 scale and minimum per group.

    ``group_size=None`` quantizes per output channel (one group per row).
    """

    bits: int = 3
    group_size: int | None = 64
    include_lm_head: bool = False

    method = "rtn"

    def __post_init__(self) -> None:
        check_rtn_options(self.bits, self.group_size)

    def as_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}
