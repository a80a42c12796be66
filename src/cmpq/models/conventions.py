"""What a model expects of its input that its config does not say plainly."""

from __future__ import annotations

# config fields that hold the longest sequence a model was built for, by family
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def needs_bos(tokenizer, model=None) -> bool:
    """Whether every window should start with BOS.

    Follow the tokenizer's own convention (it adds BOS when the model was trained
    with one), and always for the Gemma family, which degrades badly without it.
    """
    if tokenizer.bos_token_id is None:
        return False
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    if model_type.startswith("gemma"):
        return True
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def context_length(model) -> int | None:
    """The longest window the model's config allows (``None`` when it names none)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for field in _CONTEXT_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
