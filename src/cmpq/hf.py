"""Hugging Face integration: ``AutoModelForCausalLM.from_pretrained(DIR)`` on a cmpq output.

A packed cmpq checkpoint's ``config.json`` carries ``quantization_config`` with
``quant_method: "cmpq"``; importing cmpq registers, through transformers' public
registration API, the config class and the quantizer that turns it into
:class:`~cmpq.qlinear.QuantizedLinear` modules:

- before the weights load (the model is still on the meta device), the quantizer
  reads the quantized layers' stored tensors from the checkpoint, checks them
  (:func:`cmpq.validate.check_layer_tensors`), and puts a ``QuantizedLinear``
  holding them where each listed linear was;
- transformers' loader then fills everything else (embeddings, norms, biases)
  and copies the same stored tensors into the modules' buffers;
- afterwards the tables and outlier values are put back in fp16 whatever
  ``dtype`` was asked for, so the model is exactly what was saved.

``save_pretrained`` works on such a model: the buffers are the stored tensors,
and non-quantized parameters are written in fp16 (they were rounded to fp16
when quantized, so nothing changes), which keeps the file the size cmpq reports.
"""

from __future__ import annotations

import torch
from safetensors import safe_open
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import QUANT_METHOD, check_format_version
from .errors import CmpqError
from .models import replace_module
from .qlinear import FP16_NAMES, REQUIRED_NAMES, STORED_NAMES, QuantizedLinear


@register_quantization_config(QUANT_METHOD)
class CmpqHfConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a packed cmpq checkpoint: the format version,
    the quantized layers (shapes, layout, bias) and the quantization report."""

    def __init__(self, format_version: int | None = None, layers: dict | None = None, **report):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.layers = layers or {}
        for key, value in report.items():
            if key != "quant_method":
                setattr(self, key, value)


def read_stored_tensors(files: list[str], layers: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Every quantized layer's stored tensors, by layer name, from safetensors ``files``."""
    wanted = {f"{name}.{key}": (name, key) for name in layers for key in STORED_NAMES}
    found: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for tensor_name in handle.keys():
                if tensor_name in wanted:
                    name, key = wanted[tensor_name]
                    found[name][key] = handle.get_tensor(tensor_name)
    return found


@register_quantizer(QUANT_METHOD)
class CmpqHfQuantizer(HfQuantizer):
    """Loads pre-quantized cmpq checkpoints (quantizing happens in ``cmpq.quantize``)."""

    requires_calibration = True

    def validate_environment(self, *args, **kwargs) -> None:
        check_format_version(self.quantization_config.format_version, "this checkpoint")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        layers = self.quantization_config.layers
        stored = read_stored_tensors(checkpoint_files or [], layers)
        for name, layer in layers.items():
            missing = [key for key in REQUIRED_NAMES if key not in stored[name]]
            if missing:
                raise CmpqError(f"tensor {name}.{missing[0]} is missing")
            bias = torch.empty(layer["out_features"]) if layer["bias"] else None
            module = QuantizedLinear(
                stored[name], layer["out_features"], layer["in_features"], layer["layout"], bias
            )
            try:
                replace_module(model, name, module)
            except AttributeError:
                raise CmpqError(
                    f"{name}: listed as quantized but the model has no such module"
                ) from None
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for module in model.modules():
            if isinstance(module, QuantizedLinear):
                for name in FP16_NAMES:
                    if getattr(module, name) is not None:
                        setattr(module, name, getattr(module, name).half())
        return model

    def get_state_dict_and_metadata(self, model):
        """Non-quantized fp32 parameters are written in fp16 (exact: cmpq rounded them)."""
        halves: dict[int, torch.Tensor] = {}  # by storage, so tied weights stay one tensor

        def stored(value: torch.Tensor) -> torch.Tensor:
            if value.dtype != torch.float32:
                return value
            return halves.setdefault(value.data_ptr(), value.half())

        state = {key: stored(value) for key, value in model.state_dict().items()}
        return state, {"format": "cmpq"}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False
