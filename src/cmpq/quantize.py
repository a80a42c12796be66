"""The public verb: ``quantize(model, config)`` transforms a model in place."""

from __future__ import annotations

import time

from torch import nn
from tqdm.auto import tqdm

from .config import RTNConfig
from .models import quantizable_linears, set_weight_matrix, weight_matrix
from .report import QuantizationReport, peak_rss_bytes
from .rtn import rtn_dequantize, rtn_quantize, rtn_stored_bits


def untie_lm_head(model: nn.Module) -> None:
    """Give the lm_head its own weight so quantizing it leaves the embedding alone."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and embed is not None and head.weight is embed.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False


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


def quantize(model: nn.Module, config, progress: bool = True, **kwargs) -> QuantizationReport:
    """Quantize ``model`` in place with ``config`` and return what was stored."""
    if isinstance(config, RTNConfig):
        return quantize_rtn(model, config, progress)
    raise TypeError(f"unsupported config type {type(config).__name__}")
