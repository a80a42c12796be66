"""cmpq: channel-wise mixed-precision quantization of LLMs to any average bit-width."""

__version__ = "0.1.0"

from . import hf  # noqa: E402, F401  (AutoModelForCausalLM loads cmpq outputs)
from .checkpoint import load_quantized as load  # noqa: E402
from .config import CMPQConfig, RTNConfig  # noqa: E402
from .errors import CmpqError  # noqa: E402
from .evaluate import perplexity  # noqa: E402
from .models import load_model  # noqa: E402
from .quantize import quantize  # noqa: E402

__all__ = [
    "CMPQConfig",
    "CmpqError",
    "RTNConfig",
    "load",
    "load_model",
    "perplexity",
    "quantize",
    "__version__",
]
