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

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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


@dataclass
class BlockInputs:
    """Inputs of one block for every calibration window, plus each block's own
    keyword arguments (masks and rotary embeddings differ by layer type in
    models such as Gemma 3, and depend only on the window length)."""

    hidden: list[torch.Tensor]
    kwargs_by_block: list[dict] = field(default_factory=list)


def capture_block_inputs(
    model: nn.Module, batch: torch.Tensor, dtype: torch.dtype = torch.float32
) -> BlockInputs:
    """Hidden states entering block 0 for each window (held in ``dtype``), and every
    block's keyword arguments.

    No block runs: for the first window every block is replaced by a recorder
    that returns its input unchanged (keyword arguments depend only on the window
    length), the last one stopping the forward; later windows stop at block 0.
    So the blocks' weights may be anywhere, the meta device included; only the
    modules before the first block (embeddings, rotary tables) must hold theirs.
    """
    _, blocks = decoder_blocks(model)
    captured = BlockInputs(hidden=[], kwargs_by_block=[{} for _ in blocks])
    first_window = True

    def recorder(index: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                captured.hidden.append(hidden.detach().to(dtype))
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
            for index, window in enumerate(batch):
                first_window = index == 0
                try:
                    model(window.unsqueeze(0), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for block in blocks:
            del block.forward
    return captured


WINDOWS_PER_FORWARD = 8  # calibration windows run through a block at once (one batch)


def block_device(block: nn.Module) -> torch.device:
    """Where ``block`` runs: the device of its first parameter (or buffer)."""
    for tensor in (*block.parameters(), *block.buffers()):
        return tensor.device
    return torch.device("cpu")


def on_device(value, device: torch.device):
    """``value`` (a tensor, or tuples, lists and dicts of them) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(on_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: on_device(v, device) for k, v in value.items()}
    return value


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    output = block(hidden, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def window_batches(hidden: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The windows, :data:`WINDOWS_PER_FORWARD` at a time, as one batch each.

    The windows share one length, so the keyword arguments recorded for one
    window (masks, rotary tables) broadcast over a batch; on two cores a batch
    of 8 runs a block's matrix products faster than 8 single windows.
    """
    for start in range(0, len(hidden), WINDOWS_PER_FORWARD):
        yield torch.cat(hidden[start : start + WINDOWS_PER_FORWARD])


def _block_outputs(
    block: nn.Module, hidden: list[torch.Tensor], kwargs: dict, before_batch: Callable
) -> list[torch.Tensor]:
    """``block``'s output for every window, batched by :func:`window_batches`: computed
    in float32 on the block's device, held like the inputs (their dtype, the CPU)."""
    device = block_device(block)
    kwargs = on_device(kwargs, device)
    outputs = []
    for batch in window_batches(hidden):
        before_batch()
        output = run_block(block, batch.to(device, torch.float32), kwargs)
        outputs.extend(output.to("cpu", hidden[0].dtype).split(1))
    return outputs


def run_windows(block: nn.Module, hidden: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    """``block``'s output for every window, batched by :func:`window_batches`."""
    with torch.inference_mode():
        return _block_outputs(block, hidden, kwargs, lambda: None)


def measure_block(
    block: nn.Module, hidden: list[torch.Tensor], kwargs: dict, gram: bool = False
) -> tuple[dict[str, ChannelStats], list[torch.Tensor]]:
    """Run ``block`` on every window, returning its linears' stats and its outputs.

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
            outputs = _block_outputs(block, hidden, kwargs, batch_stats.clear)
    finally:
        for handle in handles:
            handle.remove()
    return {name: stats[name] for name in linears}, outputs


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
) -> None:
    """Calibrate block by block, calling ``process(index, block, stats)`` for each.

    ``loader`` puts each block's weights in place before it runs and releases them
    after; ``start`` resumes a walk (its inputs are those of block ``start.index``);
    ``after_block`` sees where the walk stands after each block (to save it).
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
            stats, outputs = measure_block(block, walk.hidden, kwargs, gram)
            process(index, block, stats)
            if sequential:
                outputs = run_windows(block, walk.hidden, kwargs)
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
