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
    prefill_seconds: float = 0.0  # the prompt's forward, up to the first new token
    baseline_bytes: int = 0  # resident memory before the model was loaded (0: unknown)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """New tokens after the first, per second of the steps that made them."""
        decode = self.seconds - self.prefill_seconds
        return (self.new_tokens - 1) / decode if self.new_tokens > 1 and decode > 0 else 0.0

    @property
    def model_bytes(self) -> int:
        """Resident memory above the process before loading (the model's footprint)."""
        return self.resident_bytes - self.baseline_bytes if self.baseline_bytes else 0

    def as_dict(self) -> dict:
        derived = (
            "tokens_per_second",
            "prefill_tokens_per_second",
            "decode_tokens_per_second",
            "model_bytes",
        )
        return {**asdict(self), **{name: getattr(self, name) for name in derived}}

    def summary(self) -> str:
        memory = f"resident memory {self.resident_bytes / 2**20:.0f} MiB"
        if self.baseline_bytes:
            memory += f" ({self.model_bytes / 2**20:.0f} MiB above the process before loading)"
        return (
            f"{self.new_tokens} tokens in {self.seconds:.2f} s: prefill "
            f"{self.prefill_tokens_per_second:.1f} tokens/s ({self.prompt_tokens} tokens), "
            f"decode {self.decode_tokens_per_second:.1f} tokens/s; {memory}"
        )


class _FirstTokenClock:
    """A streamer that notes when the first new token arrives (and passes tokens on)."""

    def __init__(self, inner=None) -> None:
        self.inner, self.calls, self.first_token_at = inner, 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first_token_at = time.perf_counter()
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


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
    baseline_bytes: int = 0,
) -> GenerationResult:
    """Continue ``prompt``; with ``stream`` the new text is printed as it comes.
    ``baseline_bytes``: the process's resident memory before the model was loaded,
    so the result can say what the model holds."""
    check_generation_options(max_new_tokens, temperature)
    from transformers import TextStreamer

    ids = prompt_ids(tokenizer, model, prompt)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    options = sampling if temperature > 0 else {"do_sample": False}
    clock = _FirstTokenClock(TextStreamer(tokenizer, skip_prompt=True) if stream else None)
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
            streamer=clock,
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
        prefill_seconds=(clock.first_token_at or start + seconds) - start,
        baseline_bytes=baseline_bytes,
    )
