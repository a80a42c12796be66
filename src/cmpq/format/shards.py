"""Weights in one safetensors file or in shards with an index, read and written alike.

An output's weights are ``model.safetensors`` when they fit in one shard, or
``model-00001-of-0000N.safetensors`` … with ``model.safetensors.index.json``
(Hugging Face's layout: ``{"metadata": {"total_size": …}, "weight_map":
{tensor: file}}``) when they do not. Which tensors go in which shard depends
only on the tensors and the shard size: names in natural order (``layers.2``
before ``layers.10``), a new shard whenever the next tensor would overflow
the current one; so a model written as it is quantized, block by block, and
the same model saved from memory are the same files, byte for byte.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CmpqError
from .spec import WEIGHTS_FILE

INDEX_FILE = WEIGHTS_FILE + ".index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3  # a shard is held in memory while it is written
FILE_METADATA = {"format": "cmpq"}


def natural_key(name: str) -> list:
    """``layers.2`` before ``layers.10``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def shard_plan(sizes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards: natural order, a new shard whenever the next
    tensor would take the current one past ``max_shard_bytes`` (a larger tensor
    gets a shard of its own)."""
    shards: list[list[str]] = []
    used = 0
    for name in sorted(sizes, key=natural_key):
        if not shards or (used + sizes[name] > max_shard_bytes and shards[-1]):
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    return shards


def shard_file(number: int, count: int) -> str:
    return WEIGHTS_FILE if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"


def write_weights(
    directory: Path,
    sizes: Mapping[str, int],
    tensor: Callable[[str], torch.Tensor],
    max_shard_bytes: int | None = None,
) -> list[Path]:
    """Write the tensors named in ``sizes`` (their bytes) into ``directory``, one shard
    in memory at a time (``tensor(name)`` gives each as it is needed); the index
    too when there is more than one shard. Returns the files written."""
    plan = shard_plan(sizes, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    written = []
    for number, names in enumerate(plan, start=1):
        path = Path(directory) / shard_file(number, len(plan))
        save_file({name: tensor(name) for name in names}, str(path), FILE_METADATA)
        written.append(path)
    if len(plan) > 1:
        weight_map = {
            name: shard_file(n, len(plan)) for n, names in enumerate(plan, 1) for name in names
        }
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (Path(directory) / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return written


def write_tensors(
    directory: Path, tensors: Mapping[str, torch.Tensor], max_shard_bytes: int | None = None
) -> list[Path]:
    """:func:`write_weights` of tensors already in memory."""
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    return write_weights(directory, sizes, tensors.__getitem__, max_shard_bytes)


def weight_files(directory: Path) -> list[Path]:
    """The weight files of an output: its one file, or every shard its index names."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CmpqError(f"{index} is not a readable shard index ({exc})") from None
        return [directory / name for name in sorted(set(weight_map.values()))]
    return [directory / WEIGHTS_FILE]


class StoredTensors:
    """The tensors of several safetensors files read as one (``keys``, ``get_tensor``,
    ``get_slice``, like one ``safe_open`` handle); a context manager."""

    def __init__(self, files: Iterable[Path]) -> None:
        self.files = [Path(f) for f in files]
        self._stack = ExitStack()
        self._where: dict[str, object] = {}
        self._file: dict[str, Path] = {}

    def files_of(self, keys: Iterable[str]) -> list[Path]:
        """The files holding ``keys`` (names known from an earlier opening)."""
        wanted = {self._file[key] for key in keys}
        return [path for path in self.files if path in wanted]

    def __enter__(self) -> StoredTensors:
        for path in self.files:
            try:
                handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
            except SafetensorError as exc:
                self._stack.close()
                raise CmpqError(f"{path.name} is not a readable safetensors file: {exc}") from None
            for key in handle.keys():
                self._where[key] = handle
                self._file[key] = path
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get_tensor(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)

    def get_slice(self, key: str):
        return self._where[key].get_slice(key)


def open_weights(directory: Path) -> StoredTensors:
    """Every weight of an output directory, sharded or not."""
    return StoredTensors(weight_files(directory))
