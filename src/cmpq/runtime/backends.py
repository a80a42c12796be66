"""How a :class:`~cmpq.runtime.qlinear.QuantizedLinear` computes its output: backends.

Every backend computes ``x W^T`` from the stored tensors themselves; none
keeps a de-quantized ``[out, in]`` weight between calls (docs/runtime.md):

- ``torch``: the reference. De-quantizes a stripe of rows at a time (about
  4 MB of float32) and multiplies it with torch: its extra memory is one
  stripe, not one layer. Every layout, every device.
- ``cpu``: the compiled kernel (:mod:`cmpq.runtime.cpu_kernel`). Up to 8
  tokens (decode): look-up tables ``x_j * LUT_j`` built per call, the codes
  streamed once; more tokens (prefill): stripes de-quantized by the kernel,
  multiplied by torch's BLAS. Column layout, CPU tensors.
- ``triton``: the GPU kernels (:mod:`cmpq.runtime.triton_kernels`). Column
  layout, CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``).
- ``auto``: ``triton`` for a layer on a GPU, ``cpu`` on the CPU, ``torch``
  where that one cannot run it. Where the fast backend for the device
  cannot run a column-layout layer (no compiler, no triton), one warning
  line says so.

The backend is chosen by name at load (``cmpq.load(..., backend=)``,
``--backend``, or the ``CMPQ_BACKEND`` environment variable for
``from_pretrained``); a named backend that cannot run a layer is a
:class:`~cmpq.errors.CmpqError` in one line.
"""

from __future__ import annotations

import os
import warnings

import torch

from ..errors import CmpqError, CmpqWarning
from ..format.layer import dequantize_rows
from ..format.packing import TILE_ROWS
from .stripes import matmul_by_stripes, stripe_rows

BACKENDS = ("auto", "cpu", "triton", "torch")
ENV_VAR = "CMPQ_BACKEND"
STRIPE_FLOATS = 1 << 20  # rows de-quantized at once: about 4 MB of float32


def default_backend() -> str:
    """``$CMPQ_BACKEND`` when set (checked), else ``auto``."""
    name = os.environ.get(ENV_VAR, "auto") or "auto"
    return check_backend_name(name, f"${ENV_VAR}")


def check_backend_name(name: str, where: str = "`backend`") -> str:
    if name not in BACKENDS:
        raise CmpqError(f"{where} must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def layer_by_stripes(module, x: torch.Tensor, dequantize) -> torch.Tensor:
    """``x @ W^T`` with ``W`` produced by ``dequantize(first, stop)``, about
    :data:`STRIPE_FLOATS` values (whole row tiles) at a time."""
    step = stripe_rows(module.in_features, STRIPE_FLOATS, TILE_ROWS)
    return matmul_by_stripes(module.out_features, x, dequantize, step)


class TorchBackend:
    """The reference: stripes de-quantized with torch ops, multiplied with torch."""

    name = "torch"

    def unavailable(self, module) -> str | None:
        return None

    def forward(self, module, x: torch.Tensor) -> torch.Tensor:
        tensors = module.kernel_tensors()  # the stored ones and the decoded permutation

        def dequantize(first: int, stop: int) -> torch.Tensor:
            weight = dequantize_rows(
                tensors, module.out_features, module.in_features, module.layout, (first, stop)
            )
            return weight.to(x.device)

        return layer_by_stripes(module, x, dequantize)


class CpuBackend:
    """The compiled CPU kernel."""

    name = "cpu"

    def unavailable(self, module) -> str | None:
        from . import cpu_kernel

        if module.codes.device.type != "cpu":
            return f"the cpu backend runs CPU tensors, this layer is on {module.codes.device}"
        if module.layout != "column":
            return "the cpu backend runs the column layout (row-layout layers run on torch)"
        return cpu_kernel.unavailable_reason()

    def forward(self, module, x: torch.Tensor) -> torch.Tensor:
        from . import cpu_kernel

        layer = module.kernel_layer()
        if x.shape[0] <= cpu_kernel.DECODE_TOKENS:
            return cpu_kernel.decode(layer, x, module.out_features)

        def dequantize(first: int, stop: int) -> torch.Tensor:
            buffer = torch.empty(stop - first, module.in_features, dtype=torch.float32)
            return cpu_kernel.dequantize_rows(layer, first, stop, buffer)

        return layer_by_stripes(module, x, dequantize)


class TritonBackend:
    """The GPU kernels (CUDA tensors, or CPU tensors under Triton's interpreter)."""

    name = "triton"

    def unavailable(self, module) -> str | None:
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if module.codes.device.type != "cuda" and not interpreted:
            return f"the triton backend runs CUDA tensors, this layer is on {module.codes.device}"
        if module.layout != "column":
            return "the triton backend runs the column layout (row-layout layers run on torch)"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (pip install 'cmpq[gpu]')"
        return None

    def forward(self, module, x: torch.Tensor) -> torch.Tensor:
        from .triton_kernels import triton_linear

        tensors, header = module.kernel_tensors(), module.group_header()
        return triton_linear(tensors, module.out_features, module.in_features, x, header)


IMPLEMENTATIONS = {b.name: b for b in (TritonBackend(), CpuBackend(), TorchBackend())}
_warned: set[str] = set()


def resolve(name: str, module):
    """The backend that runs ``module`` for the requested ``name``."""
    if name != "auto":
        backend = IMPLEMENTATIONS[check_backend_name(name)]
        reason = backend.unavailable(module)
        if reason is not None:
            raise CmpqError(f"backend {name!r} cannot run this model: {reason}")
        return backend
    on_gpu = module.codes.device.type == "cuda"
    preferred = IMPLEMENTATIONS["triton" if on_gpu else "cpu"]
    reason = preferred.unavailable(module)
    if reason is None:
        return preferred
    if module.layout == "column" and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"{reason}; running on the torch backend", CmpqWarning, stacklevel=3)
    return IMPLEMENTATIONS["torch"]
