"""The byte budget's header estimate bounds the header safetensors actually writes."""

import json
import struct

from cmpq.alloc.size import header_bytes
from cmpq.format.spec import WEIGHTS_FILE
from cmpq.runtime.checkpoint import save_quantized

from tiny import make_tiny_model, quantize_tiny


def written_header_bytes(path) -> int:
    with open(path / WEIGHTS_FILE, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        json.loads(handle.read(size))  # it is the header
    return size


def test_header_estimate_is_a_close_upper_bound(tmp_path, tiny_tokenizer):
    model, report = quantize_tiny("llama")
    out = save_quantized(model, tiny_tokenizer, report, tmp_path / "q")
    size = (out / WEIGHTS_FILE).stat().st_size
    estimate = header_bytes(make_tiny_model("llama"), max_bytes=size)
    written = written_header_bytes(out)
    assert written <= estimate <= written * 1.5 + 1024
