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


GRAM_ROWS_PER_WRITE = 256  # rows of a Gram matrix copied to the CPU and written at once


@dataclass(frozen=True)
class StoredGram:
    """One float64 Gram matrix stored row-major in a file of a block's matrices
    (at byte ``offset``), read a row at a time: only the copy being built is
    in memory (a memory map would keep every page read counted as resident)."""

    path: Path
    offset: int
    size: int  # input channels
    device: str  # where the matrix is built (where it was measured)

    def _rows(self, order: torch.Tensor):
        """``(position, row)`` for each row index in ``order``, read from the file."""
        row = torch.empty(self.size, dtype=torch.float64)
        view = memoryview(row.numpy()).cast("B")
        with open(self.path, "rb", buffering=0) as file:
            for position, index in enumerate(order.tolist()):
                file.seek(self.offset + index * self.size * 8)
                file.readinto(view)
                yield position, row

    def diagonal(self) -> torch.Tensor:
        """The diagonal, one entry read per row."""
        entry = torch.empty(1, dtype=torch.float64)
        view = memoryview(entry.numpy()).cast("B")
        diagonal = torch.empty(self.size, dtype=torch.float64)
        with open(self.path, "rb", buffering=0) as file:
            for index in range(self.size):
                file.seek(self.offset + (index * self.size + index) * 8)
                file.readinto(view)
                diagonal[index] = entry[0]
        return diagonal.to(self.device)

    def permuted(self, order: torch.Tensor) -> torch.Tensor:
        """A new ``[size, size]`` copy with rows and columns in ``order``, built on its
        device a row at a time (no whole staging copy on the CPU)."""
        order = order.cpu()
        result = torch.empty(self.size, self.size, dtype=torch.float64, device=self.device)
        on_cpu = result.device.type == "cpu"
        picked = torch.empty(self.size, dtype=torch.float64)
        for position, row in self._rows(order):
            torch.index_select(row, 0, order, out=result[position] if on_cpu else picked)
            if not on_cpu:
                result[position].copy_(picked)
        return result


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

    def _grams(self, index: int) -> tuple[Path, Path]:
        """A block's Gram matrices: the raw float64 file and its index."""
        return self.path / f"grams-{index:05d}.f64", self.path / f"grams-{index:05d}.json"

    def save_grams(self, index: int, stats: dict[str, ChannelStats]) -> None:
        """One block's Gram matrices (shared ones stored once): float64 rows in one
        raw file, and where each linear's starts in an index beside it."""
        data, where = self._grams(index)
        partial = data.with_name(data.name + ".partial")
        placed: dict[int, list] = {}
        with open(partial, "wb") as file:
            for gram in (s.gram for s in stats.values()):
                if id(gram) in placed:
                    continue
                placed[id(gram)] = [file.tell(), gram.shape[0], str(gram.device)]
                for start in range(0, gram.shape[0], GRAM_ROWS_PER_WRITE):
                    rows = gram[start : start + GRAM_ROWS_PER_WRITE]
                    file.write(rows.to("cpu", torch.float64).contiguous().numpy().tobytes())
        os.replace(partial, data)
        index_text = json.dumps({name: placed[id(s.gram)] for name, s in stats.items()})
        where.with_name(where.name + ".partial").write_text(index_text)
        os.replace(where.with_name(where.name + ".partial"), where)

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
        """The block's Gram matrices by linear name: :class:`StoredGram` readers
        (``local``: the work runs on this machine and reads the file itself) or
        whole tensors. Linears fed one input share one object."""
        data, where = self._grams(index)
        sources = {}
        names = {}
        for name, (offset, size, device) in json.loads(where.read_text()).items():
            if offset not in sources:
                stored = StoredGram(data, offset, size, device)
                sources[offset] = stored if local else stored.permuted(torch.arange(size))
            names[name] = sources[offset]
        return names

    def drop_grams(self, index: int) -> None:
        for path in self._grams(index):
            path.unlink(missing_ok=True)

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
