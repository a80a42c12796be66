"""Quantized models to output directories and back.

Two formats (the description's field ``format``; every field in docs/format.md):

- ``packed`` (CMPQ): ``model.safetensors`` holds, for every quantized linear,
  only its stored tensors and, for everything else, the original parameters
  in fp16; ``config.json`` carries the description as ``quantization_config``,
  so that ``AutoModelForCausalLM.from_pretrained`` loads it once cmpq is
  imported (:mod:`cmpq.runtime.hf`). Beside it, ``channel_stats.safetensors``
  holds the float32 per-input-channel activation statistic that drove the
  allocation (informational: ``cmpq inspect`` draws it; never loaded with the
  model, never counted in its bits);
- ``dequantized`` (RTN): a Hugging Face checkpoint holding the de-quantized
  weights, plus ``cmpq.json`` with the description.

Writing goes through :func:`cmpq.format.checkpoint.staged_directory`: checked,
sized against the free space, renamed into place only when complete.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import CmpqError
from ..format.checkpoint import check_free_space, packed_state_dict, staged_directory
from ..format.description import cmpq_quantization_config, read_description
from ..format.spec import DESCRIPTION_FILE, FORMAT_VERSION, QUANT_METHOD, STATS_FILE, WEIGHTS_FILE
from ..models.sources import LOAD_ERRORS, load_checkpoint
from .backends import check_backend_name, default_backend
from .embeddings import EMBEDDING_DTYPES, hold_embeddings_in
from .hf import tied_keys
from .qlinear import quantized_layers, set_backend


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def dense_checkpoint_bytes(model) -> int:
    """What ``save_pretrained`` writes for the model's weights, about."""
    return _nbytes(model.state_dict())


def tokenizer_bytes(tokenizer) -> int:
    """The size of the files the tokenizer was loaded from (what ``save_pretrained``
    writes again, about; 0 when it was not loaded from a local directory)."""
    source = Path(getattr(tokenizer, "name_or_path", "") or "")
    if not source.is_dir():
        return 0
    names = (
        "tokenizer*",
        "special_tokens_map.json",
        "vocab*",
        "merges*",
        "*.model",
        "chat_template*",
    )
    return sum(f.stat().st_size for pattern in names for f in source.glob(pattern) if f.is_file())


def save_quantized(model, tokenizer, report, out: Path, overwrite: bool = False) -> Path:
    """Write a quantized ``model`` (with its ``tokenizer`` and the
    :class:`~cmpq.quant.report.QuantizationReport` ``report``) to ``out``."""
    out = Path(out)
    quantized = quantized_layers(model)
    if not quantized:
        return _save_dequantized(model, tokenizer, report, out, overwrite)
    tensors = packed_state_dict(model.state_dict(), tied_keys(model))
    stats = {
        name: statistic.float().contiguous()
        for name, statistic in report.channel_statistics.items()
        if name in quantized
    }
    check_free_space(out, _nbytes(tensors) + _nbytes(stats) + tokenizer_bytes(tokenizer))
    layers = {
        name: {
            "out_features": m.out_features,
            "in_features": m.in_features,
            "layout": m.layout,
            "bias": m.bias is not None,
        }
        for name, m in quantized.items()
    }
    description = {
        "format_version": FORMAT_VERSION,
        "format": "packed",
        **report.stored_dict(),
        "layers": layers,
    }
    config = copy.deepcopy(model.config)  # the model itself stays unchanged
    config.quantization_config = {"quant_method": QUANT_METHOD, **description}
    with staged_directory(out, overwrite) as staging:
        config.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_file(tensors, str(staging / WEIGHTS_FILE), {"format": "cmpq"})
        if stats:
            save_file(stats, str(staging / STATS_FILE))
    return out


def _save_dequantized(model, tokenizer, report, out: Path, overwrite: bool) -> Path:
    check_free_space(out, dense_checkpoint_bytes(model) + tokenizer_bytes(tokenizer))
    description = {
        "format_version": FORMAT_VERSION,
        "format": "dequantized",
        **report.stored_dict(),
    }
    with staged_directory(out, overwrite) as staging:
        model.save_pretrained(staging)
        (staging / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n")
        tokenizer.save_pretrained(staging)
    return out


def load_quantized(
    path: Path,
    backend: str | None = None,
    embedding_dtype: str = "bfloat16",
    with_tokenizer: bool = True,
):
    """Load a cmpq output directory as ``(model, tokenizer)``: its quantized linears
    run on ``backend`` (default: ``$CMPQ_BACKEND`` or ``auto``), its embeddings and
    ``lm_head`` are held in ``embedding_dtype`` (``bfloat16`` or ``float32``; see
    :mod:`cmpq.runtime.embeddings`). Without ``with_tokenizer`` the tokenizer is
    ``None`` (a packed output's model alone, as a memory benchmark needs it)."""
    path = Path(path)
    backend = check_backend_name(backend) if backend is not None else default_backend()
    if embedding_dtype not in EMBEDDING_DTYPES:
        choices = ", ".join(EMBEDDING_DTYPES)
        raise CmpqError(f"`embedding_dtype` must be one of {choices}, got {embedding_dtype!r}")
    description = read_description(path)
    if description.get("format") != "packed":
        return load_checkpoint(str(path), {})
    model, tokenizer = _load_packed(path, with_tokenizer)
    set_backend(model, backend)
    hold_embeddings_in(model, EMBEDDING_DTYPES[embedding_dtype])
    return model, tokenizer


def _load_packed(path: Path, with_tokenizer: bool = True):
    """Load through ``AutoModelForCausalLM.from_pretrained``: the quantizer cmpq
    registers (:mod:`cmpq.runtime.hf`) checks the stored tensors and builds the modules."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # a packed description anywhere else (a hand-made cmpq.json) would let transformers
    # build the plain model with random linears
    if not cmpq_quantization_config(path):
        raise CmpqError(f"{path}/config.json has no cmpq quantization_config")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path) if with_tokenizer else None
    except CmpqError as exc:
        raise CmpqError(f"{path} is not a readable cmpq checkpoint: {exc}") from None
    except LOAD_ERRORS as exc:  # missing, truncated or garbled files
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CmpqError(f"{path} is not a readable cmpq checkpoint: {first}") from None
    return model.eval(), tokenizer
