"""Embeddings and ``lm_head`` of a loaded quantized model, held compactly.

They are not quantized and, in a small model, hold most of its bytes
(smollm2-135m: 28 M of 135 M parameters; gemma3-270m: 168 M of 268 M). The
file stores them in fp16; float32 would double that in memory. bfloat16 halves
it again against float32 and is the fastest dtype for them on the CPUs
measured (``benchmarks/results/runtime-*``), so :func:`hold_embeddings_in`
keeps their weights in ``dtype`` and hands float32 on: the embedding's output
and the logits are float32, everything between runs as before.
"""

from __future__ import annotations

import torch

EMBEDDING_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _to_float32(module, inputs, output):
    return output.float()


def hold_embeddings_in(model, dtype: torch.dtype) -> None:
    """Keep ``model``'s input embeddings and output projection (tied or not) in ``dtype``."""
    if dtype == torch.float32:
        return
    embedding = model.get_input_embeddings()
    embedding.weight.data = embedding.weight.data.to(dtype)
    embedding.register_forward_hook(_to_float32)
    head = model.get_output_embeddings()
    if head is None:
        return
    head.weight.data = head.weight.data.to(dtype)  # a tied head shares the converted weight
    if getattr(head, "bias", None) is not None:
        head.bias.data = head.bias.data.to(dtype)
    head.register_forward_pre_hook(lambda module, args: (args[0].to(dtype), *args[1:]))
    head.register_forward_hook(_to_float32)
