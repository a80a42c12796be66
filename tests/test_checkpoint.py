import pytest
import torch

from cmpq.checkpoint import load_quantized, read_description, save_quantized, write_description
from cmpq.config import CMPQConfig
from cmpq.errors import CmpqError
from cmpq.qlinear import QuantizedLinear
from cmpq.quantize import quantize
from conftest import make_tiny_model


@pytest.fixture(scope="module")
def quantized_tiny(tiny_tokenizer):
    model = make_tiny_model("qwen2")  # q/k/v carry biases
    batch = torch.randint(0, 300, (4, 24))
    report = quantize(
        model, CMPQConfig(bits=3.3, kmeans_iters=5), calibration=batch, progress=False
    )
    return model, report


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
    description = read_description(out)
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
    description = read_description(out)
    description["format_version"] = 99
    write_description(out, description)
    with pytest.raises(CmpqError, match="format version 99.*upgrade cmpq"):
        load_quantized(out)


def test_missing_tensor_is_a_clear_error(tmp_path, quantized_tiny, tiny_tokenizer):
    model, report = quantized_tiny
    out = save_quantized(model, tiny_tokenizer, report, tmp_path / "q")
    description = read_description(out)
    description["layers"]["model.layers.0.mlp.up_proj.extra"] = description["layers"][
        "model.layers.0.mlp.up_proj"
    ]
    write_description(out, description)
    with pytest.raises(CmpqError, match="not a readable cmpq checkpoint"):
        load_quantized(out)
