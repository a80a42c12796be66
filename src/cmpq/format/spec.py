"""The constants of the checkpoint format: file names, version, tensor names, dtypes.

Every other part of cmpq (the quantizer that writes, the runtime that reads,
``cmpq inspect``) takes these from here, so writer and reader cannot drift.
docs/format.md describes the same things for people.
"""

from __future__ import annotations

import torch

FORMAT_VERSION = 5
QUANT_METHOD = "cmpq"  # config.json's quantization_config.quant_method
FORMATS = ("packed", "dequantized")
WEIGHTS_FILE = "model.safetensors"
DESCRIPTION_FILE = "cmpq.json"  # dequantized (RTN) outputs only
STATS_FILE = "channel_stats.safetensors"  # informational, never loaded with the model

LAYOUTS = ("row", "column")  # look-up tables per output row per bit-group, or per input column
MIN_CODE_BITS, MAX_CODE_BITS = 1, 8

REQUIRED_NAMES = ("codes", "lut", "column_groups", "group_bits", "group_sizes")
OUTLIER_NAMES = ("outlier_counts", "outlier_cols", "outlier_values")  # all three or none
STORED_NAMES = REQUIRED_NAMES + OUTLIER_NAMES
FP16_NAMES = ("lut", "outlier_values")  # stored in fp16 whatever dtype the model runs in

LUT_ENTRY_BITS = 16  # fp16 table entries
OUTLIER_VALUE_BITS = 16  # fp16
ROW_COUNT_BITS = 8  # uint8 outliers per output row (the CSR row pointers are their sums)
MAX_OUTLIERS_PER_ROW = 2**ROW_COUNT_BITS - 1  # the outlier selection never puts more in a row
GROUP_HEADER_BITS = 8 + 32  # uint8 width + int32 column count per bit-group

# Non-quantized parameters are written in fp16; fp32 is what the same format
# version held before they moved to fp16, and it loads exactly.
FLOAT_STORAGE = ("F16", "F32")


def index_bits(count: int) -> int:
    """Width of the integer type storing an index below ``count`` (int16 or int32)."""
    return 16 if count <= 2**15 else 32


def index_dtype(count: int) -> torch.dtype:
    """The integer type of :func:`index_bits`."""
    return torch.int16 if index_bits(count) == 16 else torch.int32


def group_index_bits(n_groups: int) -> int:
    """Bits of each column's bit-group index in ``column_groups`` (at least 1)."""
    return max(1, (n_groups - 1).bit_length())


def stored_dtypes(in_features: int) -> dict[str, torch.dtype]:
    """The dtype of every stored tensor of a layer with ``in_features`` input columns.

    Outlier column indices take int16 when they fit (:func:`index_bits`), as the
    cost model counts them. The loader requires exactly these dtypes, so the
    writer and the checks cannot drift.
    """
    index = index_dtype(in_features)
    return {
        "codes": torch.uint8,
        "lut": torch.float16,
        "column_groups": torch.uint8,
        "group_bits": torch.uint8,
        "group_sizes": torch.int32,
        "outlier_counts": torch.uint8,
        "outlier_cols": index,
        "outlier_values": torch.float16,
    }
