"""Quantization configs: small validated dataclasses, one per method.

Every option is declared once, here: its name, type, default, choices and help
text (the field's ``metadata``). The command line is generated from these
fields (:mod:`cmpq.cli`), and the checks below name parameters as the API
spells them; the CLI prints its own flags instead (``CmpqError.parameters``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from .alloc.budget import ALLOCATIONS, MAX_TOTAL_BITS, MIN_TOTAL_BITS
from .calib.stats import STATISTICS
from .calib.text import BUILTIN_DATASETS
from .errors import CmpqError
from .format.spec import LAYOUTS

RTN_MIN_BITS, RTN_MAX_BITS = 2, 8


def option(default, help: str, **cli) -> field:
    """A config field with its help text and how the CLI spells it.

    ``cli`` may hold ``choices`` (the allowed values), ``flag`` (a flag other than
    ``--field-name``), ``negate`` (the flag sets the field to ``False``),
    ``optional`` (``--x/--no-x``) and ``none`` (the word the CLI takes for ``None``).
    """
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class RTNConfig:
    """Round-to-nearest baseline: ``bits`` per code, fp16 scale and minimum per group.

    ``group_size=None`` quantizes per output channel (one group per row).
    """

    bits: int = option(3, "code bits, an integer 2-8")
    group_size: int | None = option(
        64, "columns per group ('channel': one group per output channel)", none="channel"
    )
    include_lm_head: bool = option(False, "quantize lm_head too")

    method = "rtn"

    def __post_init__(self) -> None:
        check_rtn_options(self.bits, self.group_size)

    def as_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}


def check_rtn_options(bits: int, group_size: int | None) -> None:
    if not float(bits).is_integer() or not RTN_MIN_BITS <= bits <= RTN_MAX_BITS:
        raise CmpqError(
            f"`bits` must be an integer from {RTN_MIN_BITS} to {RTN_MAX_BITS} for RTN (got {bits})"
        )
    if group_size is not None and group_size <= 0:
        raise CmpqError(f"`group_size` must be a positive number of columns (got {group_size})")


# The paper's outliers, about 0.45 % of the weights in fp16: O_act 0.05 % + O_q 0.4 %
# (cmpq's defaults at every budget until issue 18; now only up to 2.5 bits).
PAPER_OUTLIERS = {"outliers_act": 0.0005, "outliers_q": 0.004}
# The CMPQ paper's method, as the defaults were before rd-layer allocation and
# error feedback measured better (docs/decisions.md): CMPQConfig(**PAPER_METHOD).
PAPER_METHOD = {
    "allocation": "paper",
    "error_feedback": False,
    "tune_model": 0,
    **PAPER_OUTLIERS,
}
# SqueezeLLM's recipe from cmpq's parts, the baseline the CMPQ paper compares against:
# one integer code width in every layer, one non-uniform table per output row fit by
# sensitivity-weighted k-means (here weighted by activation energy, not SqueezeLLM's
# Fisher information), 0.45 % dense-and-sparse fp16 outliers, no error feedback.
# Give it the total `bits` of the width wanted (benchmarks/peers/run_peers.py computes them).
SQUEEZELLM_OUTLIERS = 0.0045  # PAPER_OUTLIERS together
SQUEEZELLM_METHOD = {
    "allocation": "paper",
    "layout": "row",
    "mixed": False,
    "error_feedback": False,
    "tune_model": 0,
    **PAPER_OUTLIERS,
}


# The outlier fractions (O_act, O_q) by total bits when they are not given, from
# measurements on smollm2-135m and gemma3-270m (docs/decisions.md, issue 18): fewer
# pay from 3 bits on both, none from 4; below 3 bits the models disagree and the
# paper's 0.45 % is kept. Linear between these points, flat outside them.
OUTLIER_FRACTIONS_BY_BITS = (
    (2.5, PAPER_OUTLIERS["outliers_act"], PAPER_OUTLIERS["outliers_q"]),
    (3.0, 0.0005, 0.001),
    (4.0, 0.0, 0.0),
)
# ... and when model tuning runs: the paper's 0.45 % to 3.3 bits, where it measured
# better with tuning on both models' WikiText-2 (the schedule above was measured
# untuned; the tables tune better with the worst-rounded weights kept in fp16), then
# down to none at 4 bits as above (between 3.3 and 4: an interpolation, not measured).
TUNED_OUTLIER_FRACTIONS_BY_BITS = (
    (3.3, PAPER_OUTLIERS["outliers_act"], PAPER_OUTLIERS["outliers_q"]),
    (4.0, 0.0, 0.0),
)


def default_outlier_fractions(bits: float, tuned: bool = False) -> tuple[float, float]:
    """(O_act, O_q): the fractions of weights kept in fp16 by activation magnitude and
    by quantization error, for a budget of ``bits`` total bits per weight, with the
    tables then ``tuned`` to the model (``tune_model``) or not."""
    points = TUNED_OUTLIER_FRACTIONS_BY_BITS if tuned else OUTLIER_FRACTIONS_BY_BITS
    if bits <= points[0][0]:
        return points[0][1:]
    for (low, *at_low), (high, *at_high) in zip(points, points[1:], strict=False):
        if bits <= high:
            t = (bits - low) / (high - low)
            return tuple(a + t * (b - a) for a, b in zip(at_low, at_high, strict=True))
    return points[-1][1:]


# Model tuning when `tune_model` is not given: 60 steps at or under 3.5 total bits, and
# only when the whole model is in memory (a streamed checkpoint is never tuned). Measured
# on smollm2-135m and gemma3-270m (docs/decisions.md, issue 18): at the relative rate
# it pays on both models and both texts to 3.0 bits (and 3.3, the default rows); at
# 4.0 bits and above it is not yet measured, so the cut sits under 4.0. Under 2.5 bits
# (the default budget), twice the steps: at 2.0 bits on smollm2-135m 120 steps measured
# 12 % / 7 % better than 60 (WikiText-2 / C4) for about 5 minutes more (each step is a
# forward and backward pass of the whole model on one window); the default budget keeps
# 60 for time (506 s on two cores with tuned outliers at 462cd5e, under the 10 minutes).
AUTO_TUNE_MODEL_STEPS = 60
AUTO_TUNE_MODEL_MAX_BITS = 3.5
AUTO_TUNE_MODEL_LOW_BITS_STEPS = 120
AUTO_TUNE_MODEL_LOW_BITS = 2.5  # LOW_BITS_STEPS under this many total bits
# Model tuning's learning rate when `tune_model_lr` is not given: this fraction of each
# linear's weight RMS, so a step moves a table by the same share on every model. A
# fixed rate did not carry across models (docs/decisions.md, issue 18): 1e-3 beat 3e-4
# on smollm2-135m (weight RMS ~0.19) but broke gemma3-270m (RMS ~0.04, 0.016 in
# down_proj), where 3e-4 paid; those are 0.5 % and 0.75 % of the two models' RMS.
RELATIVE_TUNE_MODEL_LR = 0.006
# ... or, with `tune_model_rate` "gaps", this fraction of each table entry's distance
# to its neighbours (`tuning.entry_gaps`): a table with more bits moves in smaller
# steps. About the weights' 0.6 % of RMS at 2.5 bits, where the gaps are ~0.7 RMS.
GAP_TUNE_MODEL_LR = 0.01
# `tune_model_rate` auto: the weights' share under this many total bits, the gaps' from
# it. Measured (docs/decisions.md, issue 18): under 3 bits the weight rate is as good or
# better (smollm2-135m 2.5 bits 1 % better); at 3.0 the two tie on both models; at 3.3
# the weight rate overshoots gemma3-270m's finer tables (put back by the held-out check)
# where the gap rate keeps and gains.
GAP_TUNE_MODEL_RATE_FROM_BITS = 3.0
TUNE_MODEL_RATES = ("auto", "weights", "gaps")


def default_tune_model_rate(bits: float) -> str:
    """What model tuning's auto learning rate is a share of at ``bits`` total bits."""
    return "gaps" if bits >= GAP_TUNE_MODEL_RATE_FROM_BITS else "weights"


def default_tune_model_steps(bits: float) -> int:
    """Model-tuning steps for a budget of ``bits`` total bits when the model is whole."""
    if bits < AUTO_TUNE_MODEL_LOW_BITS:
        return AUTO_TUNE_MODEL_LOW_BITS_STEPS
    return AUTO_TUNE_MODEL_STEPS if bits <= AUTO_TUNE_MODEL_MAX_BITS else 0


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

    bits: float = option(
        2.5, "total stored bits per weight (codes, tables, outliers, metadata), any number 2-8"
    )
    layout: str = option(
        "column",
        "look-up tables per input column, or per output row per bit-group",
        choices=LAYOUTS,
    )
    statistic: str = option("l2", "activation statistic that ranks channels", choices=STATISTICS)
    outliers_act: float | None = option(
        None,
        "fraction of weights kept in fp16 by activation magnitude "
        "(auto: 0.05 % up to 3 bits, 3.3 with model tuning, falling to none at 4)",
        none="auto",
    )
    outliers_q: float | None = option(
        None,
        "fraction of weights kept in fp16 by activation-weighted quantization error "
        "(auto: 0.4 % up to 2.5 bits, 0.1 % at 3, none from 4; with model tuning 0.4 % "
        "up to 3.3 bits)",
        none="auto",
    )
    mixed: bool = option(
        True, "one integer code width everywhere (ablation)", flag="--integer-only", negate=True
    )
    kmeans_iters: int = option(25, "Lloyd iterations of each table fit")
    seed: int = option(0, "seed of the calibration sampling")
    calib: str = option("c4-train", f"calibration text: {' | '.join((*BUILTIN_DATASETS, 'PATH'))}")
    calib_samples: int = option(128, "calibration windows")
    calib_seqlen: int = option(512, "tokens per calibration window")
    sequential: bool = option(
        False, "calibrate each block on the outputs of the blocks already quantized"
    )
    allocation: str = option(
        "rd-layer",
        "paper: the same widths in every layer, the extra bit to the loudest channels; "
        "rd: widths for all channels of all layers at once, by measured distortion per bit; "
        "rd-layer: the same trade within each layer, at the paper's budget per layer; "
        "rd-fisher: rd with each layer's distortion priced by the loss's gradient at its "
        "outputs (a backward pass; the whole model in memory)",
        choices=ALLOCATIONS,
    )
    error_feedback: bool = option(
        True,
        "GPTQ-style feedback of each column's rounding error onto the columns after it "
        "(gathers XᵀX during calibration)",
        optional=True,
    )
    damp: float = option(0.01, "error feedback: damping of XᵀX, a fraction of its mean diagonal")
    tune_tables: int = option(
        0, "steps fitting each block's tables to the full-precision block's outputs (0: off)"
    )
    tune_model: int | None = option(
        None,
        "steps fitting all tables to the full-precision model's next-token distribution "
        f"(0: off; auto: {AUTO_TUNE_MODEL_LOW_BITS_STEPS} under {AUTO_TUNE_MODEL_LOW_BITS} "
        f"bits, {AUTO_TUNE_MODEL_STEPS} up to {AUTO_TUNE_MODEL_MAX_BITS} bits when "
        "the whole model is in memory, else off)",
        none="auto",
    )
    tune_model_seqlen: int | None = option(
        None,
        "tokens per model-tuning step: each calibration window is cut into pieces this "
        "long, one a step (a divisor of `calib_seqlen`; auto: the whole window)",
        none="auto",
    )
    tune_model_rate: str = option(
        "auto",
        "what model tuning's auto learning rate is a share of: each linear's weight RMS "
        "(weights) or each table entry's gap to its neighbours (gaps); auto: weights "
        f"under {GAP_TUNE_MODEL_RATE_FROM_BITS:g} bits, gaps from there",
        choices=TUNE_MODEL_RATES,
    )
    tune_norms: bool = option(
        False,
        "model tuning also tunes the norm weights (stored in fp16 as before, no extra bits)",
        optional=True,
    )
    tune_outliers: bool = option(
        True,
        "model tuning also tunes the outlier values (stored in fp16 as before, no extra bits)",
        optional=True,
    )
    tune_tables_lr: float = option(1e-3, "learning rate of block table tuning (Adam, cosine decay)")
    tune_model_lr: float | None = option(
        None,
        "learning rate of model table tuning (Adam, cosine decay; auto: "
        f"{RELATIVE_TUNE_MODEL_LR:g} of each linear's weight RMS)",
        none="auto",
    )

    method = "cmpq"

    def __post_init__(self) -> None:
        if not MIN_TOTAL_BITS <= self.bits <= MAX_TOTAL_BITS:
            raise CmpqError(
                f"`bits` must be from {MIN_TOTAL_BITS:g} to {MAX_TOTAL_BITS:g} total bits per "
                f"weight (got {self.bits})"
            )
        _check_choice("layout", self.layout, LAYOUTS)
        _check_choice("statistic", self.statistic, STATISTICS)
        _check_choice("allocation", self.allocation, ALLOCATIONS)
        _check_choice("tune_model_rate", self.tune_model_rate, TUNE_MODEL_RATES)
        if self.allocation != "paper" and self.layout != "column":
            raise CmpqError(
                f"`allocation` {self.allocation} prices each input column alone: use `layout` "
                "column, or `allocation` paper with `layout` row"
            )
        for name in ("outliers_act", "outliers_q"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 0.1:
                raise CmpqError(f"`{name}` must be a fraction from 0 to 0.1 (got {value})")
        minimums = (
            ("calib_samples", 1),
            ("calib_seqlen", 2),
            ("kmeans_iters", 1),
            ("tune_tables", 0),
            ("tune_model", 0),
        )
        for name, least in minimums:
            value = getattr(self, name)
            if value is not None and value < least:
                raise CmpqError(f"`{name}` must be at least {least} (got {value})")
        if self.tune_model_seqlen is not None and (
            self.tune_model_seqlen < 2 or self.calib_seqlen % self.tune_model_seqlen
        ):
            raise CmpqError(
                "`tune_model_seqlen` must be at least 2 and divide `calib_seqlen` "
                f"({self.calib_seqlen}; got {self.tune_model_seqlen})"
            )
        for name in ("tune_tables_lr", "tune_model_lr"):
            if getattr(self, name) is not None and not 0 < getattr(self, name) <= 1:
                raise CmpqError(f"`{name}` must be in (0, 1] (got {getattr(self, name)})")
        if not 0 < self.damp <= 1:
            raise CmpqError(f"`damp` must be in (0, 1] (got {self.damp})")
        if not self.calib:
            raise CmpqError(
                f"`calib` must name a dataset ({', '.join(BUILTIN_DATASETS)} or a path)"
            )

    @property
    def outlier_fractions(self) -> tuple[float, float]:
        """(O_act, O_q) as quantization uses them: the ones given, else those for ``bits``
        (and whether model tuning runs: ``tune_model`` auto counts as not, so
        :meth:`with_model_tuning` decides it first)."""
        act, q = default_outlier_fractions(self.bits, tuned=bool(self.tune_model))
        return (
            act if self.outliers_act is None else self.outliers_act,
            q if self.outliers_q is None else self.outliers_q,
        )

    @property
    def model_tuning_rate(self) -> str:
        """``tune_model_rate`` as model tuning uses it: the one given, else the one for
        ``bits``."""
        if self.tune_model_rate == "auto":
            return default_tune_model_rate(self.bits)
        return self.tune_model_rate

    def with_model_tuning(self, whole: bool) -> CMPQConfig:
        """This config with ``tune_model`` decided: as given, else (auto) the steps for
        ``bits`` when the model is ``whole`` in memory, and none when it is streamed."""
        if self.tune_model is not None:
            return self
        steps = default_tune_model_steps(self.bits) if whole else 0
        return replace(self, tune_model=steps)

    @property
    def needs_whole_model(self) -> bool:
        """Whether quantizing takes the whole model in memory at once: model tuning
        (``tune_model`` as decided; auto counts as off) and rd-fisher's backward pass."""
        return bool(self.tune_model) or self.allocation == "rd-fisher"

    def as_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise CmpqError(f"`{name}` must be one of {', '.join(choices)} (got {value!r})")
