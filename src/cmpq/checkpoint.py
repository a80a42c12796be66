"""Quantized output directories: written atomically, described by data.

Two formats (the description's field ``format``; every field in docs/format.md):

- ``packed`` (CMPQ): ``model.safetensors`` holds, for every quantized linear,
  only its stored tensors (``<name>.codes``, ``.lut``, ``.perm``,
  ``.group_bits``, ``.group_sizes``, and ``.outlier_crow/_cols/_values`` when
  it has outliers) and, for everything else, the original parameters in fp16;
  ``config.json`` carries the description as ``quantization_config``
  (``quant_method: "cmpq"``: the format version, the quantized layers with
  their shapes and layout, and the quantization report), so that
  ``AutoModelForCausalLM.from_pretrained`` loads it once cmpq is imported
  (:mod:`cmpq.hf`). Beside it, ``channel_stats.safetensors`` holds, by layer
  name, the float32 per-input-channel activation statistic that drove the bit
  allocation, in the original channel order. It is informational (``cmpq
  inspect`` draws it), is not needed to load the model, and is not part of
  ``model.safetensors``, so it is not counted in the stored bits;
- ``dequantized`` (RTN): a Hugging Face checkpoint holding the de-quantized
  weights, plus ``cmpq.json`` with the description (method and what the
  quantized storage costs).

Writing goes to a temporary sibling directory that is renamed into place only
when complete, so an interrupted run never leaves something that looks finished.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import CmpqError
from .qlinear import QuantizedLinear
from .report import QuantizationReport
from .validate import check_description

FORMAT_VERSION = 3
QUANT_METHOD = "cmpq"  # config.json's quantization_config.quant_method
WEIGHTS_FILE = "model.safetensors"
DESCRIPTION_FILE = "cmpq.json"
STATS_FILE = "channel_stats.safetensors"


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
    quantized = quantized_layers(model)
    try:
        if quantized:
            save_file(packed_state_dict(model), str(staging / WEIGHTS_FILE), {"format": "cmpq"})
            stats = {
                name: statistic.float().contiguous()
                for name, statistic in report.channel_statistics.items()
                if name in quantized
            }
            if stats:
                save_file(stats, str(staging / STATS_FILE))
            layers = {
                name: {
                    "out_features": m.out_features,
                    "in_features": m.in_features,
                    "layout": m.layout,
                    "bias": m.bias is not None,
                }
                for name, m in quantized.items()
            }
            description = {
                "format_version": FORMAT_VERSION,
                "format": "packed",
                **report.stored_dict(),
                "layers": layers,
            }
            config = copy.deepcopy(model.config)  # the model itself stays unchanged
            config.quantization_config = {"quant_method": QUANT_METHOD, **description}
            config.save_pretrained(staging)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(staging)
        else:
            model.save_pretrained(staging)
            description = {
                "format_version": FORMAT_VERSION,
                "format": "dequantized",
                **report.stored_dict(),
            }
            (staging / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n")
        tokenizer.save_pretrained(staging)
        for written in staging.iterdir():  # safetensors writes 0600; the output is for sharing
            written.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def packed_state_dict(model) -> dict[str, torch.Tensor]:
    """What a packed checkpoint stores: every tensor of the state dict once, tied
    copies left to their source (transformers re-ties them on loading), fp32
    parameters outside the quantized tables in fp16 (exact: quantizing rounded
    them to fp16, :func:`cmpq.quantize.round_unquantized_to_fp16`)."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    halves: dict[int, torch.Tensor] = {}  # by storage, so shared tensors are written once

    def stored(value: torch.Tensor) -> torch.Tensor:
        if value.dtype != torch.float32:
            return value.contiguous()
        return halves.setdefault(value.data_ptr(), value.half().contiguous())

    return {key: stored(value) for key, value in model.state_dict().items() if key not in tied}


def read_description(path: Path) -> dict:
    """The description of a cmpq output: ``cmpq.json``, or, where only
    ``config.json`` is there (a packed model re-saved by ``save_pretrained``),
    its ``quantization_config``."""
    path = Path(path)
    source = path / DESCRIPTION_FILE
    try:
        if source.is_file():
            description = json.loads(source.read_text())
        else:
            source = path / "config.json"
            description = json.loads(source.read_text()).get("quantization_config") or {}
    except (OSError, ValueError) as exc:
        raise CmpqError(f"{source} is unreadable: {exc}") from None
    check_format_version(description.get("format_version"), str(path))
    try:
        check_description(description, FORMAT_VERSION)
    except CmpqError as exc:
        raise CmpqError(f"{source}: {exc}") from None
    return description


def write_description(path: Path, description: dict) -> None:
    """Replace the description where :func:`read_description` finds it (tests edit
    checkpoints through this)."""
    path = Path(path)
    if (path / DESCRIPTION_FILE).is_file():
        (path / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n")
        return
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": QUANT_METHOD, **description}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def cmpq_quantization_config(path: Path) -> dict:
    """``config.json``'s ``quantization_config`` when it is cmpq's, else ``{}``."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    is_cmpq = isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD
    return quantization if is_cmpq else {}


def is_cmpq_output(path: Path) -> bool:
    """Whether ``path`` is a directory cmpq wrote (its own files, or re-saved by transformers)."""
    return (Path(path) / DESCRIPTION_FILE).is_file() or bool(cmpq_quantization_config(path))


def check_format_version(version, where: str) -> None:
    if not isinstance(version, int) or isinstance(version, bool):
        raise CmpqError(f"{where} declares no cmpq format version (found {version!r})")
    if version > FORMAT_VERSION:
        raise CmpqError(
            f"{where} has cmpq format version {version!r}; this cmpq reads versions up to "
            f"{FORMAT_VERSION}: upgrade cmpq"
        )
    if version < FORMAT_VERSION:
        raise CmpqError(
            f"{where} has cmpq format version {version}, written by an earlier cmpq; this one "
            f"reads version {FORMAT_VERSION} (see docs/format.md): quantize the model again"
        )


def quantized_layers(model) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def load_quantized(path: Path):
    """Load a cmpq output directory as ``(model, tokenizer)``."""
    from .models import load_checkpoint

    path = Path(path)
    description = read_description(path)
    if description.get("format") != "packed":
        return load_checkpoint(str(path), {})
    return _load_packed(path)


def _load_packed(path: Path):
    """Load through ``AutoModelForCausalLM.from_pretrained``: the quantizer cmpq
    registers (:mod:`cmpq.hf`) checks the stored tensors and builds the modules."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import hf  # noqa: F401  (registers the cmpq quantizer with transformers)

    # a packed description anywhere else (a hand-made cmpq.json) would let transformers
    # build the plain model with random linears
    if not cmpq_quantization_config(path):
        raise CmpqError(f"{path}/config.json has no cmpq quantization_config")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except CmpqError as exc:
        raise CmpqError(f"{path} is not a readable cmpq checkpoint: {exc}") from None
    except Exception as exc:  # transformers and safetensors raise many types for bad files
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CmpqError(f"{path} is not a readable cmpq checkpoint: {first}") from None
    return model.eval(), tokenizer
