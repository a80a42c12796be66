"""Quantized output directories: written atomically, described by ``cmpq.json``.

Format version 1 (RTN): the directory is a Hugging Face checkpoint holding the
de-quantized weights, plus ``cmpq.json`` describing how they were made and what
the quantized storage would cost. Writing goes to a temporary sibling
directory that is renamed into place only when complete, so an interrupted run
never leaves something that looks finished.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .errors import CmpqError
from .report import QuantizationReport

FORMAT_VERSION = 1
DESCRIPTION_FILE = "cmpq.json"


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to clobber a non-empty directory unless asked; call before any work."""
    if out.exists() and not out.is_dir():
        raise CmpqError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CmpqError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


def save_quantized(
    model, tokenizer, report: QuantizationReport, out: Path, overwrite: bool = False
) -> Path:
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary directory
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        description = {
            "format_version": FORMAT_VERSION,
            "format": "dequantized",
            **report.as_dict(),
        }
        (staging / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def read_description(path: Path) -> dict:
    try:
        description = json.loads((Path(path) / DESCRIPTION_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CmpqError(f"{path}/{DESCRIPTION_FILE} is unreadable: {exc}") from None
    version = description.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CmpqError(
            f"{path} has cmpq format version {version!r}; this cmpq reads versions up to "
            f"{FORMAT_VERSION}: upgrade cmpq"
        )
    return description


def load_quantized(path: Path):
    """Load a cmpq output directory as ``(model, tokenizer)``."""
    from .models import load_checkpoint

    read_description(path)
    return load_checkpoint(str(path), {})
