"""AWQ through llm-compressor, in its own environment (.venv-awq, see `make bench-awq`).

    .venv-awq/bin/python benchmarks/peers/awq_worker.py CHECKPOINT CALIBRATION.pt BITS GROUP OUT

llm-compressor 0.14 pins transformers <= 5.17 and cmpq pins 5.23, so AWQ cannot
share the peers environment: peers.awq runs this script in a child process.
It quantizes the full-precision checkpoint with AWQ (activation-aware scales,
then asymmetric group-wise integer weights, llm-compressor's defaults otherwise)
on cmpq's calibration windows, and writes to OUT:

- ``compressed/``: llm-compressor's own compressed checkpoint (fp16), whose
  stored tensors give the bits;
- ``effective.safetensors``: every parameter the model computes with after AWQ
  (the smoothed norms and layers, and each quantized linear's weight as its
  codes decode to), for cmpq's evaluator;
- ``result.json``: the quantized linears, the version and the seconds.
"""

from __future__ import annotations

import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch


def main() -> None:
    checkpoint, calibration, bits, group, out = sys.argv[1:6]
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if not torch.cuda.is_available():
        # AWQ pins its cached activations for faster copies to an accelerator; pinning
        # needs one ("Cannot access accelerator device"). On the CPU there is nothing
        # to copy to, so pinning is skipped (a speed-up only; the arithmetic is unchanged).
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    windows = torch.load(calibration)
    dataset = Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )
    weights = QuantizationArgs(
        num_bits=int(bits), type="int", symmetric=False, strategy="group", group_size=int(group)
    )
    recipe = [
        AWQModifier(duo_scaling="both"),
        QuantizationModifier(
            config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
            ignore=["lm_head"],
        ),
    ]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        max_seq_length=windows.shape[1],
        num_calibration_samples=windows.shape[0],
    )
    seconds = time.perf_counter() - start

    quantized = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "weight_scale"):
                # the scales as the fp16 checkpoint stores them
                scale = module.weight_scale.to(torch.float16).to(torch.float32)
                quantized[name] = fake_quantize(
                    module.weight, scale, module.weight_zero_point, weights
                )
    effective = {
        name: tensor.detach().clone().contiguous()
        for name, tensor in model.state_dict().items()
        if not name.rsplit(".", 1)[-1].startswith(("weight_scale", "weight_zero_point", "weight_g"))
    }
    for name, weight in quantized.items():
        effective[f"{name}.weight"] = weight.contiguous()
    if model.config.tie_word_embeddings:
        effective.pop("lm_head.weight", None)
    save_file(effective, str(out / "effective.safetensors"))
    model.to(torch.float16)
    model.save_pretrained(str(out / "compressed"), save_compressed=True)
    (out / "result.json").write_text(
        json.dumps(
            {
                "quantized": sorted(quantized),
                "version": version("llmcompressor"),
                "seconds": seconds,
            }
        )
    )


if __name__ == "__main__":
    main()
