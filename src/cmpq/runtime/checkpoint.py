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
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CmpqError
from ..format.checkpoint import (
    check_free_space,
    is_disk_full,
    packed_state_dict,
    staged_directory,
)
from ..format.description import cmpq_quantization_config, read_description
from ..format.shards import write_weights
from ..format.spec import DESCRIPTION_FILE, FORMAT_VERSION, QUANT_METHOD, STATS_FILE, STORED_NAMES
from ..models.graph import block_linears, replace_module, weight_matrix
from ..models.sources import LOAD_ERRORS, load_checkpoint
from .backends import check_backend_name, default_backend
from .embeddings import EMBEDDING_DTYPES, hold_embeddings_in
from .hf import tied_keys
from .qlinear import QuantizedLinear, quantized_layers, set_backend


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


def packed_tensor_sizes(state_dict, tied) -> dict[str, int]:
    """Bytes of every tensor a packed output stores (fp32 ones are stored in fp16),
    from shapes alone: meta tensors (blocks already written, weights not read) count."""
    sizes = {}
    for key, value in state_dict.items():
        if key in tied:
            continue
        size = 2 if value.dtype == torch.float32 else value.element_size()
        sizes[key] = value.numel() * size
    return sizes


def save_quantized(
    model,
    tokenizer,
    report,
    out: Path,
    overwrite: bool = False,
    max_shard_size: int | None = None,
    fetch=None,
) -> Path:
    """Write a quantized ``model`` (with its ``tokenizer`` and the
    :class:`~cmpq.quant.report.QuantizationReport` ``report``) to ``out``.

    The weights go in one file, or in shards of at most ``max_shard_size`` bytes
    with an index (:mod:`cmpq.format.shards`). ``fetch(key)`` gives the tensors the
    model holds on the meta device (blocks written as they were quantized,
    weights never read), one shard in memory at a time.
    """
    out = Path(out)
    quantized = quantized_layers(model)
    if not quantized:
        return _save_dequantized(model, tokenizer, report, out, overwrite)
    state_dict = model.state_dict()
    tied = tied_keys(model)
    sizes = packed_tensor_sizes(state_dict, tied)
    in_memory = packed_state_dict({k: v for k, v in state_dict.items() if not v.is_meta}, tied)

    def tensor(key: str) -> torch.Tensor:
        if key in in_memory:
            return in_memory[key]
        value = fetch(key)
        return value.half() if value.dtype == torch.float32 else value

    stats = {
        name: statistic.float().contiguous()
        for name, statistic in report.channel_statistics.items()
        if name in quantized
    }
    check_free_space(out, sum(sizes.values()) + _nbytes(stats) + tokenizer_bytes(tokenizer))
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
        write_weights(staging, sizes, tensor, max_shard_size)
        if stats:
            save_file(stats, str(staging / STATS_FILE))
    return out


class BlockFiles:
    """Each quantized block's stored tensors in a file of its own under ``directory``
    (the pipeline's ``sink`` when a model is written as it is quantized)."""

    def __init__(self, directory: Path, prefix: str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix

    def file(self, index: int) -> Path:
        return self.directory / f"block-{index:05d}.safetensors"

    def write(self, index: int, block) -> None:
        prefix = f"{self.prefix}.{index}."
        tensors = packed_state_dict({prefix + k: v for k, v in block.state_dict().items()})
        partial = self.file(index).with_suffix(".partial")
        try:
            save_file(tensors, str(partial), {"format": "cmpq"})
        except Exception as exc:
            partial.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise CmpqError(
                    f"the disk filled up while writing block {index} to {self.directory}; the "
                    "blocks before it are kept: free some space and run again with `resume`"
                ) from None
            raise
        partial.replace(self.file(index))

    def restore(self, index: int, block, layout: str) -> None:
        """Put in ``block`` (on the meta device) the quantized linears an earlier run
        wrote to block ``index``'s file, so the model describes what is stored."""
        prefix = f"{self.prefix}.{index}."
        with safe_open(str(self.file(index)), framework="pt") as handle:
            keys = set(handle.keys())
            for name, module in block_linears(block).items():
                stored = {
                    n: handle.get_tensor(f"{prefix}{name}.{n}")
                    for n in STORED_NAMES
                    if f"{prefix}{name}.{n}" in keys
                }
                bias_key = f"{prefix}{name}.bias"
                bias = handle.get_tensor(bias_key).float() if bias_key in keys else None
                out_features, in_features = weight_matrix(module).shape
                restored = QuantizedLinear(stored, out_features, in_features, layout, bias)
                replace_module(block, name, restored)
        block.to("meta")

    def tensor(self, key: str) -> torch.Tensor | None:
        """Stored tensor ``key`` from its block's file (``None``: not a block tensor)."""
        if not key.startswith(f"{self.prefix}."):
            return None
        index = int(key[len(self.prefix) + 1 :].split(".")[0])
        with safe_open(str(self.file(index)), framework="pt") as handle:
            return handle.get_tensor(key)


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
