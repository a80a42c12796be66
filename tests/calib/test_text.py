import hashlib
import json

import pytest
import torch

from cmpq.calib.text import (
    cut_windows,
    load_documents,
    load_text,
    sample_calibration,
    wikitext_rows,
)
from cmpq.errors import CmpqError


def test_wikitext_is_the_conventional_join():
    text = load_text("wikitext2")
    # the first HF row is empty, so the text opens with the joining "\n\n"
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")
    assert text.count("\n\n") >= 4_357  # 4,358 rows joined
    assert len(text) == 1_294_336


def test_bundled_corpora_are_byte_identical_to_their_sources():
    import lzma
    from importlib.resources import files

    expected = {
        "wikitext-2-raw-v1.test.raw.xz": "173c87a5",
        "c4-train.00000-of-01024.first1041.jsonl.xz": "7cb5c1c8",
        "c4-validation.00000-of-00008.first1025.jsonl.xz": "c4286606",
    }
    for name, prefix in expected.items():
        raw = lzma.decompress(files("cmpq.datasets").joinpath(name).read_bytes())
        assert hashlib.sha256(raw).hexdigest().startswith(prefix), name


def test_wikitext_rows_follow_hugging_face():
    rows = wikitext_rows(" \n = Title = \n \n Text line . \n")
    assert rows == ["", " = Title = \n", "", " Text line . \n"]


def test_c4_validation_is_space_joined_documents():
    docs = load_documents("c4")
    assert len(docs) == 1025
    assert load_text("c4") == " ".join(docs)


def test_c4_train_documents():
    docs = load_documents("c4-train")
    assert len(docs) == 1041
    assert docs[0].startswith("Beginners BBQ Class Taking Place in Missoula!")


def test_user_text_and_jsonl_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world")
    assert load_text(str(txt)) == "hello world"
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_documents(str(jsonl)) == ["one", "two"]
    assert load_text(str(jsonl)) == "one two"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "", "is empty"),
        ("blank.txt", "  \n\n", "is empty"),
        ("bad.jsonl", "{not json}\n", "line 1 is not valid JSON"),
        ("notext.jsonl", '{"body": "x"}\n', "line 1 has no string field 'text'"),
    ],
)
def test_bad_dataset_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CmpqError, match=message):
        load_documents(str(path))


def test_missing_dataset():
    with pytest.raises(CmpqError, match="neither a built-in dataset"):
        load_text("/nonexistent/file.txt")


def test_windows_are_consecutive_from_the_start():
    ids = torch.arange(100)
    batch = cut_windows(ids, seqlen=10, windows=3, bos_id=None)
    assert batch.tolist() == [list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]
    assert cut_windows(ids, 10, None, None).shape == (10, 10)


def test_windows_with_bos_hold_seqlen_minus_one_text_tokens():
    batch = cut_windows(torch.arange(100), seqlen=10, windows=2, bos_id=999)
    assert batch.tolist() == [[999] + list(range(0, 9)), [999] + list(range(9, 18))]


def test_too_many_windows_is_a_clear_error():
    with pytest.raises(CmpqError, match="room for 10 windows of 10 tokens, not 11"):
        cut_windows(torch.arange(100), 10, 11, None)
    with pytest.raises(CmpqError, match="at least 1"):
        cut_windows(torch.arange(100), 10, 0, None)


def test_calibration_sampling_is_seeded_and_in_range(tiny_tokenizer):
    docs = ["alpha beta gamma delta " * 30, "short", "epsilon zeta eta theta " * 30]
    first = sample_calibration(docs, tiny_tokenizer, samples=6, seqlen=16, seed=3, bos_id=None)
    again = sample_calibration(docs, tiny_tokenizer, samples=6, seqlen=16, seed=3, bos_id=None)
    other = sample_calibration(docs, tiny_tokenizer, samples=6, seqlen=16, seed=4, bos_id=None)
    assert first.shape == (6, 16)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    with_bos = sample_calibration(docs, tiny_tokenizer, samples=2, seqlen=16, seed=3, bos_id=0)
    assert (with_bos[:, 0] == 0).all()
