import json

import pytest
import torch

from cmpq.checkpoint import load_quantized, save_quantized
from cmpq.errors import CmpqError
from cmpq.qlinear import QuantizedLinear
from conftest import quantize_tiny


@pytest.fixture(scope="module")
def quantized_tiny():
    return quantize_tiny("qwen2")  # q/k/v carry biases


def test_save_load_round_trip(tmp_path, quantized_tiny, tiny_tokenizer):
    model, report = quantized_tiny
    out = save_quantized(model, tiny_tokenizer, report, tmp_path / "q")
    loaded, tokenizer = load_quantized(out)
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    names = {n for n, m in loaded.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(names) == 14
    assert tokenizer.bos_token == "<bos>"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_checkpoint_holds_no_dense_weights_of_quantized_linears(
    tmp_path, quantized_tiny, tiny_tokenizer
):
    from safetensors import safe_open

    model, report = quantized_tiny
    out = save_quantized(model, tiny_tokenizer, report, tmp_path / "q")
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "model.layers.0.self_attn.q_proj.codes" in keys
    assert "model.layers.0.self_attn.q_proj.bias" in keys
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    description = json.loads((out / "cmpq.json").read_text())
    assert description["effective_bits"] == pytest.approx(report.effective_bits)


def test_failed_write_leaves_nothing(tmp_path, quantized_tiny):
    model, report = quantized_tiny

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_quantized(model, BrokenTokenizer(), report, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_newer_format_is_refused(tmp_path, quantized_tiny, tiny_tokenizer):
    model, report = quantized_tiny
    out = save_quantized(model, tiny_tokenizer, report, tmp_path / "q")
    description = json.loads((out / "cmpq.json").read_text())
    description["format_version"] = 99
    (out / "cmpq.json").write_text(json.dumps(description))
    with pytest.raises(CmpqError, match="format version 99.*upgrade cmpq"):
        load_quantized(out)


def test_missing_tensor_is_a_clear_error(tmp_path, quantized_tiny, tiny_tokenizer):
    model, report = quantized_tiny
    out = save_quantized(model, tiny_tokenizer, report, tmp_path / "q")
    description = json.loads((out / "cmpq.json").read_text())
    description["layers"]["model.layers.0.mlp.up_proj.extra"] = description["layers"][
        "model.layers.0.mlp.up_proj"
    ]
    (out / "cmpq.json").write_text(json.dumps(description))
    with pytest.raises(CmpqError, match="not a readable cmpq checkpoint"):
        load_quantized(out)


def _quantized_and_saved(arch, out, tokenizer):
    model, report = quantize_tiny(arch)
    return model, save_quantized(model, tokenizer, report, out)


def test_same_inputs_give_byte_identical_checkpoints(tmp_path, tiny_tokenizer):
    first = _quantized_and_saved("qwen2", tmp_path / "a", tiny_tokenizer)[1]
    second = _quantized_and_saved("qwen2", tmp_path / "b", tiny_tokenizer)[1]
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert {"cmpq.json", "config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_description_holds_no_run_timings(tmp_path, quantized_tiny, tiny_tokenizer):
    model, report = quantized_tiny
    out = save_quantized(model, tiny_tokenizer, report, tmp_path / "q")
    description = json.loads((out / "cmpq.json").read_text())
    assert "seconds" not in description and "peak_rss_bytes" not in description
    assert {"seconds", "peak_rss_bytes"} <= set(report.as_dict())  # the CLI still prints them
