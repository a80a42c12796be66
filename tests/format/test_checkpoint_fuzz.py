"""Fuzzing the packed-checkpoint loader with single mutations of a small checkpoint.

Every mutated checkpoint must either be refused with a one-line CmpqError
(naming the tensor, for a tensor mutation) or load as a model that is exactly
the original (a mutation that keeps the meaning) or, for a mutation that only
changes values inside their valid ranges, a model with finite logits. Any
other exception, an out-of-range gather at the first forward included, fails.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from cmpq.errors import CmpqError
from cmpq.format.description import read_description, write_description
from cmpq.format.spec import STORED_NAMES, WEIGHTS_FILE
from cmpq.runtime.checkpoint import load_quantized, save_quantized

from tiny import quantize_tiny

SAME = "same"  # refused, or loads exactly the original model
VALID = "valid"  # values changed inside their ranges: loads, with finite logits
EITHER = "either"  # refused, or loads with finite logits
INPUT = torch.arange(3, 3 + 12 * 7, 7).remainder(300).unsqueeze(0)
DTYPES = (
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.bool,
)
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
FINITE_FP16 = st.floats(allow_nan=False, allow_infinity=False, width=16)


@dataclass
class Saved:
    """The original checkpoint: its directory, tensors, description and logits."""

    path: Path
    tensors: dict[str, torch.Tensor]
    description: dict
    raw: bytes
    logits: torch.Tensor

    def _repr_pretty_(self, printer, cycle) -> None:
        """Hypothesis prints the strategies' arguments: not the tensors and bytes."""
        printer.text(f"Saved({self.path})")

    @property
    def layers(self) -> list[str]:
        return list(self.description["layers"])


@dataclass(repr=False)
class Mutation:
    label: str
    expect: str
    names: str | None  # what a refusal must name
    tensors: dict[str, torch.Tensor]
    description: dict
    raw: bytes | None = None

    def __repr__(self) -> str:
        return f"Mutation({self.label})"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer) -> Saved:
    model, report = quantize_tiny("qwen2")  # q/k/v carry biases
    path = save_quantized(model, tiny_tokenizer, report, tmp_path_factory.mktemp("fuzz") / "q")
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    with torch.no_grad():
        logits = load_quantized(path)[0](INPUT).logits
    description = read_description(path)
    return Saved(path, tensors, description, (path / WEIGHTS_FILE).read_bytes(), logits)


def named_in_error(key: str) -> str:
    """A quantized layer's tensors are checked together, so an error may name a
    sibling (a wrong group width shows as a wrong code count): require the layer."""
    prefix, _, suffix = key.rpartition(".")
    return prefix if suffix in STORED_NAMES else key


def tensor_mutation(
    saved: Saved, label: str, expect: str, key: str, tensor: torch.Tensor | None
) -> Mutation:
    """Replace (``None``: drop) one stored tensor; a refusal must name it."""
    tensors = dict(saved.tensors)
    if tensor is None:
        del tensors[key]
    else:
        tensors[key] = tensor
    return Mutation(label, expect, named_in_error(key), tensors, saved.description)


# (stored name, values given the layer entry and the tensor, expectation)
ELEMENT_EDITS = (
    ("codes", lambda entry, t: st.integers(0, 255), VALID),
    ("column_groups", lambda entry, t: st.integers(0, 255), EITHER),
    ("group_bits", lambda entry, t: st.integers(0, 10), SAME),
    ("group_sizes", lambda entry, t: st.integers(-3, entry["in_features"] + 3), SAME),
    ("lut", lambda entry, t: NON_FINITE, SAME),
    ("lut", lambda entry, t: FINITE_FP16, VALID),
    ("outlier_values", lambda entry, t: NON_FINITE, SAME),
    ("outlier_values", lambda entry, t: FINITE_FP16, VALID),
    ("outlier_counts", lambda entry, t: st.integers(0, 255), EITHER),
    ("outlier_cols", lambda entry, t: st.integers(-3, entry["in_features"] + 3), EITHER),
)


@st.composite
def element_edit(draw, saved: Saved) -> Mutation:
    suffix, values, expect = draw(st.sampled_from(ELEMENT_EDITS))
    layer = draw(st.sampled_from(saved.layers))
    key = f"{layer}.{suffix}"
    tensor = saved.tensors[key].clone()
    index = draw(st.integers(0, tensor.numel() - 1))
    value = draw(values(saved.description["layers"][layer], tensor))
    tensor[index] = value
    return tensor_mutation(saved, f"{key}[{index}] = {value!r}", expect, key, tensor)


@st.composite
def dtype_change(draw, saved: Saved) -> Mutation:
    key = draw(st.sampled_from(sorted(saved.tensors)))
    tensor = saved.tensors[key]
    dtype = draw(st.sampled_from([d for d in DTYPES if d != tensor.dtype]))
    return tensor_mutation(saved, f"{key} as {dtype}", SAME, key, tensor.to(dtype))


@st.composite
def length_change(draw, saved: Saved) -> Mutation:
    key = draw(st.sampled_from(sorted(saved.tensors)))
    tensor = saved.tensors[key]
    delta = draw(st.sampled_from([-3, -2, -1, 1, 2, 3]))
    if delta < 0:
        changed = tensor[: max(0, len(tensor) + delta)].clone()
    else:
        changed = torch.cat([tensor, torch.zeros(delta, *tensor.shape[1:], dtype=tensor.dtype)])
    label = f"{key} {len(tensor)} -> {len(changed)} rows"
    return tensor_mutation(saved, label, SAME, key, changed)


@st.composite
def dropped(draw, saved: Saved) -> Mutation:
    key = draw(st.sampled_from(sorted(saved.tensors)))
    return tensor_mutation(saved, f"drop {key}", SAME, key, None)


@st.composite
def added(draw, saved: Saved) -> Mutation:
    layer = draw(st.sampled_from(saved.layers))
    key = draw(
        st.sampled_from(
            [
                "extra.tensor",
                f"{layer}.weight",
                f"{layer}.scales",
                "model.layers.0.mlp.unlisted_proj.codes",
            ]
        )
    )
    tensors = {**saved.tensors, key: torch.zeros(draw(st.integers(1, 8)), dtype=torch.float16)}
    return Mutation(f"add {key}", SAME, key, tensors, saved.description)


def _layer_values(entry: dict) -> dict[str, list]:
    out = entry["out_features"]
    return {
        "out_features": [0, -1, out - 1, out + 1, 2 * out, str(out), float(out), True, None],
        "in_features": [0, -1, 1, entry["in_features"] + 1, str(entry["in_features"]), None],
        "layout": ["row", "diag", "", None],
        "bias": [not entry["bias"], None, "true", 1, 0],
    }


@st.composite
def layer_entry_edit(draw, saved: Saved) -> Mutation:
    description = json.loads(json.dumps(saved.description))
    layer = draw(st.sampled_from(saved.layers))
    entry = description["layers"][layer]
    key, choices = draw(st.sampled_from(sorted(_layer_values(entry).items())))
    entry[key] = draw(st.sampled_from(choices))
    return Mutation(
        f"layers[{layer}].{key} = {entry[key]!r}", SAME, None, saved.tensors, description
    )


@st.composite
def top_level_edit(draw, saved: Saved) -> Mutation:
    description = json.loads(json.dumps(saved.description))
    bits = description["effective_bits"]
    edits = {
        "effective_bits": st.one_of(
            st.floats(), st.floats(1e-12, 1.0).map(lambda eps: bits * (1 + eps)), st.just(str(bits))
        ),
        "quantized_params": st.integers(-2, 2).map(lambda d: description["quantized_params"] + d),
        "stored_bytes": st.integers(-2, 2).map(lambda d: description["stored_bytes"] + d),
        "format_version": st.one_of(st.integers(-2, 5), st.sampled_from(["2", 2.0, None, True])),
        "format": st.sampled_from(["dequantized", "rtn", None]),
    }
    key = draw(st.sampled_from(sorted(edits)))
    description[key] = draw(edits[key])
    return Mutation(f"{key} = {description[key]!r}", SAME, None, saved.tensors, description)


@st.composite
def layer_set_edit(draw, saved: Saved) -> Mutation:
    description = json.loads(json.dumps(saved.description))
    layer = draw(st.sampled_from(saved.layers))
    if draw(st.booleans()):
        del description["layers"][layer]
        label = f"unlist {layer}"
    else:
        name = draw(st.sampled_from(["lm_head", f"{layer}.extra", "model.layers.0.mlp"]))
        description["layers"][name] = description["layers"][layer]
        label = f"list {name}"
    return Mutation(label, SAME, None, saved.tensors, description)


@st.composite
def file_damage(draw, saved: Saved) -> Mutation:
    raw = saved.raw
    header_end = 8 + int.from_bytes(raw[:8], "little")
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(raw) - 1))
        return Mutation(
            f"truncate at {cut}", SAME, None, saved.tensors, saved.description, raw[:cut]
        )
    position = draw(st.integers(0, header_end - 1))
    byte = draw(st.integers(0, 255))
    damaged = raw[:position] + bytes([byte]) + raw[position + 1 :]
    return Mutation(
        f"header byte {position} = {byte}", SAME, None, saved.tensors, saved.description, damaged
    )


def mutations(saved: Saved) -> st.SearchStrategy[Mutation]:
    return st.one_of(
        element_edit(saved),
        dtype_change(saved),
        length_change(saved),
        dropped(saved),
        added(saved),
        layer_entry_edit(saved),
        top_level_edit(saved),
        layer_set_edit(saved),
        file_damage(saved),
    )


def write(saved: Saved, mutation: Mutation, path: Path) -> Path:
    shutil.copytree(saved.path, path)
    if mutation.raw is not None:
        (path / WEIGHTS_FILE).write_bytes(mutation.raw)
    else:
        save_file(mutation.tensors, str(path / WEIGHTS_FILE), metadata={"format": "cmpq"})
    write_description(path, mutation.description)
    return path


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_loader_refuses_clearly_or_loads_faithfully(saved, data):
    mutation = data.draw(mutations(saved))
    with tempfile.TemporaryDirectory() as tmp:
        path = write(saved, mutation, Path(tmp) / "q")
        try:
            model, _ = load_quantized(path)
        except CmpqError as exc:
            event(f"{mutation.expect}: refused")
            message = str(exc)
            assert mutation.expect != VALID, f"{mutation} must load, got: {message}"
            assert "\n" not in message
            if mutation.names is not None:
                assert mutation.names in message, message
            return
        event(f"{mutation.expect}: loaded")
        with torch.no_grad():
            logits = model(INPUT).logits
    if mutation.expect == SAME:
        assert torch.equal(logits, saved.logits), f"{mutation} loaded a different model"
    else:
        assert torch.isfinite(logits).all(), f"{mutation} gave non-finite logits"
