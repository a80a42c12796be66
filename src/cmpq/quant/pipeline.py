"""The public verb: ``quantize(model, config)`` transforms a model in place.

CMPQ runs in the order the data flows: calibration windows are sampled
(:mod:`cmpq.calib.text`), the block looper measures each block's linears
(:mod:`cmpq.calib.looper`), the allocation is planned (:mod:`cmpq.alloc`), and
each block's linears are quantized side by side (:mod:`.tables`,
:mod:`.feedback`, on an :mod:`.executor`) and replaced by
:class:`~cmpq.runtime.qlinear.QuantizedLinear` modules.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..alloc.budget import outlier_count, solve_budget
from ..alloc.paper import paper_allocation, paper_code_budgets
from ..alloc.rd import RD_WIDTHS, rd_plan
from ..calib.looper import collect_stats, for_each_block
from ..calib.stats import ChannelStats
from ..calib.text import load_documents, sample_calibration
from ..config import CMPQConfig, RTNConfig
from ..errors import CmpqError
from ..format.cost import LayerShape, stored_bits
from ..memory import peak_rss_bytes
from ..models.conventions import needs_bos
from ..models.graph import (
    block_linears,
    decoder_blocks,
    quantizable_linears,
    replace_module,
    set_weight_matrix,
    untie_lm_head,
    weight_matrix,
)
from ..runtime.qlinear import QuantizedLinear
from .executor import Executor, ThreadExecutor
from .feedback import quantize_layer_feedback
from .outliers import activation_outliers, activation_scale
from .report import QuantizationReport
from .rtn import rtn_dequantize, rtn_quantize, rtn_stored_bits
from .tables import column_distortions, quantize_layer


def quantize_rtn(model: nn.Module, config: RTNConfig, progress: bool = True) -> QuantizationReport:
    """RTN every decoder linear; the weights are replaced by their de-quantized values."""
    start = time.perf_counter()
    if config.include_lm_head:
        untie_lm_head(model)
    report = QuantizationReport(method=config.method, config=config.as_dict())
    linears = quantizable_linears(model, config.include_lm_head)
    for module in tqdm(linears.values(), desc="rtn", unit="linear", disable=not progress):
        weight = weight_matrix(module)
        quantized = rtn_quantize(weight, config.bits, config.group_size)
        set_weight_matrix(module, rtn_dequantize(quantized))
        report.add_layer(
            weight.numel(), rtn_stored_bits(*weight.shape, config.bits, config.group_size)
        )
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def calibration_batch(tokenizer, model, config: CMPQConfig) -> torch.Tensor:
    """The calibration windows ``config`` asks for, sampled with its seed."""
    bos = tokenizer.bos_token_id if needs_bos(tokenizer, model) else None
    documents = load_documents(config.calib)
    return sample_calibration(
        documents, tokenizer, config.calib_samples, config.calib_seqlen, config.seed, bos
    )


def quantize_cmpq(
    model: nn.Module,
    config: CMPQConfig,
    calibration: torch.Tensor | None,
    progress: bool = True,
    stats: dict[str, ChannelStats] | None = None,
    executor: Executor | None = None,
) -> QuantizationReport:
    """CMPQ every decoder linear, replacing each with a :class:`QuantizedLinear`.

    ``stats`` (from :func:`cmpq.calib.looper.collect_stats`, by full linear name)
    skips calibration: statistics of the full-precision model can be reused
    across runs that differ only in bits or quantizer options. ``executor`` runs
    the per-linear work (default: :class:`~.executor.ThreadExecutor`).
    """
    start = time.perf_counter()
    executor = ThreadExecutor() if executor is None else executor
    linears = quantizable_linears(model)
    shapes = {name: LayerShape(*weight_matrix(m).shape) for name, m in linears.items()}
    outlier_fraction = config.outliers_act + config.outliers_q
    report = QuantizationReport(method=config.method, config=config.as_dict())
    plan = None
    try:
        if config.allocation in ("rd", "rd-layer"):
            if stats is None:
                stats = collect_stats(model, calibration, progress, gram=config.error_feedback)
            layer_budgets = None
            if config.allocation == "rd-layer":
                paper = solve_budget(
                    list(shapes.values()), config.bits, "column", outlier_fraction, config.mixed
                )
                layer_budgets = paper_code_budgets(shapes, paper.code_bits, "column", config.mixed)
            distortions = rd_distortions(linears, stats, config, progress, executor)
            plan = rd_plan(
                shapes, distortions, config.bits, outlier_fraction, layer_budgets=layer_budgets
            )
            final_fraction = plan.outlier_fraction
            report.code_bits = (
                sum(float(plan.widths[n].sum()) * shapes[n].out_features for n in shapes)
                / plan.params
            )
        else:
            budget = solve_budget(
                list(shapes.values()), config.bits, config.layout, outlier_fraction, config.mixed
            )
            final_fraction = budget.outlier_fraction
            report.code_bits = budget.code_bits
    except ValueError as exc:
        raise CmpqError(str(exc)) from None
    act_fraction = min(config.outliers_act, final_fraction)
    prefix, _ = decoder_blocks(model)

    def quantize_linear(
        full_name: str, module: nn.Module, stats: ChannelStats, statistic: torch.Tensor
    ):
        weight = weight_matrix(module)
        out_features, in_features = weight.shape
        if plan is not None:
            bits = plan.widths[full_name]
        else:
            bits = paper_allocation(statistic, budget.code_bits, config.mixed)
        total = outlier_count(out_features, in_features, final_fraction)
        act = min(outlier_count(out_features, in_features, act_fraction), total)
        options = {
            "layout": config.layout,
            "act_outliers": act,
            "q_outliers": total - act,
            "iters": config.kmeans_iters,
            "seed": config.seed,
        }
        energy = stats.energy()
        if not config.error_feedback:
            return quantize_layer(weight, bits, energy, **options)
        if stats.gram is None:
            raise CmpqError(
                "error feedback needs statistics collected with gram=True "
                "(cmpq.calib.looper.collect_stats(..., gram=True))"
            )
        return quantize_layer_feedback(
            weight, bits, energy, stats.gram, damp=config.damp, label=full_name, **options
        )

    def process(index: int, block: nn.Module, block_stats: dict[str, ChannelStats]) -> None:
        linears = list(block_linears(block).items())
        statistics = {name: block_stats[name].statistic(config.statistic) for name, _ in linears}
        layers = executor.map(
            lambda item: quantize_linear(
                f"{prefix}.{index}.{item[0]}", item[1], block_stats[item[0]], statistics[item[0]]
            ),
            linears,
            cost=lambda item: weight_matrix(item[1]).numel(),
        )
        for (name, module), layer in zip(linears, layers, strict=True):
            report.channel_statistics[f"{prefix}.{index}.{name}"] = statistics[name].float()
            quantized = QuantizedLinear.from_layer(layer, module.bias)
            replace_module(block, name, quantized)
            report.add_layer(module.weight.numel(), stored_bits(quantized.stored_tensors()))

    if stats is None:
        for_each_block(
            model, calibration, process, config.sequential, progress, config.error_feedback
        )
    else:
        if config.sequential:
            raise CmpqError(
                "`stats` (precomputed statistics) cannot be used with `sequential` calibration"
            )
        _, blocks = decoder_blocks(model)
        for index, block in enumerate(tqdm(blocks, desc="blocks", disable=not progress)):
            names = block_linears(block)
            process(index, block, {name: stats[f"{prefix}.{index}.{name}"] for name in names})
    round_unquantized_to_fp16(model)
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def round_unquantized_to_fp16(model: nn.Module) -> None:
    """Round every remaining fp32 parameter (embeddings, norms, lm_head, biases) to the
    fp16 value the packed checkpoint stores, so the model in memory is the one saved."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dtype == torch.float32:
                parameter.copy_(parameter.half().float())


def rd_distortions(
    linears: dict[str, nn.Module],
    stats: dict[str, ChannelStats],
    config: CMPQConfig,
    progress: bool,
    executor: Executor,
) -> dict[str, torch.Tensor]:
    """Every column's output distortion at each candidate width, by full linear name.

    The O_act outliers the layer will keep are left out of the fits, as they
    will be at quantization time.
    """

    def distortion_of(name: str) -> torch.Tensor:
        weight = weight_matrix(linears[name]).float()
        energy = stats[name].energy()
        act = outlier_count(*weight.shape, config.outliers_act)
        keep = ~activation_outliers(weight, activation_scale(energy), act)
        distortion = column_distortions(weight, energy, keep, RD_WIDTHS, seed=config.seed)
        # relative to the layer's output energy, so a layer with loud activations does not
        # outbid the rest (summed as absolute output MSE, rd measured 4x worse than paper)
        output_energy = (energy.double() * weight.double().square().sum(0)).sum()
        return distortion / output_energy.clamp_min(1e-30)

    names = list(linears)
    with tqdm(total=len(names), desc="rd", unit="linear", disable=not progress) as bar:

        def measured(name: str) -> torch.Tensor:
            distortion = distortion_of(name)
            bar.update()
            return distortion

        def size(name: str) -> int:
            return weight_matrix(linears[name]).numel()

        return dict(zip(names, executor.map(measured, names, size), strict=True))


def quantize(
    model: nn.Module,
    config,
    calibration: torch.Tensor | None = None,
    tokenizer=None,
    progress: bool = True,
    stats: dict[str, ChannelStats] | None = None,
    executor: Executor | None = None,
) -> QuantizationReport:
    """Quantize ``model`` in place with ``config`` and return what was stored.

    CMPQ needs calibration windows: pass ``calibration`` (an int64 ``[n, seqlen]``
    token tensor), or a ``tokenizer`` to sample them from ``config.calib``.
    """
    if isinstance(config, RTNConfig):
        return quantize_rtn(model, config, progress)
    if isinstance(config, CMPQConfig):
        if calibration is None and stats is None:
            if tokenizer is None:
                raise CmpqError("CMPQ needs `calibration` windows or a `tokenizer` to sample them")
            calibration = calibration_batch(tokenizer, model, config)
        return quantize_cmpq(model, config, calibration, progress, stats, executor)
    raise TypeError(f"unsupported config type {type(config).__name__}")
