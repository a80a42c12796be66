"""Shared fixtures: tiny random-weight models of each architecture, a tiny tokenizer
(built by :mod:`tiny`), and the test-run settings."""

from __future__ import annotations

import os

# The Triton kernels are tested on the CPU by Triton's interpreter; it must be chosen
# before anything imports triton (transformers and torch may, on import).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from tiny import ARCHITECTURES, TRAINING_TEXT, make_tiny_model, make_tiny_tokenizer

# CI runs the property tests derandomized (the same examples every run); elsewhere they
# explore. `.ci/run` sets HYPOTHESIS_PROFILE=ci.
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def seeded_global_rng():
    """Every test starts from the same global random state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture(params=ARCHITECTURES)
def tiny_model(request):
    return request.param, make_tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE trained in milliseconds, with BOS and EOS tokens."""
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer):
    """A saved tiny Llama with its tokenizer: a local Hugging Face checkpoint."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(TRAINING_TEXT)
    return path
