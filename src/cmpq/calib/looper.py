"""Calibration: run text through the model block by block and collect, per input
channel of every linear, the activation statistics that drive bit allocation.

The block looper (GPTQModel's idea, without its thread pools) keeps only one
block's inputs in memory: the inputs of the first block are captured once, then
each block is run on them, its linears' inputs are measured by forward hooks,
the block is handed to a callback (which quantizes it), and its outputs become
the next block's inputs. With ``sequential=True`` those outputs are recomputed
with the quantized block, so later blocks are calibrated on what they will see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.graph import block_linears, decoder_blocks, in_features
from .stats import ChannelStats


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """Inputs of one block for every calibration window, plus each block's own
    keyword arguments (masks and rotary embeddings differ by layer type in
    models such as Gemma 3, and depend only on the window length)."""

    hidden: list[torch.Tensor]
    kwargs_by_block: list[dict] = field(default_factory=list)


def capture_block_inputs(model: nn.Module, batch: torch.Tensor) -> BlockInputs:
    """Hidden states entering block 0 for each window, and every block's kwargs.

    The first window runs the whole model once to record every block's keyword
    arguments; the others stop at block 0.
    """
    _, blocks = decoder_blocks(model)
    captured = BlockInputs(hidden=[], kwargs_by_block=[{} for _ in blocks])
    stop_at_first = False

    def recorder(index: int):
        def hook(module, args, kwargs):
            if index == 0:
                hidden = args[0] if args else kwargs["hidden_states"]
                captured.hidden.append(hidden.detach())
            if len(captured.hidden) == 1:
                captured.kwargs_by_block[index] = {
                    k: v for k, v in kwargs.items() if k != "hidden_states"
                }
            if stop_at_first:
                raise _StopForward

        return hook

    handles = [
        block.register_forward_pre_hook(recorder(i), with_kwargs=True)
        for i, block in enumerate(blocks)
    ]
    try:
        with torch.inference_mode():
            for index, window in enumerate(batch):
                stop_at_first = index > 0
                try:
                    model(window.unsqueeze(0), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


WINDOWS_PER_FORWARD = 8  # calibration windows run through a block at once (one batch)


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


def run_windows(block: nn.Module, hidden: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    """``block``'s output for every window, batched by :func:`window_batches`."""
    return [
        output
        for batch in window_batches(hidden)
        for output in run_block(block, batch, kwargs).split(1)
    ]


def measure_block(
    block: nn.Module, hidden: list[torch.Tensor], kwargs: dict, gram: bool = False
) -> tuple[dict[str, ChannelStats], list[torch.Tensor]]:
    """Run ``block`` on every window, returning its linears' stats and its outputs.

    With ``gram`` each linear also accumulates its input Gram matrix; linears fed
    the same tensor (q/k/v, gate/up) share one batch's statistics and product.
    """
    linears = block_linears(block)
    stats = {name: ChannelStats.zeros(in_features(m), gram) for name, m in linears.items()}
    batch_stats: dict[int, tuple[torch.Tensor, ChannelStats]] = {}

    def measurer(name: str):
        def hook(module, args):
            x = args[0]
            if id(x) not in batch_stats:  # x is held below, so its id is not reused
                batch_stats[id(x)] = (x, ChannelStats.of(x, gram))
            stats[name].add(batch_stats[id(x)][1])

        return hook

    handles = [m.register_forward_pre_hook(measurer(name)) for name, m in linears.items()]
    outputs = []
    try:
        with torch.inference_mode():
            for batch in window_batches(hidden):
                outputs.extend(run_block(block, batch, kwargs).split(1))
                batch_stats.clear()
    finally:
        for handle in handles:
            handle.remove()
    return stats, outputs


def for_each_block(
    model: nn.Module,
    batch: torch.Tensor,
    process: Callable[[int, nn.Module, dict[str, ChannelStats]], None],
    sequential: bool = False,
    progress: bool = True,
    gram: bool = False,
) -> None:
    """Calibrate block by block, calling ``process(index, block, stats)`` for each."""
    captured = capture_block_inputs(model, batch)
    hidden = captured.hidden
    _, blocks = decoder_blocks(model)
    for index, block in enumerate(tqdm(blocks, desc="blocks", unit="block", disable=not progress)):
        kwargs = captured.kwargs_by_block[index]
        stats, outputs = measure_block(block, hidden, kwargs, gram)
        process(index, block, stats)
        if sequential:
            with torch.inference_mode():
                outputs = run_windows(block, hidden, kwargs)
        hidden = outputs


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
