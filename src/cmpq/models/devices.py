"""Which device the quantization work runs on: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""

from __future__ import annotations

import torch

from ..errors import CmpqError

DEVICES = ("auto", "cpu", "cuda", "cuda:N")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The torch device ``name`` asks for (``auto``: the first GPU when there is one);
    a clear error when it is not here."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "cpu").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise CmpqError(
                f"`device` {name}: no CUDA GPU is available here (torch {torch.__version__}); "
                "use `device` cpu or auto"
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CmpqError(
                f"`device` {name}: there are {torch.cuda.device_count()} GPUs "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
            )
        return device
    raise CmpqError(f"`device` must be one of {', '.join(DEVICES)} (got {name!r})")


class ToDevice:
    """A block looper's loader for a model held on the CPU: each block moves to
    ``device`` to run and back after."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def load(self, index: int, block) -> None:
        block.to(self.device)

    def release(self, index: int, block) -> None:
        block.to("cpu")
