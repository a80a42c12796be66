"""Where the quantizable linears are in a model, found generically.

The decoder blocks are the longest ``nn.ModuleList`` whose items share one
class, and their linears are ``nn.Linear`` and GPT-2's ``Conv1D`` inside them.
This covers Llama, Mistral, Qwen2, Gemma/Gemma3, OPT, Phi and GPT-2 without
per-architecture code.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CmpqError

try:  # transformers keeps GPT-2's transposed linear here
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    Conv1D = ()


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the longest ModuleList whose items share one class."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) == 1 and (
                best is None or len(module) > len(best[1])
            ):
                best = (name, module)
    if best is None:
        raise CmpqError(f"found no decoder blocks in {type(model).__name__}")
    return best


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The linear layers of one block, by their name inside the block."""
    return {name: module for name, module in block.named_modules() if is_linear(module)}


def quantizable_linears(model: nn.Module, include_lm_head: bool = False) -> dict[str, nn.Module]:
    """Every decoder linear by full name (and the lm_head when asked)."""
    prefix, blocks = decoder_blocks(model)
    found = {}
    for index, block in enumerate(blocks):
        for name, module in block_linears(block).items():
            found[f"{prefix}.{index}.{name}"] = module
    if include_lm_head:
        head = model.get_output_embeddings()
        if head is not None and is_linear(head):
            found["lm_head"] = head
    return found


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted path ``name`` inside ``root``."""
    parent, _, attribute = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attribute, module)


def in_features(module: nn.Module) -> int:
    return weight_matrix(module).shape[1]


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (GPT-2's Conv1D stores ``[in, out]``)."""
    weight = module.weight.data
    return weight if isinstance(module, nn.Linear) else weight.t()


def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Store an ``[out, in]`` matrix back in the module's own layout and dtype."""
    target = module.weight.data
    value = matrix if isinstance(module, nn.Linear) else matrix.t()
    target.copy_(value.to(target.dtype))


def untie_lm_head(model: nn.Module) -> None:
    """Give the lm_head its own weight so quantizing it leaves the embedding alone."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and embed is not None and head.weight is embed.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
