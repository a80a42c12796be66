"""Writing output directories: checked before any work, written atomically.

An output directory is written into a temporary sibling that is renamed into
place only when complete, so an interrupted or failed run never leaves
something that looks finished. Before any model is loaded, :func:`check_output_dir`
refuses a directory that would be clobbered or cannot be written; before the
files are written, :func:`check_free_space` refuses a disk too full for them.
What goes into the directory is assembled by :mod:`cmpq.runtime.checkpoint`.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..errors import CmpqError

FREE_SPACE_MARGIN = 1.02  # what the size estimate may be short of, as a factor


def _existing_ancestor(path: Path) -> Path:
    """``path`` itself or the nearest directory above it that exists."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to clobber a non-empty directory unless asked, and refuse one that cannot
    be written (tried by making and removing a directory there): call before any work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CmpqError(f"`out` {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CmpqError(f"`out` {out} exists and is not empty; pass `overwrite` to replace it")
    where = _existing_ancestor(out.parent)
    if not where.is_dir():
        raise CmpqError(f"`out` {out} cannot be written: {where} is not a directory")
    try:
        Path(tempfile.mkdtemp(prefix=".cmpq-write-check.", dir=where)).rmdir()
    except OSError as exc:
        raise CmpqError(
            f"`out` {out} cannot be written ({exc.strerror or exc} in {where}); choose a "
            "directory you can write to"
        ) from None


def check_free_space(out: Path, needed_bytes: int) -> None:
    """Refuse to start writing ``needed_bytes`` (an estimate) where the disk holds less."""
    where = _existing_ancestor(Path(out).parent)
    free = shutil.disk_usage(where).free
    if free < needed_bytes * FREE_SPACE_MARGIN:
        raise CmpqError(
            f"`out` {out}: {where} has {free / 1e6:,.1f} MB free, the output needs about "
            f"{needed_bytes / 1e6:,.1f} MB; free some space or choose another directory"
        )


def is_disk_full(exc: BaseException) -> bool:
    """safetensors reports a full disk as a SafetensorError whose text names os error 28."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, SafetensorError) and "os error 28" in str(exc)


@contextmanager
def staged_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write into; renamed to ``out`` when the block
    ends without an error, removed (nothing left behind) when it fails."""
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary directory
    try:
        yield staging
        for written in staging.iterdir():  # safetensors writes 0600; the output is for sharing
            written.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(exc):
            raise CmpqError(
                f"`out` {out}: the disk filled up while writing; nothing was written. Free some "
                "space and run again"
            ) from None
        raise


def packed_state_dict(
    state_dict: Mapping[str, torch.Tensor], tied: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """What a packed checkpoint stores: every tensor of the state dict once, ``tied``
    copies left to their source (transformers re-ties them on loading), fp32 tensors
    (parameters outside the quantized tables) in fp16. That is exact: quantizing
    rounded them to fp16 (:func:`cmpq.quant.pipeline.round_unquantized_to_fp16`)."""
    tied = set(tied)
    halves: dict[int, torch.Tensor] = {}  # by storage, so shared tensors are written once

    def stored(value: torch.Tensor) -> torch.Tensor:
        if value.dtype != torch.float32:
            return value.contiguous()
        return halves.setdefault(value.data_ptr(), value.half().contiguous())

    return {key: stored(value) for key, value in state_dict.items() if key not in tied}
