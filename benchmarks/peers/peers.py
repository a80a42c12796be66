"""Each peer quantizer, driven through its own pip package, brought back to dense weights.

Every adapter takes the full-precision model (fp32, cmpq's loader), quantizes
its decoder linears with the peer's own code, and writes the peer's
de-quantized weights back into those linears, so that cmpq's evaluator measures
every method on the same model object, text, windows and BOS rule. Embeddings
and lm_head stay in full precision for every method. Each adapter returns the
total stored bits of the decoder linears and where that figure comes from.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch

from cmpq.models.graph import quantizable_linears, set_weight_matrix, weight_matrix
from cmpq.models.sources import ALIASES, alias_checkpoint

HERE = Path(__file__).resolve().parent


@dataclass
class PeerContext:
    model_spec: str
    calibration: torch.Tensor  # (windows, seqlen) token ids, cmpq's C4 train windows
    tokenizer: object
    workdir: Path  # scratch space for this setting, outside the repository


@dataclass
class PeerResult:
    stored_bits: int  # all stored bits of the decoder linears
    bits_source: str
    peer_version: str
    calibration_seconds: float = 0.0  # shared preparation (llama.cpp's imatrix), not in seconds


def tensor_bits(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size() * 8


def fp_checkpoint(spec: str) -> Path:
    """The Hugging Face directory holding the full-precision weights of ``spec``."""
    if spec in ALIASES:
        return alias_checkpoint(spec)
    return Path(spec)


# --- GPTQ (gptqmodel) ---------------------------------------------------------


def gptq(model, setting: dict, context: PeerContext) -> PeerResult:
    # gptqmodel sizes its CPU thread pool to half the cores; on a 2-core machine
    # that is 1 worker, and its model loader then asks for a 2-worker virtual
    # pool on it and dies with "Virtual pool 'model_loader:cpu' requests 2
    # workers but parent 'cpu' only has 1".  Its own override, set before the
    # import, gives the CPU pool 2 workers.
    os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, os.cpu_count() or 1))
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from safetensors import safe_open

    calibration = [
        {"input_ids": row.tolist(), "attention_mask": [1] * row.numel()}
        for row in context.calibration
    ]
    # true_sequential=False: one calibration forward per block, as in the GPTQ paper
    # (gptqmodel's default runs one per sub-module group, 4-5 per block).
    # act order, symmetry and damping as the setting asks (issue 18: each GPTQ setting
    # runs act order on and off, symmetric and not, damping 0.01 and 0.05); a setting
    # without them takes gptqmodel 7.6's defaults (desc_act off but its group-aware
    # reordering on, symmetric, damping 0.05). The grid turns group-aware reordering
    # off, so "act order off" is GPTQ's column order.
    tuned = {k: setting[k] for k in ("desc_act", "sym", "damp_percent") if k in setting}
    if tuned:
        tuned["act_group_aware"] = False
    config = QuantizeConfig(
        bits=setting["bits"],
        group_size=setting["group"],
        true_sequential=False,
        offload_to_disk=False,
        **tuned,
    )
    # float32: on the CPU gptqmodel defaults to bfloat16, which this machine (AVX2, no
    # bf16 instructions) runs in software: 33 min a setting for smollm2-135m, against
    # ~11 min in float32 (docs/decisions.md). Perplexity barely moves: the 3-bit g128
    # rows measured in both came out slightly better in bfloat16.
    quantizer = GPTQModel.load(
        str(fp_checkpoint(context.model_spec)), config, device="cpu", dtype=torch.float32
    )
    quantizer.quantize(calibration, batch_size=1)
    saved = context.workdir / "gptq"
    quantizer.save(str(saved))
    del quantizer

    # gptqmodel's own torch kernel de-quantizes (fp16, the dtype its kernels run in)
    loaded = GPTQModel.load(str(saved), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    linears = quantizable_linears(model)
    done = set()
    for name, module in loaded.model.named_modules():
        if name in linears and hasattr(module, "dequantize_weight"):
            set_weight_matrix(linears[name], module.dequantize_weight().T.float())
            done.add(name)
    missing = set(linears) - done
    if missing:
        raise RuntimeError(
            f"gptqmodel left {len(missing)} linears unquantized: {sorted(missing)[:3]}"
        )
    bits = 0
    with safe_open(str(saved / "model.safetensors"), "pt") as stored:
        for key in stored.keys():
            if key.rsplit(".", 1)[0] in linears:  # qweight, qzeros, scales, g_idx (and bias)
                if not key.endswith(".bias"):
                    bits += tensor_bits(stored.get_tensor(key))
    return PeerResult(bits, "stored tensors (qweight, qzeros, scales, g_idx)", version("gptqmodel"))


# --- AWQ (llm-compressor, in its own environment) -------------------------------

AWQ_PYTHON = HERE.parent.parent / ".venv-awq" / "bin" / "python"


def awq(model, setting: dict, context: PeerContext) -> PeerResult:
    """AWQ by llm-compressor, run by awq_worker.py in .venv-awq (its transformers pin
    differs from cmpq's); the smoothed, de-quantized parameters come back to ``model``."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    python = Path(os.environ.get("CMPQ_AWQ_PYTHON", AWQ_PYTHON))
    if not python.is_file():
        raise RuntimeError(f"AWQ needs its own environment at {python}: run `make bench-awq`")
    calibration = context.workdir / "calibration.pt"  # the first `windows` of cmpq's
    torch.save(context.calibration[: setting.get("windows")], calibration)
    out = context.workdir / "awq"
    worker = [python, HERE / "awq_worker.py", fp_checkpoint(context.model_spec), calibration]
    run_tool([*worker, setting["bits"], setting["group"], out], context.workdir / "awq.log")
    result = json.loads((out / "result.json").read_text())
    linears = quantizable_linears(model)
    missing = set(linears) - set(result["quantized"])
    if missing:
        raise RuntimeError(f"AWQ left {len(missing)} linears unquantized: {sorted(missing)[:3]}")
    # AWQ rescales the norms and layers before each quantized linear: every parameter
    # it computes with comes back, not the linears' weights alone
    loaded = model.load_state_dict(load_file(out / "effective.safetensors"), strict=False)
    if loaded.unexpected_keys:
        raise RuntimeError(f"AWQ wrote parameters the model lacks: {loaded.unexpected_keys[:3]}")
    bits = 0
    with safe_open(str(out / "compressed" / "model.safetensors"), "pt") as stored:
        for key in stored.keys():  # weight_packed, weight_scale, weight_zero_point, weight_shape
            if key.rsplit(".", 1)[0] in linears and not key.endswith(".bias"):
                bits += tensor_bits(stored.get_tensor(key))
    return PeerResult(
        bits,
        "stored tensors (weight_packed, weight_scale, weight_zero_point, weight_shape)",
        f"llmcompressor {result['version']}",
    )


# --- HQQ -----------------------------------------------------------------------


def hqq(model, setting: dict, context: PeerContext) -> PeerResult:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=setting["bits"], group_size=setting["group"])
    bits = 0
    for module in quantizable_linears(model).values():
        copy = torch.nn.Linear(module.in_features, module.out_features, bias=False)
        copy.weight.data = weight_matrix(module).clone()
        # fp16 compute dtype: HQQ then stores its scales and zeros in fp16, as deployed
        quantized = HQQLinear(copy, config, compute_dtype=torch.float16, device="cpu")
        set_weight_matrix(module, quantized.dequantize().float())
        bits += tensor_bits(quantized.W_q)
        bits += sum(tensor_bits(quantized.meta[key]) for key in ("scale", "zero"))
    return PeerResult(bits, "stored tensors (W_q, scale, zero)", version("hqq"))


# --- torchao ------------------------------------------------------------------


def torchao(model, setting: dict, context: PeerContext) -> PeerResult:
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    dtype = getattr(torch, f"int{setting['bits']}")
    config = IntxWeightOnlyConfig(
        weight_dtype=dtype, granularity=PerGroup(setting["group"]), scale_dtype=torch.float16
    )
    bits = 0
    for module in quantizable_linears(model).values():
        copy = torch.nn.Linear(module.in_features, module.out_features, bias=False)
        copy.weight.data = weight_matrix(module).clone()
        quantize_(copy, config)
        stored = copy.weight
        set_weight_matrix(module, stored.dequantize().float())
        # qdata is held unpacked in int8; torchao's packed layouts store setting['bits']
        # bits per code, so codes are counted at that width.  Symmetric mapping has
        # all-zero zero points, which packed layouts do not store.
        bits += stored.qdata.numel() * setting["bits"] + tensor_bits(stored.scale)
        if stored.zero_point is not None and bool(stored.zero_point.any()):
            bits += tensor_bits(stored.zero_point)
    source = "codes at their documented packed width + stored fp16 scales (symmetric: no zeros)"
    return PeerResult(bits, source, version("torchao"))


# --- bitsandbytes ---------------------------------------------------------------


def bitsandbytes(model, setting: dict, context: PeerContext) -> PeerResult:
    import bitsandbytes.functional as bnbf

    bits = 0
    for module in quantizable_linears(model).values():
        weight = weight_matrix(module)
        packed, state = bnbf.quantize_4bit(
            weight,
            blocksize=setting["block"],
            quant_type="nf4",
            compress_statistics=setting["double_quant"],
        )
        set_weight_matrix(module, bnbf.dequantize_4bit(packed, state).float())
        bits += tensor_bits(packed) + tensor_bits(state.absmax) + tensor_bits(state.code)
        if state.nested:
            bits += tensor_bits(state.state2.absmax) + tensor_bits(state.state2.code)
            bits += tensor_bits(torch.as_tensor(state.offset, dtype=torch.float32))
    source = "stored tensors (packed codes, absmax, code table" + (
        "; nested absmax statistics)" if setting["double_quant"] else ")"
    )
    return PeerResult(bits, source, version("bitsandbytes"))


# --- llama.cpp --------------------------------------------------------------------

GGUF_LINEAR = re.compile(r"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight")


def llama_cpp_binaries() -> Path:
    """Build (once, cached outside the repository) and locate llama-quantize / llama-imatrix."""
    env = {**os.environ, "PIP": str(Path(sys.executable).with_name("pip"))}
    root = subprocess.run(
        [str(HERE / "build_llama_cpp.sh")], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    return Path(root) / "build" / "bin"


def run_tool(command: list, log: Path) -> None:
    with log.open("a") as out:
        out.write("$ " + " ".join(map(str, command)) + "\n")
        out.flush()
        done = subprocess.run(list(map(str, command)), stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-5:]
        raise RuntimeError(
            f"{Path(command[0]).name} failed ({done.returncode}): {' | '.join(tail)}"
        )


def llama_cpp_prepared(context: PeerContext, binaries: Path) -> tuple[Path, Path, float]:
    """The fp32 GGUF of the model and its importance matrix on cmpq's calibration text.

    The aliases are GGUF files already: llama-quantize re-writes that GGUF with
    every tensor de-quantized to F32, which are exactly the weights cmpq's
    full-precision model holds, with the original tokenizer and metadata.
    """
    import time

    if context.model_spec not in ALIASES:
        raise RuntimeError("the llama.cpp peer runs on the model aliases (GGUF sources) only")
    from cmpq.models.sources import fetch_gguf

    shared = context.workdir.parent / "llama.cpp-shared"
    shared.mkdir(parents=True, exist_ok=True)
    fp32 = shared / "model-f32.gguf"
    imatrix = shared / "imatrix.gguf"
    timing = shared / "imatrix-seconds.txt"
    log = shared / "prepare.log"
    if not fp32.is_file():
        staging = fp32.with_suffix(".partial")
        source = fetch_gguf(context.model_spec)
        run_tool([binaries / "llama-quantize", "--allow-requantize", source, staging, "F32"], log)
        staging.replace(fp32)
    if not imatrix.is_file():
        text = shared / "calibration.txt"
        decoded = [
            context.tokenizer.decode(row, skip_special_tokens=True) for row in context.calibration
        ]
        text.write_text("\n\n".join(decoded))
        start = time.perf_counter()
        staging = shared / "imatrix.partial.gguf"
        run_tool(
            [
                binaries / "llama-imatrix", "-m", fp32, "-f", text, "-o", staging,
                "-c", context.calibration.shape[1], "--chunks", context.calibration.shape[0],
                "-t", os.cpu_count() or 1,
            ],
            log,
        )  # fmt: skip
        staging.replace(imatrix)
        timing.write_text(f"{time.perf_counter() - start:.1f}\n")
    return fp32, imatrix, float(timing.read_text())


def llama_cpp(model, setting: dict, context: PeerContext) -> PeerResult:
    import gguf

    from cmpq.api import load_model

    binaries = llama_cpp_binaries()
    fp32, imatrix, imatrix_seconds = llama_cpp_prepared(context, binaries)
    out = context.workdir / f"{setting['type']}.gguf"
    command = [binaries / "llama-quantize", "--imatrix", imatrix]
    if setting.get("pure"):
        command.append("--pure")
    run_tool([*command, fp32, out, setting["type"], os.cpu_count() or 1], context.workdir / "log")

    linears = [t for t in gguf.GGUFReader(out).tensors if GGUF_LINEAR.fullmatch(t.name)]
    bits = sum(int(tensor.n_bytes) * 8 for tensor in linears)
    # the types llama.cpp chose per tensor (mixes, and fallbacks for widths not divisible by 256)
    types = Counter(tensor.tensor_type.name for tensor in linears)
    chosen = ", ".join(f"{name} x{count}" for name, count in types.most_common())
    # transformers de-quantizes the GGUF with gguf-py and undoes llama.cpp's layout
    quantized, _ = load_model(str(out))
    source = quantizable_linears(quantized)
    for name, module in quantizable_linears(model).items():
        set_weight_matrix(module, weight_matrix(source[name]).float())
    return PeerResult(
        bits,
        f"stored GGUF tensor bytes ({chosen})",
        f"llama.cpp via llama-cpp-python {version_of_build(binaries)}",
        imatrix_seconds,
    )


def version_of_build(binaries: Path) -> str:
    return binaries.parent.parent.name.removeprefix("llama.cpp-")


ADAPTERS = {
    "awq": awq,
    "gptq": gptq,
    "hqq": hqq,
    "torchao": torchao,
    "bitsandbytes": bitsandbytes,
    "llama.cpp": llama_cpp,
}
