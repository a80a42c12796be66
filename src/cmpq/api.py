"""The public verbs, over the packages that do the work.

``load_model`` takes any model spec, a cmpq output included, and hands it to
the part that loads it: :mod:`cmpq.runtime.checkpoint` for cmpq outputs,
:mod:`cmpq.models.sources` for everything else.
"""

from __future__ import annotations

from pathlib import Path

from .eval.generation import generate
from .eval.perplexity import perplexity
from .format.description import is_cmpq_output
from .models.sources import load_pretrained
from .quant.pipeline import quantize
from .runtime.checkpoint import load_quantized, save_quantized

__all__ = ["generate", "load", "load_model", "perplexity", "quantize", "save_quantized"]


def load_model(spec: str, backend: str | None = None):
    """``(model, tokenizer)`` for an alias, a checkpoint directory, a cmpq output
    directory, a ``.gguf`` file or a hub id (full-precision models in fp32).
    ``backend`` (``auto``, ``cpu``, ``triton``, ``torch``) runs a cmpq output's
    quantized linears; other models ignore it."""
    path = Path(spec).expanduser()
    if path.is_dir() and is_cmpq_output(path):
        return load_quantized(path, backend)
    return load_pretrained(spec)


def load(path, backend: str | None = None):
    """``(model, tokenizer)`` of a directory written by ``cmpq quantize``; its
    quantized linears run on ``backend`` (default ``$CMPQ_BACKEND`` or ``auto``:
    see :mod:`cmpq.runtime.backends`)."""
    return load_quantized(Path(path), backend)
