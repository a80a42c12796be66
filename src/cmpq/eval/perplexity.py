"""Perplexity on non-overlapping windows cut from the start of a text.

The protocol (reported with every number): tokenize the whole text without
special tokens, cut ``windows`` consecutive windows of ``seqlen`` tokens
(``[BOS] + seqlen - 1`` for models that need BOS), and take
``exp(mean NLL)`` over every predicted token of every window.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..calib.text import cut_windows, load_text
from ..errors import CmpqError
from ..models.conventions import context_length, needs_bos


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    dataset: str
    seqlen: int
    windows: int
    tokens: int  # predicted tokens, summed over windows
    seconds: float
    model: str
    bos: bool

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.model}: perplexity {self.ppl:.4f} on {self.dataset} "
            f"({self.windows} x {self.seqlen} tokens, {self.tokens} predicted, "
            f"{self.seconds:.1f} s)"
        )


def check_window(model, seqlen: int) -> None:
    """Refuse a window longer than the model's context: past it the positions are
    ones the model never saw (or does not have), and the result means nothing."""
    limit = context_length(model)
    if limit is not None and seqlen > limit:
        raise CmpqError(
            f"`seqlen` {seqlen} is longer than the model's context ({limit} tokens); "
            f"use a `seqlen` of at most {limit}"
        )


def windows_nll(model, batch: torch.Tensor, progress: bool = True) -> tuple[float, int]:
    """Summed next-token NLL and the number of predicted tokens over ``batch``."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for window in tqdm(batch, desc="perplexity", unit="window", disable=not progress):
            logits = model(window.unsqueeze(0)).logits[0, :-1].float()
            targets = window[1:]
            total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += targets.numel()
    return total, count


def perplexity(
    model,
    tokenizer,
    dataset: str = "wikitext2",
    seqlen: int = 512,
    windows: int | None = 40,
    model_name: str = "",
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``dataset`` (a built-in name or a text file path)."""
    check_window(model, seqlen)
    start = time.perf_counter()
    text = load_text(dataset)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    bos = needs_bos(tokenizer, model)
    batch = cut_windows(ids, seqlen, windows, tokenizer.bos_token_id if bos else None)
    total, count = windows_nll(model, batch, progress)
    return PerplexityResult(
        ppl=math.exp(total / count),
        dataset=dataset,
        seqlen=seqlen,
        windows=batch.shape[0],
        tokens=count,
        seconds=time.perf_counter() - start,
        model=model_name,
        bos=bos,
    )
