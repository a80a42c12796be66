"""Text generation from a (quantized) model, streamed, with its speed and memory.

Temperature 0 is greedy decoding (deterministic); above 0 it samples with that
temperature from a generator seeded with ``seed``, so a run can be repeated.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..errors import CmpqError
from ..memory import resident_bytes
from ..models.conventions import needs_bos


@dataclass(frozen=True)
class GenerationResult:
    prompt: str
    text: str  # the generated continuation only
    prompt_tokens: int
    new_tokens: int
    seconds: float  # generation only, model loading excluded
    resident_bytes: int  # process resident memory after generating

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}

    def summary(self) -> str:
        return (
            f"{self.new_tokens} tokens in {self.seconds:.2f} s ({self.tokens_per_second:.1f} "
            f"tokens/s), resident memory {self.resident_bytes / 2**20:.0f} MiB"
        )


def check_generation_options(max_new_tokens: int, temperature: float) -> None:
    """Fail fast (before any model loads) on options generate would reject."""
    if max_new_tokens < 1:
        raise CmpqError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise CmpqError(f"`temperature` must be 0 (greedy) or positive, got {temperature}")


def prompt_ids(tokenizer, model, prompt: str) -> torch.Tensor:
    """``[1, n]`` prompt tokens, starting with BOS where the model expects it."""
    if not prompt:
        raise CmpqError("the prompt is empty")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if needs_bos(tokenizer, model):
        ids = [tokenizer.bos_token_id, *ids]
    return torch.tensor([ids])


def generate(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    stream: bool = False,
) -> GenerationResult:
    """Continue ``prompt``; with ``stream`` the new text is printed as it comes."""
    check_generation_options(max_new_tokens, temperature)
    from transformers import TextStreamer

    ids = prompt_ids(tokenizer, model, prompt)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    options = sampling if temperature > 0 else {"do_sample": False}
    streamer = TextStreamer(tokenizer, skip_prompt=True) if stream else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    # transformers samples from torch's global generator: seed it inside a fork so the
    # caller's random state is the same afterwards
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        output = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            pad_token_id=pad,
            **options,
        )
    seconds = time.perf_counter() - start
    new = output[0, ids.shape[1] :]
    return GenerationResult(
        prompt=prompt,
        text=tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=ids.shape[1],
        new_tokens=new.numel(),
        seconds=seconds,
        resident_bytes=resident_bytes(),
    )
