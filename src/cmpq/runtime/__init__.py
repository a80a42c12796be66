"""The runtime: quantized models in memory, loaded and saved.

- :mod:`.qlinear` — :class:`QuantizedLinear`, the module that holds a layer's
  stored tensors and computes its forward from them;
- :mod:`.hf` — the quantizer registered with transformers, so
  ``AutoModelForCausalLM.from_pretrained`` loads cmpq outputs;
- :mod:`.checkpoint` — quantized models to output directories and back.
"""
