"""Hugging Face integration: a cmpq output loads with AutoModelForCausalLM.from_pretrained,
generates, and survives save_pretrained -> from_pretrained unchanged."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import cmpq
from cmpq.config import CMPQConfig
from cmpq.format.spec import FORMAT_VERSION
from cmpq.quant.pipeline import quantize
from cmpq.runtime.checkpoint import save_quantized
from cmpq.runtime.qlinear import QuantizedLinear

from tiny import make_tiny_model, tiny_batch

PROMPT_IDS = torch.tensor([[5, 17, 42, 99, 7, 250]])


@pytest.fixture(scope="module", params=["qwen2", "gemma3"])  # biases; tied embeddings
def saved(request, tmp_path_factory, tiny_tokenizer):
    model = make_tiny_model(request.param)
    batch = tiny_batch(4, 24)
    report = quantize(
        model, CMPQConfig(bits=2.7, kmeans_iters=5), calibration=batch, progress=False
    )
    out = save_quantized(model, tiny_tokenizer, report, tmp_path_factory.mktemp("hf") / "q")
    return model, report, out


def logits(model, ids=PROMPT_IDS):
    with torch.no_grad():
        return model(ids).logits


def test_config_declares_the_cmpq_method(saved):
    _, report, out = saved
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "cmpq"
    assert quantization["format_version"] == FORMAT_VERSION
    assert quantization["effective_bits"] == pytest.approx(report.effective_bits)
    assert len(quantization["layers"]) == report.layers


def test_from_pretrained_builds_quantized_modules_and_matches(saved):
    model, report, out = saved
    loaded = AutoModelForCausalLM.from_pretrained(out)
    modules = [m for m in loaded.modules() if isinstance(m, QuantizedLinear)]
    assert len(modules) == report.layers
    assert all(m.lut.dtype == torch.float16 for m in modules)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(out).bos_token == "<bos>"  # self-contained directory


def test_generate_on_the_loaded_model_equals_the_in_memory_one(saved):
    model, _, out = saved
    loaded = AutoModelForCausalLM.from_pretrained(out)
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(
        loaded.generate(PROMPT_IDS, **options), model.generate(PROMPT_IDS, **options)
    )


def test_save_pretrained_round_trips_the_stored_tensors(saved, tmp_path):
    model, _, out = saved
    AutoModelForCausalLM.from_pretrained(out).save_pretrained(tmp_path)
    first, second = load_file(out / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    tied = {"lm_head.weight", "model.embed_tokens.weight"}  # either name holds a tied table
    assert len(first) == len(second) and first.keys() - tied == second.keys() - tied
    assert sum(t.nbytes for t in first.values()) == sum(t.nbytes for t in second.values())
    for key in first.keys() & second.keys():
        assert first[key].dtype == second[key].dtype, key
        assert torch.equal(first[key], second[key]), key
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)


def test_cmpq_load_is_the_same_model(saved):
    model, _, out = saved
    loaded, tokenizer = cmpq.load(out, embedding_dtype="float32")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert tokenizer.eos_token == "<eos>"


def test_loading_in_bfloat16_keeps_the_tables_exact(saved):
    model, _, out = saved
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    first = next(m for m in loaded.modules() if isinstance(m, QuantizedLinear))
    assert first.lut.dtype == torch.float16
    assert torch.isfinite(logits(loaded).float()).all()
