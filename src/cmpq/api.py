"""The public verbs, over the packages that do the work.

``load_model`` takes any model spec, a cmpq output included, and hands it to
the part that loads it: :mod:`cmpq.runtime.checkpoint` for cmpq outputs,
:mod:`cmpq.models.sources` for everything else.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .alloc.size import bits_for_size, estimated_packed_bytes
from .config import CMPQConfig
from .errors import CmpqError
from .eval.generation import generate
from .eval.perplexity import perplexity
from .format.checkpoint import check_free_space, check_output_dir
from .format.description import is_cmpq_output
from .memory import available_memory_bytes
from .models.devices import resolve_device
from .models.sources import load_pretrained, local_checkpoint
from .models.streaming import open_streamed
from .quant.executor import EXECUTORS, RayExecutor, ThreadExecutor, make_executor
from .quant.pipeline import quantize
from .quant.report import QuantizationReport
from .quant.streamed import quantize_streamed
from .runtime.checkpoint import (
    dense_checkpoint_bytes,
    load_quantized,
    save_quantized,
    tokenizer_bytes,
)

__all__ = [
    "EXECUTORS",
    "RayExecutor",
    "ThreadExecutor",
    "generate",
    "load",
    "load_model",
    "make_executor",
    "perplexity",
    "quantize",
    "quantize_checkpoint",
    "save_quantized",
]


def load_model(spec: str, backend: str | None = None, embedding_dtype: str = "bfloat16"):
    """``(model, tokenizer)`` for an alias, a checkpoint directory, a cmpq output
    directory, a ``.gguf`` file or a hub id (full-precision models in fp32).
    ``backend`` and ``embedding_dtype`` apply to cmpq outputs (see :func:`load`);
    other models ignore them."""
    path = Path(spec).expanduser()
    if path.is_dir() and is_cmpq_output(path):
        return load_quantized(path, backend, embedding_dtype)
    return load_pretrained(spec)


def load(path, backend: str | None = None, embedding_dtype: str = "bfloat16"):
    """``(model, tokenizer)`` of a directory written by ``cmpq quantize``. Its
    quantized linears run on ``backend`` (default ``$CMPQ_BACKEND`` or ``auto``:
    see :mod:`cmpq.runtime.backends`); its embeddings and ``lm_head`` are held in
    ``embedding_dtype`` (``bfloat16``, half the memory of ``float32`` and the
    faster of the two here; ``float32`` for the exact stored values)."""
    return load_quantized(Path(path), backend, embedding_dtype)


# Peak memory of model tuning per parameter of the model: its fp32 weights, the
# quantized model, each table's positions and one window's activations and gradients.
# Measured (issue 18): `cmpq quantize smollm2-135m --bits 2.5` 26 bytes (3.56 GB);
# benchmark processes, which also hold the calibration statistics, 31-33 on smollm2-135m
# and 27 on gemma3-270m; rounded up past the largest.
MODEL_TUNING_BYTES_PER_PARAMETER = 36


def fits_model_tuning(model) -> bool:
    """Whether tuning ``model`` (a skeleton will do: parameters on the meta device)
    whole should fit in the memory available now."""
    parameters = sum(p.numel() for p in model.parameters())
    return parameters * MODEL_TUNING_BYTES_PER_PARAMETER <= available_memory_bytes()


def quantize_checkpoint(
    spec: str,
    out,
    config,
    *,
    max_bytes: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    max_shard_size: int | None = None,
    device: str | None = "cpu",
    executor=None,
    progress: bool = True,
    hidden_dtype: str = "float32",
) -> QuantizationReport:
    """Quantize the model ``spec`` with ``config`` and write it to ``out``.

    A local safetensors checkpoint (an alias, a Hugging Face checkpoint directory)
    is read one decoder block at a time and written as it goes, so memory holds
    one block (:mod:`cmpq.quant.streamed`); an interrupted run continues with
    ``resume``. Anything else (a ``.gguf``, a hub id, RTN, ``tune_model``, which
    tunes the whole quantized model at once, ``allocation`` rd-fisher, whose
    backward pass runs the whole model) is loaded whole. ``tune_model`` auto
    tunes (at or under 2.75 bits) a local checkpoint only when tuning it whole fits
    in the memory available (:func:`fits_model_tuning`) and ``resume`` is not asked.
    ``max_bytes`` replaces ``config.bits`` by the bits that fill that many bytes;
    ``max_shard_size`` (bytes) splits the weights into shards with an index;
    ``device`` is where the work runs (``cpu``, ``cuda``, ``cuda:N``, ``auto``);
    ``executor`` runs the per-linear work (default: this machine's threads);
    ``hidden_dtype`` (``float32``, ``bfloat16``, ``float16``) holds the calibration
    hidden states between blocks (bfloat16: half their memory, not exact).
    """
    out = Path(out)
    device = resolve_device(device)
    check_output_dir(out, overwrite)
    cmpq = isinstance(config, CMPQConfig)
    if max_bytes is not None and not cmpq:
        raise CmpqError("`max_size` replaces `bits` and works with CMPQ only")
    path = local_checkpoint(spec) if cmpq else None
    streamed = open_streamed(path) if path is not None else None
    if streamed is None and resume:
        raise CmpqError(
            "`resume` needs a local safetensors checkpoint (an alias or a checkpoint "
            f"directory) quantized with CMPQ; {spec} is loaded whole"
        )
    model, tokenizer = (
        (streamed.model, streamed.tokenizer) if streamed is not None else load_pretrained(spec)
    )
    if max_bytes is not None:
        config = dataclasses.replace(config, bits=bits_for_size(model, max_bytes))
    if cmpq and config.tune_model is None:  # auto: tuned when the model can be held whole
        whole = streamed is None or (not resume and fits_model_tuning(model))
        config = config.with_model_tuning(whole)
    if cmpq and config.needs_whole_model and streamed is not None:
        if resume:
            raise CmpqError(
                "`resume` cannot continue a run with `tune_model` or `allocation` rd-fisher "
                "(they load the model whole)"
            )
        streamed = None
        model, tokenizer = load_pretrained(spec)
    weights = estimated_packed_bytes(model, config.bits) if cmpq else dense_checkpoint_bytes(model)
    check_free_space(out, weights + tokenizer_bytes(tokenizer))
    if streamed is not None:
        return quantize_streamed(
            streamed,
            config,
            out,
            overwrite=overwrite,
            resume=resume,
            max_shard_size=max_shard_size,
            device=device,
            executor=executor,
            progress=progress,
            hidden_dtype=hidden_dtype,
        )
    report = quantize(
        model,
        config,
        tokenizer=tokenizer,
        progress=progress,
        executor=executor,
        device=device,
        hidden_dtype=hidden_dtype,
    )
    save_quantized(model, tokenizer, report, out, overwrite, max_shard_size)
    return report
