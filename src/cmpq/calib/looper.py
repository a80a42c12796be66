"""Calibration: run text through the model block by block and collect, per input
channel of every linear, the activation statistics that drive bit allocation.

The block looper (GPTQModel's idea, without its thread pools) keeps only one
block's inputs in memory: the inputs of the first block are captured once, then
each block is run on them, its linears' inputs are measured by forward hooks,
the block is handed to a callback (which quantizes it), and its outputs become
the next block's inputs. With ``sequential=True`` those outputs are recomputed
with the quantized block, so later blocks are calibrated on what they will see.

A ``loader`` (see :class:`BlockLoader`) puts a block's weights in place just
before it runs and takes them away after, so a model whose blocks wait on the
meta device (read from disk one at a time) or on the CPU (run on a GPU) is
calibrated with one block's weights in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.graph import block_linears, decoder_blocks, in_features
from .stats import ChannelStats


class _StopForward(Exception):
    pass


class BlockLoader(Protocol):
    """Where a block's weights come from: :meth:`load` puts them in place (on the
    device the block runs on), :meth:`release` takes them away again."""

    def load(self, index: int, block: nn.Module) -> None: ...

    def release(self, index: int, block: nn.Module) -> None: ...


class InPlace:
    """The blocks' weights are where they are: nothing to load or release."""

    def load(self, index: int, block: nn.Module) -> None:
        pass

    def release(self, index: int, block: nn.Module) -> None:
        pass


class SpillFiles:
    """Hidden states in memory-mapped files under ``directory``, for calibrations
    whose hidden states would not fit in memory: the operating system writes
    their pages out to disk and reads them back as the walk touches them.

    Each set of windows is one file, unlinked as soon as it is mapped (the
    mapping keeps it; the disk space returns with the last window's reference).
    """

    def __init__(self, directory) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._files = 0

    def windows(self, like: torch.Tensor, count: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """``count`` zeroed windows shaped like ``like``, in ``dtype``, in a new file."""
        path = self.directory / f"hidden-{os.getpid()}-{self._files}.bin"
        self._files += 1
        flat = torch.from_file(str(path), shared=True, size=like.numel() * count, dtype=dtype)
        try:
            path.unlink()
        except OSError:  # a system that cannot unlink a mapped file: removed with the directory
            pass
        return list(flat.view(count, *like.shape).unbind(0))


@dataclass
class BlockInputs:
    """Inputs of one block for every calibration window, plus each block's own
    keyword arguments (masks and rotary embeddings differ by layer type in
    models such as Gemma 3, and depend only on the window length)."""

    hidden: list[torch.Tensor]
    kwargs_by_block: list[dict] = field(default_factory=list)


def capture_block_inputs(
    model: nn.Module,
    batch: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    spill: SpillFiles | None = None,
) -> BlockInputs:
    """Hidden states entering block 0 for each window (held in ``dtype``, in
    ``spill``'s files when given), and every block's keyword arguments.

    No block runs: for the first window every block is replaced by a recorder
    that returns its input unchanged (keyword arguments depend only on the window
    length), the last one stopping the forward; later windows stop at block 0.
    So the blocks' weights may be anywhere, the meta device included; only the
    modules before the first block (embeddings, rotary tables) must hold theirs.
    """
    _, blocks = decoder_blocks(model)
    captured = BlockInputs(hidden=[], kwargs_by_block=[{} for _ in blocks])
    first_window, window_index = True, 0

    def recorder(index: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0 and spill is None:
                captured.hidden.append(hidden.detach().to(dtype))
            elif index == 0:
                if not captured.hidden:
                    captured.hidden = spill.windows(hidden, len(batch), dtype)
                captured.hidden[window_index].copy_(hidden.detach())
            if first_window:
                captured.kwargs_by_block[index] = {
                    k: v for k, v in kwargs.items() if k != "hidden_states"
                }
            if not first_window or index == len(blocks) - 1:
                raise _StopForward
            return hidden

        return forward

    for index, block in enumerate(blocks):
        block.forward = recorder(index)  # an instance attribute shadows the class's forward
    try:
        with torch.inference_mode():
            for window_index, window in enumerate(batch):
                first_window = window_index == 0
                try:
                    model(window.unsqueeze(0), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for block in blocks:
            del block.forward
    return captured


WINDOWS_PER_FORWARD = 8  # calibration windows run through a block at once (one batch) at most
# ... and fewer when one [tokens, widest linear input] float32 activation would exceed this
WINDOW_BATCH_BYTES = 64 << 20


def windows_per_forward(block: nn.Module, window_tokens: int) -> int:
    """How many windows go through ``block`` at once: :data:`WINDOWS_PER_FORWARD`,
    fewer for wide blocks, so a batch's activations stay within about
    :data:`WINDOW_BATCH_BYTES` per tensor (an 8B-wide MLP at 512 tokens: 2)."""
    widest = max((in_features(m) for m in block_linears(block).values()), default=1)
    fitting = WINDOW_BATCH_BYTES // max(1, window_tokens * widest * 4)
    return max(1, min(WINDOWS_PER_FORWARD, fitting))


def block_device(block: nn.Module) -> torch.device:
    """Where ``block`` runs: the device of its first parameter (or buffer)."""
    for tensor in (*block.parameters(), *block.buffers()):
        return tensor.device
    return torch.device("cpu")


def map_tensors(value, fn):
    """``value`` (a tensor, or tuples, lists and dicts of them) with ``fn`` applied to
    each tensor."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple | list):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def on_device(value, device: torch.device):
    """``value`` (a tensor, or tuples, lists and dicts of them) on ``device``."""
    return map_tensors(value, lambda tensor: tensor.to(device))


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    output = block(hidden, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def window_batches(hidden: list[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """The windows, ``size`` at a time (:func:`windows_per_forward`), as one batch each.

    The windows share one length, so the keyword arguments recorded for one
    window (masks, rotary tables) broadcast over a batch; on two cores a batch
    of 8 runs a small block's matrix products faster than 8 single windows.
    """
    for start in range(0, len(hidden), size):
        yield torch.cat(hidden[start : start + size])


def _block_outputs(
    block: nn.Module,
    hidden: list[torch.Tensor],
    kwargs: dict,
    before_batch: Callable,
    spill: SpillFiles | None = None,
) -> list[torch.Tensor]:
    """``block``'s output for every window, batched by :func:`windows_per_forward`: computed
    in float32 on the block's device, held like the inputs (their dtype, the CPU,
    in ``spill``'s files when given)."""
    device = block_device(block)
    kwargs = on_device(kwargs, device)
    dtype = hidden[0].dtype
    outputs = [] if spill is None else spill.windows(hidden[0], len(hidden), dtype)
    done = 0
    size = windows_per_forward(block, hidden[0].shape[-2])
    for batch in window_batches(hidden, size):
        before_batch()
        output = run_block(block, batch.to(device, torch.float32), kwargs)
        if spill is None:
            outputs.extend(output.to("cpu", dtype).split(1))
        else:
            for window in output.split(1):
                outputs[done].copy_(window)
                done += 1
    return outputs


def run_windows(
    block: nn.Module, hidden: list[torch.Tensor], kwargs: dict, spill: SpillFiles | None = None
) -> list[torch.Tensor]:
    """``block``'s output for every window, batched by :func:`windows_per_forward`."""
    with torch.inference_mode():
        return _block_outputs(block, hidden, kwargs, lambda: None, spill)


def measure_block(
    block: nn.Module,
    hidden: list[torch.Tensor],
    kwargs: dict,
    gram: bool = False,
    spill: SpillFiles | None = None,
) -> tuple[dict[str, ChannelStats], list[torch.Tensor]]:
    """Run ``block`` on every window, returning its linears' stats and its outputs
    (in ``spill``'s files when given).

    With ``gram`` each linear also accumulates its input Gram matrix. Linears fed
    the same tensor (q/k/v, gate/up) share one :class:`ChannelStats` object: its
    statistics and Gram matrix are computed and held once.
    """
    linears = block_linears(block)
    stats: dict[str, ChannelStats] = {}
    batch_stats: dict[int, tuple[torch.Tensor, str]] = {}  # input id: (input, first linear)

    def measurer(name: str):
        def hook(module, args):
            x = args[0]
            if id(x) not in batch_stats:  # x is held below, so its id is not reused
                batch_stats[id(x)] = (x, name)
                if name not in stats:
                    stats[name] = ChannelStats.zeros(in_features(module), gram, x.device)
                stats[name].update(x)
            elif name not in stats:  # fed the tensor of an earlier linear: share its stats
                stats[name] = stats[batch_stats[id(x)][1]]

        return hook

    handles = [m.register_forward_pre_hook(measurer(name)) for name, m in linears.items()]
    try:
        with torch.inference_mode():
            outputs = _block_outputs(block, hidden, kwargs, batch_stats.clear, spill)
    finally:
        for handle in handles:
            handle.remove()
    return {name: stats[name] for name in linears}, outputs


@dataclass(frozen=True)
class BlockIO:
    """One block's calibration inputs (per window), its keyword arguments, and the
    outputs it gave when walked (before its linears were quantized)."""

    hidden: list[torch.Tensor]
    kwargs: dict
    outputs: list[torch.Tensor]


@dataclass
class BlockWalk:
    """Where a walk over the blocks stands: the next block's index and its inputs."""

    index: int
    hidden: list[torch.Tensor]


def walk_blocks(
    model: nn.Module,
    inputs: BlockInputs,
    process: Callable[[int, nn.Module, dict[str, ChannelStats]], None],
    *,
    sequential: bool = False,
    progress: bool = True,
    gram: bool = False,
    loader: BlockLoader | None = None,
    start: BlockWalk | None = None,
    after_block: Callable[[BlockWalk], None] | None = None,
    desc: str = "blocks",
    spill: SpillFiles | None = None,
    io: bool = False,
) -> None:
    """Calibrate block by block, calling ``process(index, block, stats)`` for each
    (with ``io``: ``process(index, block, stats, BlockIO(...))``, the block's inputs
    and the outputs it gave before ``process``).

    ``loader`` puts each block's weights in place before it runs and releases them
    after; ``start`` resumes a walk (its inputs are those of block ``start.index``);
    ``after_block`` sees where the walk stands after each block (to save it);
    ``spill`` holds each block's outputs in memory-mapped files instead of memory.
    """
    loader = InPlace() if loader is None else loader
    _, blocks = decoder_blocks(model)
    walk = start or BlockWalk(0, inputs.hidden)
    bar = tqdm(total=len(blocks), initial=walk.index, desc=desc, unit="block", disable=not progress)
    with bar:
        for index in range(walk.index, len(blocks)):
            block = blocks[index]
            kwargs = inputs.kwargs_by_block[index]
            loader.load(index, block)
            stats, outputs = measure_block(block, walk.hidden, kwargs, gram, spill)
            if io:
                process(index, block, stats, BlockIO(walk.hidden, kwargs, outputs))
            else:
                process(index, block, stats)
            if sequential:
                outputs = run_windows(block, walk.hidden, kwargs, spill)
            loader.release(index, block)
            walk = BlockWalk(index + 1, outputs)
            if after_block is not None:
                after_block(walk)
            bar.update()


def for_each_block(
    model: nn.Module,
    batch: torch.Tensor,
    process: Callable[[int, nn.Module, dict[str, ChannelStats]], None],
    sequential: bool = False,
    progress: bool = True,
    gram: bool = False,
) -> None:
    """Calibrate block by block, calling ``process(index, block, stats)`` for each."""
    inputs = capture_block_inputs(model, batch)
    walk_blocks(model, inputs, process, sequential=sequential, progress=progress, gram=gram)


def collect_stats(
    model: nn.Module, batch: torch.Tensor, progress: bool = False, gram: bool = False
) -> dict:
    """Statistics of every decoder linear of the full-precision model, by full name."""
    prefix, _ = decoder_blocks(model)
    collected: dict[str, ChannelStats] = {}

    def keep(index: int, block: nn.Module, stats: dict[str, ChannelStats]) -> None:
        for name, value in stats.items():
            collected[f"{prefix}.{index}.{name}"] = value

    for_each_block(model, batch, keep, progress=progress, gram=gram)
    return collected
