"""cmpq: channel-wise mixed-precision quantization of LLMs to any average bit-width.

The layout, in the order the data flows, is in docs/architecture.md.
"""

__version__ = "0.1.0"

from .api import generate, load, load_model, perplexity, quantize, save_quantized  # noqa: E402
from .config import CMPQConfig, RTNConfig  # noqa: E402
from .errors import CmpqError, CmpqWarning  # noqa: E402
from .runtime import hf  # noqa: E402, F401  (AutoModelForCausalLM loads cmpq outputs)

__all__ = [
    "CMPQConfig",
    "CmpqError",
    "CmpqWarning",
    "RTNConfig",
    "generate",
    "load",
    "load_model",
    "perplexity",
    "quantize",
    "save_quantized",
    "__version__",
]
