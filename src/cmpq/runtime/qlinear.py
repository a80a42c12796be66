"""The quantized linear module: it stores packed codes, tables, permutation and
sparse outliers, and computes its forward from them through a backend
(:mod:`cmpq.runtime.backends`).

The module's buffers are exactly the stored tensors (docs/format.md), so
``state_dict``, ``save_pretrained`` and ``load_state_dict`` see the format
itself; nothing de-quantized is kept between forwards. Derived tensors the
kernels need (what the codes give at each outlier's position) are small,
non-persistent buffers (as are the column permutation, decoded from the stored
group index of each column, and the outliers' CSR row pointers, the sums of
the stored per-row counts), so ``.to(device)`` moves them and the state dict
never holds them. ``.to(dtype)`` leaves the fp16 tables and outlier values in fp16.
"""

from __future__ import annotations

import torch
from torch import nn

from ..format.layer import (
    LUTLayer,
    dequantize_rows,
    from_tensors,
    outlier_rows,
    row_pointers,
    stored_permutation,
    table_values_at,
    to_tensors,
)
from ..format.spec import FP16_NAMES, STORED_NAMES, index_dtype
from .backends import default_backend, resolve


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as a :class:`~cmpq.format.layer.LUTLayer`'s stored
    tensors."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        out_features: int,
        in_features: int,
        layout: str,
        bias: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features, self.layout = out_features, in_features, layout
        for name in STORED_NAMES:
            self.register_buffer(name, tensors.get(name))
        self.register_buffer("perm", None, persistent=False)
        self.register_buffer("outlier_base", None, persistent=False)
        self.register_buffer("outlier_crow", None, persistent=False)
        self.bias = (
            nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        )
        self.backend = backend or default_backend()
        self._resolved: tuple | None = None  # (backend name, device, layout) -> implementation
        self._kernel_layer: tuple | None = None  # (tensor addresses, ctypes struct)
        self._derived_source: tuple | None = None  # the tensors perm etc. were computed from
        self._header: tuple | None = None  # (tensor identities, group widths and counts)

    @classmethod
    def from_layer(cls, layer: LUTLayer, bias: torch.Tensor | None = None) -> QuantizedLinear:
        return cls(to_tensors(layer), layer.out_features, layer.in_features, layer.layout, bias)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {
            name: getattr(self, name) for name in STORED_NAMES if getattr(self, name) is not None
        }

    def layer(self) -> LUTLayer:
        """The layer with its codes unpacked (built on each call: for inspection, not forward)."""
        return from_tensors(self.stored_tensors(), self.out_features, self.in_features, self.layout)

    def dequantized_weight(self) -> torch.Tensor:
        """The whole ``[out, in]`` float32 weight (built on each call, never kept)."""
        rows = (0, self.out_features)
        return dequantize_rows(
            self.stored_tensors(), self.out_features, self.in_features, self.layout, rows
        )

    def _stored_key(self) -> tuple[int, ...]:
        """Identifies the stored tensors held now (a cache built from others is stale)."""
        return tuple(id(self._buffers[name]) for name in STORED_NAMES)

    def kernel_tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors plus ``perm`` (the column permutation, int16 or int32),
        ``outlier_base`` (what the codes give at each outlier's position: the kernels
        add ``x * (value - base)`` there) and ``outlier_crow`` (the int32 row pointers
        of the outliers), computed once for the stored tensors held."""
        tensors = self.stored_tensors()
        if self.perm is None or self._derived_source != self._stored_key():
            stored = {name: t.cpu() for name, t in tensors.items()}
            perm = stored_permutation(stored)
            self.perm = perm.to(index_dtype(self.in_features)).to(self.codes.device)
            self.outlier_base = self.outlier_crow = None
            if "outlier_values" in stored:
                base = self._outlier_base({**stored, "perm": perm})
                self.outlier_base = base.to(self.codes.device)
                self.outlier_crow = row_pointers(self.outlier_counts)
            self._derived_source = self._stored_key()
        tensors["perm"] = self.perm
        if "outlier_values" in tensors:
            tensors["outlier_base"] = self.outlier_base
            tensors["outlier_crow"] = self.outlier_crow
        return tensors

    def _outlier_base(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = outlier_rows(tensors["outlier_counts"], (0, self.out_features))
        cols = tensors["outlier_cols"]
        return table_values_at(tensors, self.out_features, self.layout, rows, cols).half()

    def group_header(self) -> tuple[list[int], list[int]]:
        """The bit-groups' widths and column counts as Python ints (read from the device
        once, not on every call)."""
        key = self._stored_key()
        if self._header is None or self._header[0] != key:
            self._header = (key, (self.group_bits.tolist(), self.group_sizes.tolist()))
        return self._header[1]

    def kernel_layer(self):
        """The CPU kernel's view of this layer's tensors (rebuilt when they change)."""
        from .cpu_kernel import layer_struct

        key = self._stored_key()
        if self._kernel_layer is None or self._kernel_layer[0] != key:
            struct = layer_struct(self.kernel_tensors(), self.out_features, self.in_features)
            self._kernel_layer = (key, struct)
        return self._kernel_layer[1]

    def implementation(self):
        """The backend object that runs this layer where it is now."""
        key = (self.backend, self.codes.device, self.layout)
        if self._resolved is None or self._resolved[0] != key:
            self._resolved = (key, resolve(self.backend, self))
        return self._resolved[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
        y = self.implementation().forward(self, rows)
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        kept = {name: getattr(self, name) for name in FP16_NAMES if getattr(self, name) is not None}
        if self.outlier_base is not None:
            kept["outlier_base"] = self.outlier_base
        super()._apply(fn, recurse)
        for name, before in kept.items():  # moved, but never converted out of fp16
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        self._kernel_layer = None  # the struct points at the tensors before the move
        if self.perm is not None:
            self._derived_source = self._stored_key()  # moved with the others: still right
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)  # copies in place: addresses stay
        self.perm = self.outlier_base = self.outlier_crow = None
        self._kernel_layer = self._derived_source = self._header = None

    def extra_repr(self) -> str:
        widths = ",".join(str(int(b)) for b in self.group_bits)
        return (
            f"in={self.in_features}, out={self.out_features}, bits={widths}, "
            f"layout={self.layout}, backend={self.backend}"
        )


def quantized_layers(model) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def set_backend(model, backend: str) -> dict[str, str]:
    """Run every quantized linear of ``model`` on ``backend`` (see
    :mod:`cmpq.runtime.backends`); returns which backend each layer got. A named
    backend that cannot run a layer raises :class:`~cmpq.errors.CmpqError` here,
    before any forward."""
    chosen = {}
    for name, module in quantized_layers(model).items():
        module.backend = backend
        chosen[name] = module.implementation().name
    return chosen
