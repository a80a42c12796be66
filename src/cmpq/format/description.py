"""The checkpoint's description: the JSON that says what a cmpq output holds.

Packed (CMPQ) outputs keep it in ``config.json`` as ``quantization_config``
(``quant_method: "cmpq"``), so transformers routes them to cmpq's quantizer;
dequantized (RTN) outputs keep it in ``cmpq.json``. It holds the format
version, the format, the quantized layers (shape, layout, bias) and the
quantization report's totals. docs/format.md lists every field.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CmpqError
from .spec import DESCRIPTION_FILE, FORMAT_VERSION, FORMATS, LAYOUTS, QUANT_METHOD


def is_json_int(value: object) -> bool:
    """A JSON integer (``True`` is an ``int`` to Python, not to the format)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_description(description: object, supported_version: int) -> None:
    """The parsed description (config.json's ``quantization_config``, or ``cmpq.json``):
    a known format version and format, well-formed layers."""
    if not isinstance(description, dict):
        raise CmpqError(f"expected a JSON object, found {type(description).__name__}")
    version = description.get("format_version")
    if not is_json_int(version) or version < 1:
        raise CmpqError(f"format_version must be a positive integer, found {version!r}")
    if version > supported_version:
        raise CmpqError(
            f"format version {version} is newer than this cmpq reads (versions up to "
            f"{supported_version}): upgrade cmpq"
        )
    kind = description.get("format")
    if kind not in FORMATS:
        raise CmpqError(f"format must be one of {', '.join(FORMATS)}, found {kind!r}")
    layers = description.get("layers")
    if kind == "dequantized":
        if isinstance(layers, dict):  # packed tensors would load as random weights
            raise CmpqError("format is 'dequantized' but layers lists packed layers")
        return
    if not isinstance(layers, dict) or not layers:
        raise CmpqError("layers must map every quantized layer to its shape, found none")
    config = description.get("config")
    layout = config.get("layout") if isinstance(config, dict) else None
    for name, entry in layers.items():
        check_layer_entry(name, entry, layout)


def check_layer_entry(name: str, entry: object, config_layout: object = None) -> None:
    """One ``layers`` entry: positive integer shape, a known layout, a boolean bias.

    ``config_layout`` (the run's ``config.layout``) must agree with the entry's:
    for a square single-group layer both layouts hold tables of the same size,
    so a flipped layout would otherwise load as a silently different model.
    """
    if not isinstance(entry, dict):
        raise CmpqError(f"{name}: expected an object with the layer's shape, found {entry!r}")
    for key in ("out_features", "in_features"):
        value = entry.get(key)
        if not is_json_int(value) or value <= 0:
            raise CmpqError(f"{name}: {key} must be a positive integer, found {value!r}")
    layout = entry.get("layout")
    if layout not in LAYOUTS:
        raise CmpqError(f"{name}: layout must be one of {', '.join(LAYOUTS)}, found {layout!r}")
    if config_layout is not None and layout != config_layout:
        raise CmpqError(f"{name}: layout {layout!r} differs from config.layout {config_layout!r}")
    if not isinstance(entry.get("bias"), bool):
        raise CmpqError(f"{name}: bias must be true or false, found {entry.get('bias')!r}")


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
