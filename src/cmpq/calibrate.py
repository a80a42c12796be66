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

from .models import block_linears, decoder_blocks, in_features

STATISTICS = ("l2", "mean_abs", "max_abs")


@dataclass
class ChannelStats:
    """Per input channel: sum of x², sum of |x|, max |x|, and the token count.

    float64 accumulators: 65k tokens of activations in the hundreds would lose
    the small channels' contribution in float32. Each update's own sums (one
    batch, a few thousand tokens) are float32, exact to ~1e-7.
    """

    sum_sq: torch.Tensor
    sum_abs: torch.Tensor
    max_abs: torch.Tensor
    tokens: int = 0
    gram: torch.Tensor | None = None  # [in, in] sum of x xᵀ, for error feedback

    @classmethod
    def zeros(cls, channels: int, gram: bool = False) -> ChannelStats:
        return cls(
            torch.zeros(channels, dtype=torch.float64),
            torch.zeros(channels, dtype=torch.float64),
            torch.zeros(channels, dtype=torch.float32),
            gram=torch.zeros(channels, channels, dtype=torch.float64) if gram else None,
        )

    @classmethod
    def of(cls, x: torch.Tensor, gram: bool = False) -> ChannelStats:
        """The statistics of one batch ``x [..., channels]``."""
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        magnitude = flat.abs()
        return cls(
            magnitude.square().sum(dim=0).double(),
            magnitude.sum(dim=0).double(),
            magnitude.amax(dim=0),
            tokens=flat.shape[0],
            gram=token_gram(flat) if gram else None,
        )

    def add(self, other: ChannelStats) -> None:
        self.sum_sq += other.sum_sq
        self.sum_abs += other.sum_abs
        self.max_abs = torch.maximum(self.max_abs, other.max_abs)
        self.tokens += other.tokens
        if self.gram is not None:
            self.gram += other.gram

    def update(self, x: torch.Tensor) -> None:
        self.add(ChannelStats.of(x, gram=self.gram is not None))

    def statistic(self, name: str) -> torch.Tensor:
        """The allocation statistic: L2 norm, mean |x| or max |x| per channel."""
        if name == "l2":
            return self.sum_sq.sqrt()
        if name == "mean_abs":
            return self.sum_abs / max(self.tokens, 1)
        if name == "max_abs":
            return self.max_abs.double()
        raise ValueError(f"unknown statistic {name!r}; choose from {', '.join(STATISTICS)}")

    def energy(self) -> torch.Tensor:
        """Mean x² per channel: the weight of an error in that column of W."""
        return self.sum_sq / max(self.tokens, 1)


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
GRAM_CHUNK = 192  # input channels per tile of the Gram product (see token_gram)


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


def token_gram(x: torch.Tensor) -> torch.Tensor:
    """``sum_t x_t x_tᵀ`` over the tokens of ``x``: float32 products, float64 result
    (a batch's few thousand tokens sum exactly enough in float32; the float64
    accumulator keeps the sum over batches).

    Only the tiles on and above the diagonal are multiplied, the rest mirrored:
    at 1536 channels that is 44 % fewer multiply-adds than ``xᵀx`` in one product.
    """
    flat = x.detach().reshape(-1, x.shape[-1]).float()
    channels = flat.shape[1]
    gram = torch.empty(channels, channels)
    for start in range(0, channels, GRAM_CHUNK):
        stop = min(start + GRAM_CHUNK, channels)
        gram[start:stop, start:] = flat[:, start:stop].t() @ flat[:, start:]
        gram[stop:, start:stop] = gram[start:stop, stop:].t()
    return gram.double()


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
