"""Quantize a checkpoint on disk into an output directory, one block in memory.

The model's blocks wait on the meta device and are read from the checkpoint's
safetensors one at a time (:mod:`cmpq.models.streaming`); each quantized block
is written to a file of its own as soon as it is done
(:class:`cmpq.runtime.checkpoint.BlockFiles`), and at the end the output's
shards are assembled from those files. Everything in between lives in a work
directory beside the output, ``.<out>.partial``: an interrupted run (Ctrl-C,
killed, out of memory) continues from its last finished block with
``resume=True`` and writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import torch

from ..config import CMPQConfig
from ..errors import CmpqError, CmpqWarning
from ..format.spec import FORMAT_VERSION
from ..memory import return_freed_memory
from ..models.streaming import CheckpointBlocks, StreamedCheckpoint
from ..runtime.checkpoint import BlockFiles, save_quantized
from .executor import Executor
from .pipeline import calibration_batch, hidden_state_dtype, quantize_cmpq
from .report import QuantizationReport
from .workdir import WorkDir


def work_directory(out: Path) -> Path:
    """Where a run writing ``out`` keeps its partial work."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.partial"


def run_identity(streamed: StreamedCheckpoint, config: CMPQConfig, batch: torch.Tensor) -> dict:
    """What must match for a run to continue another: source, options, calibration."""
    return {
        "model": str(streamed.path.resolve()),
        "config": config.as_dict(),
        "calibration_sha256": hashlib.sha256(batch.numpy().tobytes()).hexdigest(),
        "format_version": FORMAT_VERSION,
    }


def quantize_streamed(
    streamed: StreamedCheckpoint,
    config: CMPQConfig,
    out: Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    max_shard_size: int | None = None,
    device: torch.device | str = "cpu",
    executor: Executor | None = None,
    progress: bool = True,
    calibration: torch.Tensor | None = None,
    hidden_dtype: str = "float32",
) -> QuantizationReport:
    """CMPQ ``streamed`` into ``out``, one block in memory at a time (see module doc);
    ``hidden_dtype`` holds the calibration hidden states between blocks."""
    held = hidden_state_dtype(hidden_dtype)
    config = config.with_model_tuning(whole=False)  # auto: a streamed model is not tuned
    if calibration is None:
        calibration = calibration_batch(streamed.tokenizer, streamed.model, config)
    partial = work_directory(out)
    if partial.exists() and not resume:
        warnings.warn(
            f"removing the unfinished run in {partial} (pass `resume` to continue it)",
            CmpqWarning,
            stacklevel=2,
        )
        shutil.rmtree(partial)
    elif resume and not partial.exists():
        raise CmpqError(f"`resume`: there is no unfinished run to continue ({partial} is missing)")
    workdir = WorkDir(partial, resumable=True)
    workdir.check_run({**run_identity(streamed, config, calibration), "hidden_dtype": hidden_dtype})
    blocks = BlockFiles(partial / "blocks", streamed.prefix)
    report = quantize_cmpq(
        streamed.model,
        config,
        calibration,
        progress,
        executor=executor,
        loader=CheckpointBlocks(streamed, device),
        sink=blocks,
        workdir=workdir,
        hidden_dtype=held,
    )

    return_freed_memory()  # the blocks' leftovers, before the output is assembled

    def fetch(key: str) -> torch.Tensor:
        stored = blocks.tensor(key)
        return stored if stored is not None else streamed.read(key)

    model, tokenizer = streamed.model, streamed.tokenizer
    save_quantized(model, tokenizer, report, out, overwrite, max_shard_size, fetch)
    workdir.remove()
    return report
