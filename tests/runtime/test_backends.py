"""Every backend against the float64 reference; no dense weight kept; `.to()`; fallbacks."""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch

from cmpq.errors import CmpqError, CmpqWarning
from cmpq.format.layer import dequantize_layer
from cmpq.format.spec import STORED_NAMES
from cmpq.runtime import backends, cpu_kernel
from cmpq.runtime.qlinear import QuantizedLinear, set_backend

from tiny import quantize_tiny, random_layer, tiny_batch

WIDTHS = [[b] for b in range(1, 9)] + [[2, 3], list(range(1, 9))]
SHAPES = [(13, 11), (37, 29), (64, 40)]
TOKENS = [1, 3, 17, 512]
CPU_ISAS = ["avx2", "portable"] if cpu_kernel.unavailable_reason() is None else []
# the Triton kernels run here under Triton's interpreter (conftest sets TRITON_INTERPRET=1)
TRITON = (
    ["triton"]
    if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton")
    else []
)


def check_against_reference(module, layer, tokens, dtype=torch.float32, seed=1):
    x = torch.randn(tokens, layer.in_features, generator=torch.Generator().manual_seed(seed))
    x = x.to(dtype)
    reference = x.double() @ dequantize_layer(layer).double().t()
    with torch.no_grad():
        y = module(x)
    assert y.dtype == dtype and y.shape == (tokens, layer.out_features)
    scale = reference.abs().max().item()
    rounding = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 output rounding
    assert (y.double() - reference).abs().max().item() <= rounding * scale


@pytest.mark.parametrize("widths", WIDTHS, ids=lambda w: "-".join(map(str, w)))
@pytest.mark.parametrize("outliers", [0, 9])
@pytest.mark.parametrize("backend", ["torch", *(f"cpu-{isa}" for isa in CPU_ISAS), *TRITON])
def test_backend_equals_reference(backend, widths, outliers, monkeypatch):
    name, _, isa = backend.partition("-")
    if isa:
        monkeypatch.setenv("CMPQ_CPU_ISA", isa)
    for shape in SHAPES:
        layer = random_layer(*shape, widths, outliers=min(outliers, shape[0] * shape[1]))
        module = QuantizedLinear.from_layer(layer)
        set_backend(module, name)
        for tokens in TOKENS:
            check_against_reference(module, layer, tokens)


@pytest.mark.parametrize("backend", ["torch", "cpu"][: 1 + bool(CPU_ISAS)])
def test_bf16_inputs_and_batched_shapes(backend):
    layer = random_layer(37, 29, [2, 3, 5], outliers=12)
    module = QuantizedLinear.from_layer(layer, bias=torch.randn(37))
    set_backend(module, backend)
    check_against_reference_with_bias(module, layer)
    for tokens in (1, 17):
        check_against_reference(module_without_bias(layer, backend), layer, tokens, torch.bfloat16)


def module_without_bias(layer, backend):
    module = QuantizedLinear.from_layer(layer)
    set_backend(module, backend)
    return module


def check_against_reference_with_bias(module, layer):
    x = torch.randn(2, 5, layer.in_features)  # batch and sequence dimensions
    reference = x.double() @ dequantize_layer(layer).double().t() + module.bias.double()
    with torch.no_grad():
        y = module(x)
    assert y.shape == (2, 5, layer.out_features)
    assert (y.double() - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()


def test_row_layout_runs_on_torch_and_the_kernels_refuse_it():
    layer = random_layer(21, 19, [1, 4], layout="row", outliers=5)
    module = QuantizedLinear.from_layer(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto picks torch for row layout without a warning
        assert set_backend(module, "auto") == {"": "torch"}
    check_against_reference(module, layer, 3)
    with pytest.raises(CmpqError, match="runs the column layout"):
        set_backend(module, "cpu")
    with pytest.raises(CmpqError, match="`backend` must be one of auto, cpu, triton, torch"):
        set_backend(module, "cuda")


def dense_tensors(module: QuantizedLinear) -> list[str]:
    """Names of float tensors the module holds, besides the stored ones, as large as its
    weight."""
    size = module.out_features * module.in_features
    found = []

    def visit(name, value):
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.numel() >= size:
                found.append(name)
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                visit(f"{name}[{i}]", item)
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(f"{name}.{key}", item)

    for name, value in vars(module).items():
        if name == "_buffers":
            value = {k: v for k, v in value.items() if k not in STORED_NAMES}
        visit(name, value)
    return found


@pytest.mark.parametrize("backend", ["torch", "cpu"][: 1 + bool(CPU_ISAS)])
def test_no_dense_weight_after_generating(backend, tiny_tokenizer):
    model, _ = quantize_tiny("llama")
    set_backend(model, backend)
    with torch.no_grad():
        model.generate(tiny_batch(1, 6), max_new_tokens=4, do_sample=False, pad_token_id=0)
        model(tiny_batch(2, 40))  # prefill through stripes
    held = {n: dense_tensors(m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert held and not any(held.values()), held
    # the check can fail: a module that kept its weight would be caught
    module = next(m for m in model.modules() if isinstance(m, QuantizedLinear))
    module._cache = (module.dequantized_weight(),)
    assert dense_tensors(module) == ["_cache[0]"]


def test_to_moves_every_tensor_and_keeps_fp16_tables():
    layer = random_layer(16, 24, [2, 3], outliers=6)
    module = QuantizedLinear.from_layer(layer, bias=torch.randn(16))
    with torch.no_grad():
        module(torch.randn(1, 24))  # outlier_base exists after a forward
    module.to(torch.bfloat16)
    assert module.lut.dtype == module.outlier_values.dtype == torch.float16
    assert module.outlier_base.dtype == torch.float16 and module.bias.dtype == torch.bfloat16
    module.to("meta")
    held = [*module.buffers(), *module.parameters()]
    assert held and all(t.device.type == "meta" for t in held)
    assert set(module.state_dict()) == {*STORED_NAMES, "bias"}  # outlier_base is not saved


def test_load_state_dict_recomputes_what_the_kernels_derive():
    first, second = random_layer(16, 24, [3], outliers=6), random_layer(16, 24, [3], outliers=6)
    second.outlier_rows, second.outlier_cols = first.outlier_rows, first.outlier_cols
    second.luts = [t.flip(-1) for t in second.luts]  # other tables: other values at outliers
    module = QuantizedLinear.from_layer(first)
    check_against_reference(module, first, 1)
    module.load_state_dict(QuantizedLinear.from_layer(second).state_dict())
    check_against_reference(module, second, 1)


def test_no_compiler_falls_back_to_torch_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CMPQ_CACHE", str(tmp_path))  # nothing built there
    monkeypatch.setattr(cpu_kernel, "compiler", lambda: None)
    monkeypatch.setattr(backends, "_warned", set())
    cpu_kernel.library.cache_clear()
    try:
        layer = random_layer(8, 8, [2])
        with pytest.warns(CmpqWarning, match="no C.. compiler found") as caught:
            assert set_backend(QuantizedLinear.from_layer(layer), "auto") == {"": "torch"}
            assert set_backend(QuantizedLinear.from_layer(layer), "auto") == {"": "torch"}
        assert len(caught) == 1 and "\n" not in str(caught[0].message)
        with pytest.raises(CmpqError, match="backend 'cpu' cannot run this model: no C"):
            set_backend(QuantizedLinear.from_layer(layer), "cpu")
    finally:
        cpu_kernel.library.cache_clear()


def test_failed_compile_says_why_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("CMPQ_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "compiler", lambda: "false")  # runs, exits 1
    with pytest.raises(cpu_kernel.KernelUnavailable, match="false failed to compile"):
        cpu_kernel.build()
    assert not list(tmp_path.rglob("*.so"))


def test_environment_variable_picks_the_backend(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert QuantizedLinear.from_layer(random_layer(8, 8, [2])).backend == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "fast")
    with pytest.raises(CmpqError, match=r"\$CMPQ_BACKEND must be one of"):
        QuantizedLinear.from_layer(random_layer(8, 8, [2]))


@pytest.mark.skipif(not CPU_ISAS, reason="no CPU kernel here")
def test_one_openmp_runtime_in_the_process():
    cpu_kernel.library()
    maps = open("/proc/self/maps").read().splitlines()
    runtimes = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(runtimes) <= 1, runtimes


@pytest.mark.skipif(not CPU_ISAS, reason="no CPU kernel here")
def test_without_openmp_the_kernel_runs_on_its_own_pool(monkeypatch, tmp_path):
    real = cpu_kernel.compiler()
    wrapper = tmp_path / "cxx-without-openmp"
    wrapper.write_text(
        f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("CMPQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernel, "compiler", lambda: str(wrapper))
    cpu_kernel.library.cache_clear()
    threads = torch.get_num_threads()
    try:
        assert cpu_kernel.library().cmpq_openmp() == 0
        torch.set_num_threads(2)
        layer = random_layer(37, 29, [2, 3, 6], outliers=9)
        module = QuantizedLinear.from_layer(layer)
        set_backend(module, "cpu")
        for tokens in (1, 5, 17):
            check_against_reference(module, layer, tokens)
    finally:
        torch.set_num_threads(threads)
        cpu_kernel.library.cache_clear()
