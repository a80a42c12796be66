"""Text for evaluation and calibration: the bundled corpora and user files.

The corpora ship inside the package (see ``datasets/README.md`` for sources
and licences), so nothing here touches the network or anything outside the
package. A dataset is named either by one of :data:`BUILTIN_DATASETS` or by a
path to a ``.txt`` file (read as one text) or a ``.jsonl`` file with a
``text`` field per line (documents).
"""

from __future__ import annotations

import json
import lzma
from functools import cache
from importlib.resources import files
from pathlib import Path

import torch

from ..errors import CmpqError

_WIKITEXT_TEST = "wikitext-2-raw-v1.test.raw.xz"
_C4_TRAIN = "c4-train.00000-of-01024.first1041.jsonl.xz"
_C4_VALIDATION = "c4-validation.00000-of-00008.first1025.jsonl.xz"

BUILTIN_DATASETS = ("wikitext2", "c4", "c4-train")


@cache
def _read_bundled(name: str) -> str:
    return lzma.decompress(files("cmpq.datasets").joinpath(name).read_bytes()).decode("utf-8")


def wikitext_rows(raw: str) -> list[str]:
    """Rows as ``load_dataset("wikitext", "wikitext-2-raw-v1")`` gives them.

    Text lines keep their trailing newline; blank lines (a single space in the
    raw file) become empty strings.
    """
    return [line if line.strip() else "" for line in raw.splitlines(keepends=True)]


def _jsonl_texts(content: str, source: str) -> list[str]:
    texts = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CmpqError(f"{source}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CmpqError(f"{source}: line {number} has no string field 'text'")
        texts.append(record["text"])
    return texts


def load_documents(spec: str) -> list[str]:
    """The dataset as a list of documents (used for calibration sampling).

    ``wikitext2`` is one document; ``c4``/``c4-train`` are the C4 documents; a
    ``.jsonl`` path gives one document per line, any other path one document.
    """
    if spec == "wikitext2":
        return [load_text(spec)]
    if spec == "c4":
        return _jsonl_texts(_read_bundled(_C4_VALIDATION), "c4")
    if spec == "c4-train":
        return _jsonl_texts(_read_bundled(_C4_TRAIN), "c4-train")
    path = _user_path(spec)
    content = path.read_text(encoding="utf-8")
    documents = _jsonl_texts(content, str(path)) if path.suffix == ".jsonl" else [content]
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise CmpqError(f"dataset file {path} is empty; give a file with some text in it")
    return documents


def load_text(spec: str) -> str:
    """The dataset as one evaluation text, joined by the usual convention."""
    if spec == "wikitext2":
        return "\n\n".join(wikitext_rows(_read_bundled(_WIKITEXT_TEST)))
    return " ".join(load_documents(spec))


def _user_path(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not path.is_file():
        names = ", ".join(BUILTIN_DATASETS)
        raise CmpqError(
            f"dataset '{spec}' is neither a built-in dataset ({names}) nor an existing file"
        )
    return path


def cut_windows(
    token_ids: torch.Tensor, seqlen: int, windows: int | None, bos_id: int | None
) -> torch.Tensor:
    """Non-overlapping evaluation windows cut from the start of the token stream.

    With ``bos_id`` every window is ``[bos] + seqlen - 1`` text tokens (models
    such as Gemma are trained never to see text without it); otherwise
    ``seqlen`` text tokens. ``windows=None`` takes every complete window.
    Returns a ``[windows, seqlen]`` int64 tensor.
    """
    if seqlen < 2:
        raise CmpqError(f"`seqlen` must be at least 2 (got {seqlen})")
    body = seqlen - 1 if bos_id is not None else seqlen
    available = token_ids.numel() // body
    if windows is None:
        windows = available
    if windows < 1:
        raise CmpqError(f"`windows` must be at least 1 (got {windows})")
    if windows > available:
        raise CmpqError(
            f"the text has {token_ids.numel()} tokens: room for {available} windows of "
            f"{seqlen} tokens, not {windows}; lower `windows` or `seqlen`"
        )
    batch = token_ids[: windows * body].reshape(windows, body).long()
    if bos_id is not None:
        batch = torch.cat([torch.full((windows, 1), bos_id, dtype=torch.long), batch], dim=1)
    return batch


def sample_calibration(
    documents: list[str],
    tokenizer,
    samples: int,
    seqlen: int,
    seed: int,
    bos_id: int | None,
) -> torch.Tensor:
    """``samples`` random windows of ``seqlen`` tokens from random documents.

    GPTQ's convention: pick a random document long enough for a window, then a
    random offset in it. Documents shorter than a window are skipped; if none
    is long enough the documents are concatenated and windows are cut at
    random offsets of the whole stream. Deterministic for a given seed.
    """
    body = seqlen - 1 if bos_id is not None else seqlen
    generator = torch.Generator().manual_seed(seed)
    encoded = [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in documents]
    long_enough = [ids for ids in encoded if len(ids) > body]
    if not long_enough:
        stream = [token for ids in encoded for token in ids]
        if len(stream) < body:
            raise CmpqError(
                f"the calibration text has {len(stream)} tokens, fewer than one window of "
                f"{seqlen}; give more text or lower `calib_seqlen`"
            )
        long_enough = [stream]
    rows = []
    for _ in range(samples):
        doc = long_enough[int(torch.randint(len(long_enough), (1,), generator=generator))]
        start = int(torch.randint(len(doc) - body + 1, (1,), generator=generator))
        rows.append(doc[start : start + body])
    batch = torch.tensor(rows, dtype=torch.long)
    if bos_id is not None:
        batch = torch.cat([torch.full((samples, 1), bos_id, dtype=torch.long), batch], dim=1)
    return batch
