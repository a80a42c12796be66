"""Quantized output directories: written atomically, described by ``cmpq.json``.

Two formats (``cmpq.json`` field ``format``):

- ``dequantized`` (RTN): a Hugging Face checkpoint holding the de-quantized
  weights, plus ``cmpq.json`` with the method and what the quantized storage
  costs;
- ``packed`` (CMPQ): ``model.safetensors`` holds, for every quantized linear,
  only its stored tensors (``<name>.codes``, ``.lut``, ``.perm``,
  ``.group_bits``, ``.group_sizes``, and ``.outlier_crow/_cols/_values`` when
  it has outliers) and, for everything else, the original parameters in fp16;
  ``cmpq.json`` lists the quantized layers with their shapes and layout.

Writing goes to a temporary sibling directory that is renamed into place only
when complete, so an interrupted run never leaves something that looks finished.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from .errors import CmpqError
from .models import replace_module
from .qlinear import QuantizedLinear
from .report import QuantizationReport
from .validate import check_description, read_checked_layers

FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
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
    quantized = quantized_layers(model)
    try:
        if quantized:
            model.config.save_pretrained(staging)
            with unquantized_in_fp16(model):
                save_model(model, str(staging / WEIGHTS_FILE), metadata={"format": "cmpq"})
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
        else:
            model.save_pretrained(staging)
            description = {
                "format_version": FORMAT_VERSION,
                "format": "dequantized",
                **report.stored_dict(),
            }
        tokenizer.save_pretrained(staging)
        (staging / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


@contextmanager
def unquantized_in_fp16(model):
    """Hold every fp32 parameter outside the quantized tables in fp16 while saving.

    Embeddings, norms, lm_head and biases are stored in fp16 (loading casts them
    back to fp32); the model is left as it was.
    """
    kept = [p for p in model.parameters() if p.dtype == torch.float32]  # tied ones once
    originals = [p.data for p in kept]
    try:
        for p in kept:
            p.data = p.data.half()
        yield
    finally:
        for p, data in zip(kept, originals, strict=True):
            p.data = data


def read_description(path: Path) -> dict:
    try:
        description = json.loads((Path(path) / DESCRIPTION_FILE).read_text())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not even text
        raise CmpqError(f"{path}/{DESCRIPTION_FILE} is unreadable: {exc}") from None
    try:
        check_description(description, FORMAT_VERSION)
    except CmpqError as exc:
        raise CmpqError(f"{path}/{DESCRIPTION_FILE}: {exc}") from None
    return description


def quantized_layers(model) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def load_quantized(path: Path):
    """Load a cmpq output directory as ``(model, tokenizer)``."""
    from .models import load_checkpoint

    path = Path(path)
    description = read_description(path)
    if description.get("format") != "packed":
        return load_checkpoint(str(path), {})
    return _load_packed(path, description)


def _load_packed(path: Path, description: dict):
    """Build the model from its config, put QuantizedLinear modules where the
    description says, then load every stored tensor into place."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    weights = path / WEIGHTS_FILE
    try:
        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with safe_open(str(weights), framework="pt") as handle:
            stored = read_checked_layers(handle, model, description)
            for name, layer in description["layers"].items():
                bias = handle.get_tensor(f"{name}.bias") if layer["bias"] else None
                module = QuantizedLinear(
                    stored[name], layer["out_features"], layer["in_features"], layer["layout"], bias
                )
                replace_module(model, name, module)
        load_model(model, str(weights), strict=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except SafetensorError as exc:  # truncated or garbage: the header does not cover the file
        raise CmpqError(f"{weights} is not a readable safetensors file: {exc}") from None
    except (CmpqError, OSError, KeyError, RuntimeError, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CmpqError(f"{path} is not a readable cmpq checkpoint: {first}") from None
    model.tie_weights()
    return model.eval(), tokenizer
