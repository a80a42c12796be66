"""The quantized linear module: it stores packed codes, tables, permutation and
sparse outliers, and computes its forward from them.

The forward de-quantizes the weight and multiplies (speed comes later). The
packed codes are unpacked once, lazily, into a uint8 cache that is not part of
the state dict, so what is saved is exactly what is accounted. The
de-quantized weight is cached the same way after the first forward (an fp32
copy: fast evaluation and calibration now, at the memory cost of the dense
weight; a fused kernel is future work).
"""

from __future__ import annotations

import torch
from torch import nn

from ..format.layer import LUTLayer, dequantize_layer, from_tensors, to_tensors
from ..format.spec import STORED_NAMES


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as a :class:`~cmpq.format.layer.LUTLayer`."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        out_features: int,
        in_features: int,
        layout: str,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features, self.layout = out_features, in_features, layout
        for name in STORED_NAMES:
            self.register_buffer(name, tensors.get(name))
        self.bias = (
            nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        )
        self._layer: LUTLayer | None = None
        self._dense: torch.Tensor | None = None

    @classmethod
    def from_layer(cls, layer: LUTLayer, bias: torch.Tensor | None = None) -> QuantizedLinear:
        return cls(to_tensors(layer), layer.out_features, layer.in_features, layer.layout, bias)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {
            name: getattr(self, name) for name in STORED_NAMES if getattr(self, name) is not None
        }

    def layer(self) -> LUTLayer:
        if self._layer is None:
            self._layer = from_tensors(
                self.stored_tensors(), self.out_features, self.in_features, self.layout
            )
        return self._layer

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_layer(self.layer())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is None or self._dense.dtype != x.dtype:
            self._dense = self.dequantized_weight().to(x.dtype)
        weight = self._dense
        return nn.functional.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        widths = ",".join(str(int(b)) for b in self.group_bits)
        return (
            f"in={self.in_features}, out={self.out_features}, bits={widths}, layout={self.layout}"
        )
