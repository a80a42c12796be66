#!/usr/bin/env bash
# Build llama.cpp's llama-quantize, llama-imatrix and llama-bench from the sources vendored in
# the llama-cpp-python source package on PyPI (the only way to reach llama.cpp
# from a machine that sees package registries only).  The build takes about
# 30 minutes on 2 cores, so it lives in the cmpq cache, outside the repository,
# and is never part of CI.  Re-running it is a no-op once the binaries exist.
#
#   benchmarks/peers/build_llama_cpp.sh            # prints the build directory
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${CMPQ_CACHE:-$HOME/.cache/cmpq}"
ROOT="$CACHE/llama.cpp-$VERSION"
SRC="$ROOT/llama_cpp_python-$VERSION/vendor/llama.cpp"
BUILD="$ROOT/build"
PIP="${PIP:-pip}"

if [[ -x "$BUILD/bin/llama-quantize" && -x "$BUILD/bin/llama-imatrix" \
    && -x "$BUILD/bin/llama-bench" ]]; then
    echo "$ROOT"
    exit 0
fi

mkdir -p "$ROOT"
if [[ ! -d "$SRC" ]]; then
    "$PIP" download --no-deps --no-binary :all: --dest "$ROOT" "llama-cpp-python==$VERSION" >&2
    tar -xzf "$ROOT/llama_cpp_python-$VERSION.tar.gz" -C "$ROOT"
fi

cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$BUILD" --target llama-quantize llama-imatrix llama-bench -j "$(nproc)" >&2
echo "$ROOT"
