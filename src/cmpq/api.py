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
