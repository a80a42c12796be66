"""Quantization configs: small validated dataclasses, one per method."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .allocate import ALLOCATIONS, LAYOUTS
from .calibrate import STATISTICS
from .data import BUILTIN_DATASETS
from .errors import CmpqError
from .rtn import check_rtn_options

MIN_TOTAL_BITS, MAX_TOTAL_BITS = 2.0, 8.0


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


# The CMPQ paper's method, as the defaults were before rd-layer allocation and
# error feedback measured better (docs/decisions.md): CMPQConfig(**PAPER_METHOD).
PAPER_METHOD = {"allocation": "paper", "error_feedback": False}


@dataclass(frozen=True)
class CMPQConfig:
    """Channel-wise mixed-precision quantization to ``bits`` *total* stored bits
    per weight (codes + look-up tables + outliers + metadata).

    The code bits are solved so the total lands just under ``bits``. By default
    (``rd-layer``) each layer spends the paper rule's budget, with its channels'
    widths chosen by measured distortion per stored bit, and every column's
    rounding error is fed forward (``error_feedback``); :data:`PAPER_METHOD`
    gives the paper's own method (extra bit to the loudest channels, no feedback).
    """

    bits: float = 2.5
    layout: str = "column"  # "column": table per input column; "row": per output row per bit-group
    statistic: str = "l2"  # allocation statistic: "l2", "mean_abs" or "max_abs"
    outliers_act: float = 0.0005  # fraction of weights kept fp16 by activation magnitude
    outliers_q: float = 0.004  # fraction kept fp16 by activation-weighted quantization error
    mixed: bool = True  # False: one integer width everywhere (ablation)
    kmeans_iters: int = 25
    seed: int = 0
    calib: str = "c4-train"
    calib_samples: int = 128
    calib_seqlen: int = 512
    sequential: bool = False
    allocation: str = "rd-layer"  # "paper": same widths in every layer; "rd": rate-distortion
    # across all layers; "rd-layer": rate-distortion within each layer at the paper's budget
    error_feedback: bool = True  # GPTQ-style feedback of each column's error (needs XᵀX)
    damp: float = 0.01  # error feedback: damping of XᵀX, as a fraction of its mean diagonal

    method = "cmpq"

    def __post_init__(self) -> None:
        if not MIN_TOTAL_BITS <= self.bits <= MAX_TOTAL_BITS:
            raise CmpqError(
                f"--bits must be from {MIN_TOTAL_BITS:g} to {MAX_TOTAL_BITS:g} total bits per "
                f"weight (got {self.bits})"
            )
        _check_choice("layout", self.layout, LAYOUTS)
        _check_choice("statistic", self.statistic, STATISTICS)
        _check_choice("allocation", self.allocation, ALLOCATIONS)
        if self.allocation != "paper" and self.layout != "column":
            raise CmpqError(
                f"--allocation {self.allocation} prices each input column alone: "
                "use --layout column, or --allocation paper with --layout row"
            )
        if self.allocation != "paper" and self.sequential:
            raise CmpqError(
                f"--allocation {self.allocation} needs every layer's statistics before the "
                "first is quantized; add --allocation paper to calibrate sequentially"
            )
        for name in ("outliers_act", "outliers_q"):
            value = getattr(self, name)
            if not 0 <= value <= 0.1:
                raise CmpqError(
                    f"--{name.replace('_', '-')} must be a fraction from 0 to 0.1 (got {value})"
                )
        if self.calib_samples < 1 or self.calib_seqlen < 2 or self.kmeans_iters < 1:
            raise CmpqError("--calib-samples and --kmeans-iters must be >= 1, --calib-seqlen >= 2")
        if not 0 < self.damp <= 1:
            raise CmpqError(f"--damp must be in (0, 1] (got {self.damp})")
        if not self.calib:
            raise CmpqError(
                f"--calib must name a dataset ({', '.join(BUILTIN_DATASETS)} or a path)"
            )

    def as_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise CmpqError(f"--{name} must be one of {', '.join(choices)} (got {value!r})")
