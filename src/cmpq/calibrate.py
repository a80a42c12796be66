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

from collections.abc import Callable
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
    the small channels' contribution in float32.
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

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        x64 = x.double()
        self.sum_sq += x64.square().sum(dim=0)
        self.sum_abs += x64.abs().sum(dim=0)
        self.max_abs = torch.maximum(self.max_abs, x.abs().amax(dim=0).float())
        self.tokens += x.shape[0]

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


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    output = block(hidden, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def window_gram(x: torch.Tensor) -> torch.Tensor:
    """``sum_t x_t x_tᵀ`` over one window's tokens: float32 products, float64 result
    (each window's 512-token sum is exact enough in float32; the float64
    accumulator keeps the sum over windows)."""
    flat = x.detach().reshape(-1, x.shape[-1]).float()
    return (flat.t() @ flat).double()


def measure_block(
    block: nn.Module, hidden: list[torch.Tensor], kwargs: dict, gram: bool = False
) -> tuple[dict[str, ChannelStats], list[torch.Tensor]]:
    """Run ``block`` on every window, returning its linears' stats and its outputs.

    With ``gram`` each linear also accumulates its input Gram matrix; linears fed
    the same tensor (q/k/v, gate/up) share one product per window.
    """
    linears = block_linears(block)
    stats = {name: ChannelStats.zeros(in_features(m), gram) for name, m in linears.items()}
    products: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def measurer(name: str):
        def hook(module, args):
            x = args[0]
            stats[name].update(x)
            if gram:
                if id(x) not in products:  # x is held below, so its id is not reused
                    products[id(x)] = (x, window_gram(x))
                stats[name].gram += products[id(x)][1]

        return hook

    handles = [m.register_forward_pre_hook(measurer(name)) for name, m in linears.items()]
    outputs = []
    try:
        with torch.inference_mode():
            for h in hidden:
                outputs.append(run_block(block, h, kwargs))
                products.clear()
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
                outputs = [run_block(block, h, kwargs) for h in hidden]
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
