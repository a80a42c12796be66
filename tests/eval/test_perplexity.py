import math

import pytest
import torch

from cmpq.eval.perplexity import perplexity, windows_nll

from tiny import make_tiny_model, tiny_batch


def test_nll_matches_the_model_loss():
    model = make_tiny_model("llama")
    batch = tiny_batch(3, 12)
    total, count = windows_nll(model, batch, progress=False)
    assert count == 3 * 11
    with torch.no_grad():
        losses = [model(w.unsqueeze(0), labels=w.unsqueeze(0)).loss.item() for w in batch]
    assert total / count == pytest.approx(sum(losses) / 3, rel=1e-5)


def test_uniform_model_has_vocabulary_perplexity(tiny_tokenizer, text_file):
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every token equally likely
    result = perplexity(model, tiny_tokenizer, str(text_file), seqlen=16, windows=4, progress=False)
    assert result.ppl == pytest.approx(model.config.vocab_size, rel=1e-4)
    assert (result.windows, result.seqlen, result.tokens) == (4, 16, 4 * 15)
    assert not result.bos  # the tiny tokenizer has a BOS token but does not add it


def test_bos_model_windows_start_with_bos(tiny_tokenizer, text_file):
    model = make_tiny_model("gemma3")
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0][0, 0].item()))
    perplexity(model, tiny_tokenizer, str(text_file), seqlen=16, windows=2, progress=False)
    assert seen == [tiny_tokenizer.bos_token_id] * 2


def test_perplexity_result_fields(tiny_tokenizer, text_file):
    model = make_tiny_model("opt")
    result = perplexity(model, tiny_tokenizer, str(text_file), 8, 3, "tiny", progress=False)
    row = result.as_dict()
    assert set(row) >= {"ppl", "dataset", "seqlen", "windows", "tokens", "seconds", "model"}
    assert math.isfinite(row["ppl"]) and row["model"] == "tiny"


def test_a_window_longer_than_the_context_is_refused(tiny_tokenizer, text_file):
    from cmpq.errors import CmpqError

    model = make_tiny_model("gpt2")  # n_positions 256
    with pytest.raises(CmpqError, match="`seqlen` 257 is longer than the model's context"):
        perplexity(model, tiny_tokenizer, str(text_file), seqlen=257, windows=1, progress=False)
    result = perplexity(
        model, tiny_tokenizer, str(text_file), seqlen=256, windows=1, progress=False
    )
    assert result.seqlen == 256
