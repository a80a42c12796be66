"""Generation: greedy equals a hand-written argmax loop, sampling repeats with its seed,
streaming prints exactly the continuation, and the CLI reports speed and memory."""

import copy
import json

import pytest
import torch

from cmpq.cli import main
from cmpq.errors import CmpqError
from cmpq.eval.generation import generate, prompt_ids
from cmpq.runtime import cpu_kernel
from cmpq.runtime.checkpoint import save_quantized

from tiny import make_tiny_model, quantize_tiny

PROMPT = "The quick brown fox"


def greedy_by_hand(model, ids: torch.Tensor, steps: int, eos: int) -> list[int]:
    new = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(ids).logits[0, -1].argmax())
            new.append(token)
            if token == eos:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


def test_greedy_matches_an_argmax_loop(tiny_tokenizer):
    model = make_tiny_model("llama")
    result = generate(model, tiny_tokenizer, PROMPT, max_new_tokens=8)
    ids = prompt_ids(tiny_tokenizer, model, PROMPT)
    expected = greedy_by_hand(model, ids, 8, tiny_tokenizer.eos_token_id)
    assert result.new_tokens == len(expected)
    assert result.text == tiny_tokenizer.decode(expected, skip_special_tokens=True)
    assert result.prompt_tokens == ids.shape[1]
    assert result.tokens_per_second > 0 and result.resident_bytes > 10 * 2**20


def test_sampling_repeats_with_its_seed_and_differs_across_seeds(tiny_tokenizer):
    model = make_tiny_model("qwen2")
    runs = [
        generate(model, tiny_tokenizer, PROMPT, max_new_tokens=12, temperature=1.5, seed=seed)
        for seed in (0, 0, 1)
    ]
    assert runs[0].text == runs[1].text
    assert runs[0].text != runs[2].text


def test_stream_prints_exactly_the_continuation(capsys, tiny_tokenizer):
    model = make_tiny_model("gpt2")
    result = generate(model, tiny_tokenizer, PROMPT, max_new_tokens=6, stream=True)
    assert capsys.readouterr().out == result.text + "\n"


def test_gemma_prompt_starts_with_bos(tiny_tokenizer):
    ids = prompt_ids(tiny_tokenizer, make_tiny_model("gemma3"), PROMPT)
    assert ids[0, 0] == tiny_tokenizer.bos_token_id
    assert ids[0, 1] != tiny_tokenizer.bos_token_id


@pytest.mark.parametrize(
    ("prompt", "tokens", "temperature", "message"),
    [
        ("", 4, 0.0, "prompt is empty"),
        (PROMPT, 0, 0.0, "at least 1"),
        (PROMPT, 4, -1.0, "or positive"),
    ],
)
def test_bad_options_are_refused(tiny_tokenizer, prompt, tokens, temperature, message):
    with pytest.raises(CmpqError, match=message):
        generate(make_tiny_model("llama"), tiny_tokenizer, prompt, tokens, temperature)


def test_cli_streams_and_reports(capsys, tmp_path, tiny_checkpoint):
    report = tmp_path / "gen.json"
    code = main(
        ["generate", str(tiny_checkpoint), PROMPT, "--max-new-tokens", "5", "--json", str(report)]
    )
    out = capsys.readouterr().out
    payload = json.loads(report.read_text())
    assert code == 0
    assert out.startswith(PROMPT + payload["text"])
    assert "tokens/s" in out and "resident memory" in out
    assert 1 <= payload["new_tokens"] <= 5 and payload["tokens_per_second"] > 0


def test_cli_refuses_a_negative_temperature_before_loading(capsys):
    code = main(["generate", "/no/such/model", PROMPT, "--temperature", "-0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "--temperature" in err and len(err.strip().splitlines()) == 1


def test_sampling_leaves_the_callers_random_state_alone(tiny_tokenizer):
    model = make_tiny_model("qwen2")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    generate(model, tiny_tokenizer, PROMPT, max_new_tokens=4, temperature=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_pad_id_of_zero_is_the_pad_id(tiny_tokenizer, monkeypatch):
    model = make_tiny_model("llama")
    seen = {}
    original = model.generate

    def spy(*args, **kwargs):
        seen["pad"] = kwargs["pad_token_id"]
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    padded = copy.deepcopy(tiny_tokenizer)
    padded.pad_token = padded.convert_ids_to_tokens(0)
    assert padded.pad_token_id == 0 and padded.eos_token_id != 0
    generate(model, padded, PROMPT, max_new_tokens=2)
    assert seen["pad"] == 0
    generate(model, tiny_tokenizer, PROMPT, max_new_tokens=2)  # no pad token: EOS stands in
    assert seen["pad"] == tiny_tokenizer.eos_token_id


@pytest.fixture(scope="module")
def quantized_output(tmp_path_factory, tiny_tokenizer):
    model, report = quantize_tiny("llama")
    return save_quantized(model, tiny_tokenizer, report, tmp_path_factory.mktemp("q") / "out")


@pytest.mark.skipif(cpu_kernel.unavailable_reason() is not None, reason="no CPU kernel here")
def test_cli_backends_agree_and_report_prefill_decode_and_memory(
    capsys, tmp_path, quantized_output
):
    results = {}
    for backend in ("torch", "cpu"):
        report = tmp_path / f"{backend}.json"
        argv = ["generate", str(quantized_output), PROMPT, "--max-new-tokens", "6"]
        code = main([*argv, "--backend", backend, "--json", str(report)])
        out = capsys.readouterr().out
        assert code == 0 and "prefill" in out and "decode" in out and "above the process" in out
        results[backend] = json.loads(report.read_text())
    assert results["torch"]["text"] == results["cpu"]["text"]
    for payload in results.values():
        assert payload["prefill_tokens_per_second"] > 0 and payload["decode_tokens_per_second"] > 0
        assert 0 < payload["model_bytes"] < payload["resident_bytes"]


def test_cli_refuses_an_unknown_backend(capsys, quantized_output):
    with pytest.raises(SystemExit) as stop:
        main(["generate", str(quantized_output), PROMPT, "--backend", "gpu"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--backend" in err and "invalid choice" in err
