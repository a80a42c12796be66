"""Hugging Face integration: ``AutoModelForCausalLM.from_pretrained(DIR)`` on a cmpq output.

A packed cmpq checkpoint's ``config.json`` carries ``quantization_config`` with
``quant_method: "cmpq"``; importing cmpq registers, through transformers' public
registration API, the config class and the quantizer that turns it into
:class:`~cmpq.runtime.qlinear.QuantizedLinear` modules:

- before the weights load (the model is still on the meta device), the quantizer
  reads the quantized layers' stored tensors from the checkpoint, checks them
  and the other tensors' names, dtypes and shapes (:mod:`cmpq.format.validate`), and
  puts a ``QuantizedLinear`` holding them where each listed linear was;
- transformers' loader then fills everything else (embeddings, norms, biases)
  and copies the same stored tensors into the modules' buffers;
- afterwards the tables and outlier values are put back in fp16 whatever
  ``dtype`` was asked for, so the model is exactly what was saved, and every
  stored tensor is copied out of the file's memory map (which is then
  released: the map would keep the pages loading touched resident).

``save_pretrained`` works on such a model: the buffers are the stored tensors,
and non-quantized parameters are written in fp16 (they were rounded to fp16
when quantized, so nothing changes), which keeps the file the size cmpq reports.
"""

from __future__ import annotations

import torch
from safetensors import SafetensorError
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import CmpqError
from ..format.checkpoint import packed_state_dict
from ..format.description import check_description, check_format_version
from ..format.shards import StoredTensors
from ..format.spec import FORMAT_VERSION, FP16_NAMES, QUANT_METHOD
from ..format.validate import LinearTarget, read_checked_layers
from ..models.graph import is_linear, replace_module, weight_matrix
from .qlinear import QuantizedLinear


def linear_targets(model) -> dict[str, LinearTarget]:
    """Every linear of ``model`` by name, as the format's checks see it."""
    return {
        name: LinearTarget(*weight_matrix(module).shape, bias=module.bias is not None)
        for name, module in model.named_modules()
        if is_linear(module)
    }


def tied_keys(model) -> set[str]:
    """The state-dict names transformers re-ties on loading (written once, as their source)."""
    return set(getattr(model, "all_tied_weights_keys", None) or {})


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


@register_quantizer(QUANT_METHOD)
class CmpqHfQuantizer(HfQuantizer):
    """Loads pre-quantized cmpq checkpoints (quantizing happens in ``cmpq.quantize``)."""

    requires_calibration = True

    def validate_environment(self, *args, **kwargs) -> None:
        check_format_version(self.quantization_config.format_version, "this checkpoint")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        description = self.quantization_config.to_dict()
        description.pop("quant_method", None)
        check_description(description, FORMAT_VERSION)
        if not checkpoint_files:
            raise CmpqError("a cmpq checkpoint needs its weight files; found none")
        try:  # transformers builds the model under a meta-device context: check on the CPU
            with torch.device("cpu"), StoredTensors(checkpoint_files) as handle:
                stored = read_checked_layers(
                    handle,
                    description,
                    linear_targets(model),
                    model.state_dict(keep_vars=True),
                    getattr(model, "all_tied_weights_keys", None),
                )
        except SafetensorError as exc:  # truncated or garbage: the header does not cover the file
            raise CmpqError(f"the weights are not readable safetensors files: {exc}") from None
        for name, layer in description["layers"].items():
            bias = torch.empty(layer["out_features"]) if layer["bias"] else None
            module = QuantizedLinear(
                stored[name], layer["out_features"], layer["in_features"], layer["layout"], bias
            )
            replace_module(model, name, module)
            # transformers' weight initialisers of some parents (GPT-2's attention and MLP)
            # reach for the child's dense .weight: the stored tensors need no initialising
            parent = model.get_submodule(name.rpartition(".")[0])
            module._is_hf_initialized = parent._is_hf_initialized = True
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # own copies: a view into the file's memory map would keep every page of the file
        # that loading touched (the fp16 embeddings too) resident as long as the model lives
        for module in model.modules():
            if isinstance(module, QuantizedLinear):
                for name, tensor in module.stored_tensors().items():
                    fp16 = name in FP16_NAMES and tensor.dtype != torch.float16
                    setattr(module, name, tensor.half() if fp16 else tensor.clone())
        return model

    def get_state_dict_and_metadata(self, model):
        """The tensors cmpq's own writer stores (non-quantized parameters in fp16);
        transformers sets the file's metadata itself."""
        return packed_state_dict(model.state_dict(), tied_keys(model)), {}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False
