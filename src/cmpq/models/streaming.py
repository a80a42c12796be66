"""A checkpoint read one decoder block at a time, for models larger than memory.

The model is built with its parameters on the meta device (accelerate's
``init_empty_weights``: buffers such as rotary tables stay real). Only the
modules outside the decoder blocks that calibration runs (embeddings, final
norm) are read at once; each block's tensors are read from the checkpoint's
safetensors (one file, or shards with an index) when the block is about to run
(:meth:`CheckpointBlocks.load`) and dropped back to the meta device after
(:meth:`CheckpointBlocks.release`). Weights are read in float32 (the dtype every
other path computes in), on the device the work runs on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import CmpqError
from ..format.shards import StoredTensors
from .graph import decoder_blocks


def checkpoint_weight_files(path: Path) -> list[Path]:
    """The safetensors files of a Hugging Face checkpoint directory (its index's
    shards, or every ``*.safetensors`` in it); empty when it has none."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    return sorted(path.glob("*.safetensors"))


def _tied(model: nn.Module) -> set[str]:
    return set(getattr(model, "all_tied_weights_keys", None) or {})


class StreamedCheckpoint:
    """A checkpoint's model skeleton (blocks on the meta device), its tokenizer and
    where each of its tensors is (files are opened only while tensors are read)."""

    def __init__(self, path: Path, model: nn.Module, tokenizer, tensors: StoredTensors) -> None:
        self.path = Path(path)
        self.model = model
        self.tokenizer = tokenizer
        self.tensors = tensors
        self.prefix, self.blocks = decoder_blocks(model)

    def read(self, key: str, device=None) -> torch.Tensor:
        """Checkpoint tensor ``key`` in float32 (integer tensors as they are)."""
        return self.read_many([key], device)[key]

    def read_many(self, keys: list[str], device=None) -> dict[str, torch.Tensor]:
        """Checkpoint tensors ``keys`` in float32 (integer tensors as they are), copied
        out of the files, which are opened for this read only: a file kept open
        would keep every page read so far resident (a memory map's pages count in
        the process's memory until it is unmapped)."""
        with StoredTensors(self.tensors.files_of(keys)) as tensors:
            read = {}
            for key in keys:
                tensor = tensors.get_tensor(key)
                converted = tensor.float() if tensor.is_floating_point() else tensor
                converted = converted.to(device) if device is not None else converted
                if converted.data_ptr() == tensor.data_ptr():
                    converted = converted.clone()  # not a view of the memory map
                read[key] = converted
        return read


def open_streamed(path: Path) -> StreamedCheckpoint | None:
    """The checkpoint directory ``path`` as a :class:`StreamedCheckpoint`, or ``None``
    when it cannot be streamed (no safetensors, or tensor names that differ from
    the model's, as in checkpoints transformers renames while loading)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    files = checkpoint_weight_files(path)
    if not files:
        return None
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    with StoredTensors(files) as tensors:  # an index of names; files open only to read
        pass
    expected = set(model.state_dict()) - _tied(model)
    if not expected <= set(tensors.keys()):
        return None
    tokenizer = AutoTokenizer.from_pretrained(path)
    streamed = StreamedCheckpoint(path, model, tokenizer, tensors)
    _load_outside_blocks(streamed)
    return streamed


def _load_outside_blocks(streamed: StreamedCheckpoint) -> None:
    """Read the tensors calibration needs outside the blocks (embeddings, norms); the
    output embedding stays on the meta device unless it is tied to the input's."""
    model = streamed.model
    head = model.get_output_embeddings()
    head_names = {f"{name}.weight" for name, m in model.named_modules() if m is head}
    tied = _tied(model)
    keys = [
        key
        for key in model.state_dict()
        if not (key.startswith(f"{streamed.prefix}.") or key in tied or key in head_names)
    ]
    model.load_state_dict(streamed.read_many(keys), strict=False, assign=True)
    if tied:
        model.tie_weights()


class CheckpointBlocks:
    """Loads each block's tensors from a :class:`StreamedCheckpoint` on ``device`` and
    drops them after (the calibration looper's ``loader``)."""

    def __init__(self, streamed: StreamedCheckpoint, device: torch.device | str = "cpu") -> None:
        self.streamed = streamed
        self.device = torch.device(device)
        # buffers a block makes itself (not in the checkpoint) survive its release
        self._own_buffers = {
            index: {
                name: buffer
                for name, buffer in block.named_buffers()
                if name not in block.state_dict()
            }
            for index, block in enumerate(streamed.blocks)
        }

    def load(self, index: int, block: nn.Module) -> None:
        prefix = f"{self.streamed.prefix}.{index}."
        missing = [k for k in block.state_dict() if prefix + k not in self.streamed.tensors]
        if missing:
            raise CmpqError(f"{self.streamed.path}: the checkpoint lacks {prefix}{missing[0]}")
        read = self.streamed.read_many([prefix + k for k in block.state_dict()], self.device)
        block.load_state_dict({k[len(prefix) :]: v for k, v in read.items()}, assign=True)
        for name, buffer in self._own_buffers[index].items():
            module_name, _, attribute = name.rpartition(".")
            module = block.get_submodule(module_name) if module_name else block
            setattr(module, attribute, buffer.to(self.device))

    def release(self, index: int, block: nn.Module) -> None:
        block.to("meta")
