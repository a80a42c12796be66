import json

import pytest
import torch

from cmpq.errors import CmpqError
from cmpq.format.description import read_description, write_description
from cmpq.runtime.checkpoint import load_quantized, save_quantized
from cmpq.runtime.qlinear import QuantizedLinear

from tiny import quantize_tiny, tiny_batch


@pytest.fixture(scope="module")
def quantized_tiny():
    return quantize_tiny("qwen2")  # q/k/v carry biases


def _edit_description(out, edit):
    """Hand-edit the saved description with ``edit(description)``."""
    description = read_description(out)
    edit(description)
    write_description(out, description)


def test_save_load_round_trip(tmp_path, quantized_tiny, tiny_tokenizer):
    model, report = quantized_tiny
    out = save_quantized(model, tiny_tokenizer, report, tmp_path / "q")
    loaded, tokenizer = load_quantized(out, embedding_dtype="float32")
    x = tiny_batch(1, 12)
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


def _list_extra_layer(description):
    layers = description["layers"]
    layers["model.layers.0.mlp.up_proj.extra"] = layers["model.layers.0.mlp.up_proj"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format_version=99), "format version 99.*upgrade cmpq"),
        (_list_extra_layer, "up_proj.extra: listed in the description but not a linear layer"),
        (
            lambda d: d.update(effective_bits=2.0),
            "the description's effective_bits is 2.0 but the stored tensors",
        ),
        # loaded as a Hugging Face checkpoint, every linear would get random weights
        (
            lambda d: d.update(format="dequantized"),
            "format is 'dequantized' but layers lists packed layers",
        ),
    ],
    ids=["newer-format", "extra-layer", "edited-total", "relabelled-dequantized"],
)
def test_hand_edited_description_is_refused(
    tmp_path, quantized_tiny, tiny_tokenizer, edit, message
):
    model, report = quantized_tiny
    out = save_quantized(model, tiny_tokenizer, report, tmp_path / "q")
    _edit_description(out, edit)
    with pytest.raises(CmpqError, match=message):
        load_quantized(out)


def _quantized_and_saved(arch, out, tokenizer):
    model, report = quantize_tiny(arch)
    return model, save_quantized(model, tokenizer, report, out)


def test_same_inputs_give_byte_identical_checkpoints(tmp_path, tiny_tokenizer):
    first = _quantized_and_saved("qwen2", tmp_path / "a", tiny_tokenizer)[1]
    second = _quantized_and_saved("qwen2", tmp_path / "b", tiny_tokenizer)[1]
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_description_holds_no_run_timings(tmp_path, quantized_tiny, tiny_tokenizer):
    model, report = quantized_tiny
    out = save_quantized(model, tiny_tokenizer, report, tmp_path / "q")
    description = read_description(out)
    assert "seconds" not in description and "peak_rss_bytes" not in description
    assert {"seconds", "peak_rss_bytes"} <= set(report.as_dict())  # the CLI still prints them


def test_tied_conv1d_model_round_trip(tmp_path, tiny_tokenizer):
    model, out = _quantized_and_saved("gpt2", tmp_path / "q", tiny_tokenizer)  # tied, Conv1D
    loaded, _ = load_quantized(out, embedding_dtype="float32")
    x = tiny_batch(1, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("keep", [0, 7, 100, -1])
def test_truncated_weights_file_is_a_clear_error(tmp_path, quantized_tiny, tiny_tokenizer, keep):
    model, report = quantized_tiny
    out = save_quantized(model, tiny_tokenizer, report, tmp_path / "q")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep])
    with pytest.raises(CmpqError, match="model.safetensors is not a readable safetensors file"):
        load_quantized(out)


def _rewrite(out, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights = str(out / "model.safetensors")
    with safe_open(weights, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    change(tensors)
    save_file(tensors, weights, metadata={"format": "cmpq"})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:-1]}),
            r"model\.norm\.weight: expected shape \[64\], found \[63\]",
        ),
        (
            lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"),
            r"model\.layers\.1\.self_attn\.k_proj\.bias: missing",
        ),
        (
            lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(1)}),
            r"model\.layers\.0\.mlp\.up_proj\.weight: unexpected tensor",
        ),
        (
            lambda t: t.update(
                {"model.layers.0.mlp.up_proj.column_groups": torch.zeros(1, dtype=torch.uint8)}
            ),
            r"model\.layers\.0\.mlp\.up_proj\.column_groups: expected \d+ bytes",
        ),
    ],
)
def test_damaged_tensor_is_a_one_line_error_naming_it(
    tmp_path, quantized_tiny, tiny_tokenizer, change, message
):
    model, report = quantized_tiny
    out = save_quantized(model, tiny_tokenizer, report, tmp_path / "q")
    _rewrite(out, change)
    with pytest.raises(CmpqError, match=f"is not a readable cmpq checkpoint: {message}") as caught:
        load_quantized(out)
    assert "\n" not in str(caught.value)


def test_packed_description_outside_config_json_is_refused(
    tmp_path, quantized_tiny, tiny_tokenizer
):
    # transformers would build the plain model with random linears from such a directory
    model, report = quantized_tiny
    out = save_quantized(model, tiny_tokenizer, report, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    (out / "cmpq.json").write_text(json.dumps(config.pop("quantization_config")))
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CmpqError, match="config.json has no cmpq quantization_config"):
        load_quantized(out)


def test_a_bug_in_cmpq_is_not_reported_as_an_unreadable_checkpoint(
    tmp_path, quantized_tiny, tiny_tokenizer, monkeypatch
):
    model, report = quantized_tiny
    out = save_quantized(model, tiny_tokenizer, report, tmp_path / "q")

    def buggy(*args, **kwargs):
        raise RuntimeError("a bug in cmpq's loader")

    monkeypatch.setattr("cmpq.runtime.hf.read_checked_layers", buggy)
    with pytest.raises(RuntimeError, match="a bug in cmpq's loader"):
        load_quantized(out)


def test_embeddings_held_in_bfloat16_by_default(tmp_path, quantized_tiny, tiny_tokenizer):
    model, report = quantized_tiny
    out = save_quantized(model, tiny_tokenizer, report, tmp_path / "q")
    compact, _ = load_quantized(out)
    exact, _ = load_quantized(out, embedding_dtype="float32")
    assert compact.get_input_embeddings().weight.dtype == torch.bfloat16
    assert compact.get_output_embeddings().weight.dtype == torch.bfloat16
    assert exact.get_input_embeddings().weight.dtype == torch.float32
    x = tiny_batch(1, 12)
    with torch.no_grad():
        logits, reference = compact(x).logits, exact(x).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(reference, model(x).logits)
    error = (logits - reference).abs().max().item()
    assert 0 < error < 0.02 * reference.abs().max().item()  # bf16 rounding, no more
    with pytest.raises(CmpqError, match="`embedding_dtype` must be one of bfloat16, float32"):
        load_quantized(out, embedding_dtype="float16")
