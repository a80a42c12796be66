"""A quantization run's working directory: what each pass has finished, on disk.

The pipeline (:mod:`cmpq.quant.pipeline`) runs in two passes over the blocks
(measure, then quantize). Each block's measurements (per-channel statistics,
per-column distortions, and its Gram matrices when they are kept on disk
instead of recomputed) are written here as the block finishes, so memory holds
one block's worth; with ``resumable`` the hidden states between blocks are
saved too, so an interrupted run continues from its last finished block.

Every file is written to a temporary name and renamed into place: a run killed
mid-write leaves the previous state, never a torn file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..calib.looper import BlockWalk
from ..calib.stats import ChannelStats

WALK_SAVE_SECONDS = 60.0  # an interrupted walk loses at most about this much work


def _atomic_save(value, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save(value, partial)
    os.replace(partial, path)


def _load(path: Path, mmap: bool = False):
    return torch.load(path, weights_only=True, mmap=mmap)


@dataclass(frozen=True)
class StoredGram:
    """One Gram matrix in a block's file of them: calling it maps the file and
    returns the matrix (read from disk as it is used, released with the last
    reference), so a matrix is in memory only while its operator is computed."""

    path: Path
    name: str
    size: int  # input channels

    def __call__(self) -> torch.Tensor:
        return _load(self.path, mmap=True)[self.name]


class WorkDir:
    """Files of one run under ``path``; ``resumable`` also keeps the walk's hidden states."""

    def __init__(self, path: Path, resumable: bool = False) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.resumable = resumable
        self._walk_saved: dict[str, float] = {}  # when each stage's walk was last saved

    @classmethod
    def temporary(cls) -> WorkDir:
        """A directory under the system's temporary directory, removed by :meth:`remove`."""
        return cls(Path(tempfile.mkdtemp(prefix="cmpq-run.")))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.path).free

    # run identity -----------------------------------------------------------------------
    def check_run(self, identity: dict) -> None:
        """Record what this run is; refuse to continue a different one."""
        from ..errors import CmpqError

        path = self.path / "run.json"
        if path.exists():
            recorded = json.loads(path.read_text())
            if recorded != identity:
                changed = sorted(k for k in identity if recorded.get(k) != identity.get(k))
                raise CmpqError(
                    f"`resume`: {self.path} holds a run with other settings "
                    f"({', '.join(changed)}); run again without `resume` to start over"
                )
            return
        path.write_text(json.dumps(identity, indent=1, sort_keys=True) + "\n")

    # pass 1: measurements ---------------------------------------------------------------
    def _measured(self, index: int) -> Path:
        return self.path / f"measured-{index:05d}.pt"

    def _grams(self, index: int) -> Path:
        return self.path / f"grams-{index:05d}.pt"

    def save_grams(self, index: int, stats: dict[str, ChannelStats]) -> None:
        """One block's Gram matrices by linear name (shared ones stored once)."""
        _atomic_save({name: s.gram for name, s in stats.items()}, self._grams(index))

    def save_measurement(
        self, index: int, stats: dict[str, ChannelStats], distortions: dict[str, torch.Tensor]
    ) -> None:
        """One block's statistics and distortions, by name in the block: it is measured."""
        record = {
            "stats": {name: s.as_tensors() for name, s in stats.items()},
            "distortions": distortions,
        }
        _atomic_save(record, self._measured(index))

    def measurement(self, index: int) -> tuple[dict[str, ChannelStats], dict[str, torch.Tensor]]:
        record = _load(self._measured(index))
        stats = {name: ChannelStats.from_tensors(t) for name, t in record["stats"].items()}
        return stats, record["distortions"]

    def measured(self, index: int) -> bool:
        return self._measured(index).exists()

    def gram_loaders(self, index: int, local: bool = True) -> dict:
        """The block's Gram matrices by linear name, as :class:`StoredGram` loaders
        (``local``: the work runs on this machine and reads the file itself) or
        as tensors. Linears fed one input share one object."""
        path = self._grams(index)
        grams = _load(path, mmap=True)  # memory-mapped: nothing read yet
        sources = {}
        for name, gram in grams.items():
            if id(gram) not in sources:
                sources[id(gram)] = StoredGram(path, name, gram.shape[0]) if local else gram.clone()
        return {name: sources[id(gram)] for name, gram in grams.items()}

    def drop_grams(self, index: int) -> None:
        self._grams(index).unlink(missing_ok=True)

    # walks: the hidden states between blocks ---------------------------------------------
    def _walk(self, stage: str) -> Path:
        return self.path / f"walk-{stage}.pt"

    def save_walk(self, stage: str, walk: BlockWalk, final: bool = False) -> None:
        """Save where a walk stands, at most every :data:`WALK_SAVE_SECONDS` (the
        hidden states are the size of the calibration activations; writing them
        after every block of a small model cost more than the block), and always
        when it is ``final``."""
        if not self.resumable:
            return
        now = time.monotonic()
        if not final and now - self._walk_saved.get(stage, 0.0) < WALK_SAVE_SECONDS:
            return
        # the windows as they are: no concatenated copy
        _atomic_save({"index": walk.index, "hidden": walk.hidden}, self._walk(stage))
        self._walk_saved[stage] = time.monotonic()

    def walk(self, stage: str) -> BlockWalk | None:
        """Where an interrupted walk of ``stage`` stopped (``None``: from the start)."""
        path = self._walk(stage)
        if not (self.resumable and path.exists()):
            return None
        record = _load(path, mmap=True)  # read as the walk goes, like spilled states
        return BlockWalk(int(record["index"]), list(record["hidden"]))

    # pass 2: finished blocks ------------------------------------------------------------
    def _done(self, index: int) -> Path:
        return self.path / f"done-{index:05d}.pt"

    def save_done(self, index: int, rows: list, statistics: dict[str, torch.Tensor]) -> None:
        """Block ``index`` is quantized and written: its report rows and the channel
        statistics that drove it."""
        _atomic_save({"rows": rows, "statistics": statistics}, self._done(index))

    def is_done(self, index: int) -> bool:
        return self._done(index).exists()

    def done(self, index: int) -> tuple[list, dict[str, torch.Tensor]] | None:
        path = self._done(index)
        if not path.exists():
            return None
        record = _load(path)
        return [tuple(row) for row in record["rows"]], record["statistics"]
