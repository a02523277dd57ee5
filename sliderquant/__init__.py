"""sliderquant: SliderQuant post-training quantization for LLMs, with a C core."""
__version__ = "0.1.0"
from .api import load, quantize, save  # noqa: E402,F401
from .config import QuantConfig  # noqa: E402,F401
