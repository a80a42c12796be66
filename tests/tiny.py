"""Tiny random-weight models of each architecture and a tiny tokenizer, built
from configs in code: no download, milliseconds."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PhiConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from cmpq.config import PAPER_OUTLIERS, CMPQConfig
from cmpq.quant.pipeline import quantize

VOCAB = 320
HIDDEN = 64


def _tiny_configs() -> dict:
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=4)
    return {
        "llama": LlamaConfig(
            **common, intermediate_size=96, num_hidden_layers=2, num_key_value_heads=2
        ),
        "mistral": MistralConfig(
            **common, intermediate_size=96, num_hidden_layers=2, num_key_value_heads=2
        ),
        "qwen2": Qwen2Config(
            **common, intermediate_size=96, num_hidden_layers=2, num_key_value_heads=2
        ),
        "gemma3": Gemma3TextConfig(
            **common,
            intermediate_size=96,
            num_hidden_layers=2,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=16,
        ),
        "phi": PhiConfig(**common, intermediate_size=96, num_hidden_layers=2),
        "opt": OPTConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_attention_heads=4,
            ffn_dim=96,
            num_hidden_layers=2,
            word_embed_proj_dim=HIDDEN,
        ),
        "gpt2": GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_head=4,
            n_layer=2,
            n_positions=256,
            bos_token_id=0,
            eos_token_id=1,
        ),
    }


ARCHITECTURES = tuple(_tiny_configs())

# Linears per block: attention q,k,v,o + MLP (gate, up, down or fc1, fc2).
EXPECTED_LINEARS_PER_BLOCK = {
    "llama": 7,
    "mistral": 7,
    "qwen2": 7,
    "gemma3": 7,
    "phi": 6,
    "opt": 6,
    "gpt2": 4,
}


def make_tiny_model(arch: str, seed: int = 0):
    """A tiny random-weight model of ``arch``, the same for the same seed; the global
    random state is left as it was, so other tests' inputs do not depend on order."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(_tiny_configs()[arch], dtype=torch.float32)
    return model.eval()


def quantize_tiny(arch: str = "qwen2"):
    """A tiny model CMPQ-quantized at 3.3 bits (two bit-groups per layer, outliers):
    the same model, data, options and seed on every call. Returns ``(model, report)``."""
    model = make_tiny_model(arch)
    batch = tiny_batch(4, 24)
    # the paper's outlier fractions, more than the defaults at 3.3 bits: both kinds stored
    config = CMPQConfig(bits=3.3, kmeans_iters=5, tune_model=0, **PAPER_OUTLIERS)
    return model, quantize(model, config, calibration=batch, progress=False)


TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. Quantization stores weights in few bits. "
    "Channels with large activations get more bits than the others. "
) * 20


def make_tiny_tokenizer():
    """A byte-level BPE trained in milliseconds, with BOS and EOS tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([TRAINING_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>")


def tiny_batch(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """``[rows, length]`` random token ids below 300, the same for the same seed."""
    return torch.randint(0, 300, (rows, length), generator=torch.Generator().manual_seed(seed))


def random_layer(out_features, in_features, widths, layout="column", outliers=0, seed=0):
    """A random quantized layer: columns cycling through ``widths``, random codes, tables
    and ``outliers`` outliers at random positions."""
    from cmpq.format.layer import LUTLayer, storage_order

    gen = torch.Generator().manual_seed(seed)
    bits = torch.tensor([widths[i % len(widths)] for i in range(in_features)])
    group_bits, group_sizes, perm, _ = storage_order(bits)
    codes = [
        torch.randint(0, 2**b, (out_features, n), dtype=torch.uint8, generator=gen)
        for b, n in zip(group_bits, group_sizes, strict=True)
    ]
    rows_of = (lambda n: out_features) if layout == "row" else (lambda n: n)
    luts = [
        torch.randn(rows_of(n), 2**b, generator=gen).half()
        for b, n in zip(group_bits, group_sizes, strict=True)
    ]
    where = torch.randperm(out_features * in_features, generator=gen)[:outliers].sort().values
    values = (10 * torch.randn(outliers, generator=gen)).half()
    return LUTLayer(
        out_features,
        in_features,
        layout,
        group_bits,
        group_sizes,
        perm,
        codes,
        luts,
        where // in_features,
        where % in_features,
        values,
    )
