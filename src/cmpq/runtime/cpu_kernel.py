"""The compiled CPU kernel: building it with the system's compiler, loading it, calling it.

The source is ``kernels/cmpq_cpu.cpp`` beside this file. It is compiled once
per source version and machine type into cmpq's cache directory
(``$CMPQ_CACHE/kernels``), by the set-up command (``python -m
cmpq.runtime.cpu_kernel``) or, failing that, on first use. No network, no
``-march``: the AVX2 functions carry their own target attribute and the
library picks them at run time when the CPU has AVX2, FMA and F16C, the
portable loops otherwise. With ``-fopenmp`` where the compiler has it: the
library then binds to the ``libgomp.so.1`` torch has loaded, so it runs on
torch's threads (one OpenMP runtime); without, on a small pool of its own.
Where nothing can be built (no compiler), the ``cpu`` backend is unavailable
and says why in one line.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

from ..models.sources import cache_dir

SOURCE = Path(__file__).with_name("kernels") / "cmpq_cpu.cpp"
COMPILER_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread")
DECODE_TOKENS = 8  # the decode kernel's tokens per call; more tokens take the prefill path
ISA_NAMES = {2: "avx2", 0: "portable"}


class KernelUnavailable(RuntimeError):
    """The CPU kernel cannot be built or loaded here (the message says why, in one line)."""


class CLayer(ctypes.Structure):
    """The kernel's view of one layer's stored tensors (``struct Layer`` in the source)."""

    _fields_ = [
        ("out_features", ctypes.c_int64),
        ("in_features", ctypes.c_int64),
        ("groups", ctypes.c_int64),
        ("group_bits", ctypes.c_void_p),
        ("group_sizes", ctypes.c_void_p),
        ("codes", ctypes.c_void_p),
        ("codes_bytes", ctypes.c_int64),
        ("lut", ctypes.c_void_p),
        ("perm", ctypes.c_void_p),
        ("perm_bytes", ctypes.c_int64),
        ("outlier_crow", ctypes.c_void_p),
        ("outlier_cols", ctypes.c_void_p),
        ("outlier_col_bytes", ctypes.c_int64),
        ("outlier_values", ctypes.c_void_p),
        ("outlier_base", ctypes.c_void_p),
    ]


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def library_path() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(COMPILER_FLAGS).encode()).hexdigest()
    return cache_dir() / "kernels" / f"cmpq_cpu-{digest[:12]}-{platform.machine()}.so"


def build(force: bool = False) -> Path:
    """Compile the kernel into the cache (atomically) and return the library's path:
    with OpenMP where the compiler has it, else with the kernel's own thread pool."""
    target = library_path()
    if target.is_file() and not force:
        return target
    cxx = compiler()
    if cxx is None:
        raise KernelUnavailable("no C++ compiler found (install g++ or set CXX)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as staging:
        partial = Path(staging) / target.name
        errors = []
        for extra in (("-fopenmp",), ()):
            command = [cxx, *COMPILER_FLAGS, *extra, str(SOURCE), "-o", str(partial)]
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise KernelUnavailable(f"{cxx} could not run: {exc}") from None
            if result.returncode == 0:
                partial.replace(target)
                return target
            errors.append((result.stderr.strip().splitlines() or ["no output"])[0])
        raise KernelUnavailable(f"{cxx} failed to compile {SOURCE.name}: {errors[-1]}")


@cache
def library() -> ctypes.CDLL:
    """The loaded kernel library (built first if needed); raises :class:`KernelUnavailable`."""
    try:
        handle = ctypes.CDLL(str(build()))
    except OSError as exc:
        raise KernelUnavailable(f"the compiled kernel does not load: {exc}") from None
    handle.cmpq_isa.restype = ctypes.c_int
    handle.cmpq_openmp.restype = ctypes.c_int
    handle.cmpq_decode.argtypes = [
        ctypes.POINTER(CLayer),
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
    ]
    handle.cmpq_decode.restype = ctypes.c_int
    handle.cmpq_dequantize.argtypes = [
        ctypes.POINTER(CLayer),
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    handle.cmpq_dequantize.restype = ctypes.c_int
    return handle


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here, or ``None`` when it can."""
    try:
        library()
    except KernelUnavailable as exc:
        return str(exc)
    return None


@cache
def detected_isa() -> str:
    """What this CPU runs: ``avx2`` (AVX2, FMA and F16C) or ``portable`` (asked once)."""
    return ISA_NAMES[library().cmpq_isa()]


def isa() -> str:
    """The instruction set the kernel uses: the CPU's, or ``portable`` when
    ``CMPQ_CPU_ISA=portable`` asks for it (AVX2 is never forced onto a CPU without it)."""
    return "portable" if os.environ.get("CMPQ_CPU_ISA") == "portable" else detected_isa()


def _address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def layer_struct(tensors: dict[str, torch.Tensor], out_features: int, in_features: int) -> CLayer:
    """The kernel's view of a layer's tensors (they must stay alive while it is used)."""
    cols = tensors.get("outlier_cols")
    return CLayer(
        out_features,
        in_features,
        tensors["group_bits"].numel(),
        _address(tensors["group_bits"]),
        _address(tensors["group_sizes"]),
        _address(tensors["codes"]),
        tensors["codes"].numel(),
        _address(tensors["lut"]),
        _address(tensors["perm"]),
        tensors["perm"].element_size(),
        _address(tensors.get("outlier_crow")),
        _address(cols),
        0 if cols is None else cols.element_size(),
        _address(tensors.get("outlier_values")),
        _address(tensors.get("outlier_base")),
    )


def decode(layer: CLayer, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x [t, in]`` (float32, contiguous, t <= DECODE_TOKENS) times the layer: ``[t, out]``."""
    tokens = x.shape[0]
    padded = -(-out_features // 8) * 8
    y = torch.zeros(tokens, padded, dtype=torch.float32)
    code = library().cmpq_decode(
        ctypes.byref(layer),
        x.data_ptr(),
        tokens,
        y.data_ptr(),
        torch.get_num_threads(),
        2 if isa() == "avx2" else 0,
    )
    if code:
        raise ValueError(f"cmpq_decode refused {tokens} tokens (1 to {DECODE_TOKENS})")
    return y[:, :out_features]


def dequantize_rows(layer: CLayer, first: int, stop: int, out: torch.Tensor) -> torch.Tensor:
    """Rows ``first:stop`` of the weight (original column order, outliers in) into ``out``."""
    code = library().cmpq_dequantize(
        ctypes.byref(layer), first, stop, out.data_ptr(), torch.get_num_threads()
    )
    if code:
        raise ValueError(f"cmpq_dequantize refused rows {first}:{stop}")
    return out


if __name__ == "__main__":  # the set-up command builds the kernel here
    try:
        path = build()
    except KernelUnavailable as exc:
        print(f"warning: cmpq's CPU kernel was not built ({exc}); the torch backend will be used")
    else:
        threads = "OpenMP" if library().cmpq_openmp() else "its own thread pool"
        print(f"cmpq CPU kernel: {path} ({isa()}, {threads})")
