import pytest
import torch

from cmpq.api import load_model
from cmpq.errors import CmpqError
from cmpq.models.conventions import needs_bos
from cmpq.models.graph import decoder_blocks, quantizable_linears, set_weight_matrix, weight_matrix
from cmpq.models.sources import ALIASES
from conftest import EXPECTED_LINEARS_PER_BLOCK, HIDDEN, make_tiny_model


def test_finds_every_decoder_linear(tiny_model):
    arch, model = tiny_model
    prefix, blocks = decoder_blocks(model)
    linears = quantizable_linears(model)
    assert len(blocks) == 2
    assert len(linears) == 2 * EXPECTED_LINEARS_PER_BLOCK[arch]
    assert all(name.startswith(prefix + ".") for name in linears)
    assert "lm_head" not in linears
    embedding = model.get_input_embeddings().weight
    assert all(module.weight is not embedding for module in linears.values())


def test_lm_head_only_when_asked(tiny_model):
    _, model = tiny_model
    with_head = quantizable_linears(model, include_lm_head=True)
    assert "lm_head" in with_head
    assert len(with_head) == len(quantizable_linears(model)) + 1


def test_gpt2_conv1d_weight_is_presented_as_out_by_in():
    model = make_tiny_model("gpt2")
    c_fc = model.transformer.h[0].mlp.c_fc  # Conv1D, stored [in, out] = [64, 256]
    matrix = weight_matrix(c_fc)
    assert matrix.shape == (4 * HIDDEN, HIDDEN)
    x = torch.randn(3, HIDDEN)
    torch.testing.assert_close(c_fc(x), x @ matrix.t() + c_fc.bias)
    set_weight_matrix(c_fc, torch.zeros_like(matrix))
    torch.testing.assert_close(c_fc(x), c_fc.bias.expand(3, -1))


class _FakeTokenizer:
    def __init__(self, bos_token_id, adds_bos):
        self.bos_token_id = bos_token_id
        self.adds_bos = adds_bos

    def __call__(self, text, **_):
        return {"input_ids": ([self.bos_token_id] if self.adds_bos else []) + [7]}


def test_bos_follows_the_tokenizer_and_always_for_gemma():
    assert needs_bos(_FakeTokenizer(1, adds_bos=True))
    assert not needs_bos(_FakeTokenizer(1, adds_bos=False))
    assert not needs_bos(_FakeTokenizer(None, adds_bos=False))
    assert needs_bos(_FakeTokenizer(2, adds_bos=False), make_tiny_model("gemma3"))
    assert not needs_bos(_FakeTokenizer(2, adds_bos=False), make_tiny_model("llama"))


def test_aliases_pin_their_files():
    for alias in ALIASES.values():
        assert len(alias.sha256) == 64
        assert all("==" in package for package in alias.packages)


def test_loads_a_local_checkpoint(tiny_checkpoint):
    model, tokenizer = load_model(str(tiny_checkpoint))
    assert model.config.model_type == "llama"
    assert not model.training
    assert tokenizer.bos_token == "<bos>"


@pytest.mark.parametrize(
    ("make_spec", "message"),
    [
        (lambda tmp: str(tmp / "missing-dir" / "model"), "does not exist"),
        (lambda tmp: str(tmp), "without config.json"),
        (lambda tmp: str(_write(tmp / "notes.txt", "hello")), "is not a model"),
        (lambda tmp: str(_write(tmp / "broken.gguf", "not a gguf")), "could not load"),
    ],
)
def test_bad_model_specs_raise_clear_errors(tmp_path, make_spec, message):
    with pytest.raises(CmpqError, match=message):
        load_model(make_spec(tmp_path))


def _write(path, text):
    path.write_text(text)
    return path
