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


def load_model(spec: str):
    """``(model, tokenizer)`` for an alias, a checkpoint directory, a cmpq output
    directory, a ``.gguf`` file or a hub id (full-precision models in fp32)."""
    path = Path(spec).expanduser()
    if path.is_dir() and is_cmpq_output(path):
        return load_quantized(path)
    return load_pretrained(spec)


def load(path):
    """``(model, tokenizer)`` of a directory written by ``cmpq quantize``."""
    return load_quantized(Path(path))
