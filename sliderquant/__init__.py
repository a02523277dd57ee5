"""sliderquant: SliderQuant post-training quantization for LLMs, with a C core."""
__version__ = "0.1.0"
from . import openmp_env  # noqa: E402,F401  (first: OMP_WAIT_POLICY must be set before torch starts OpenMP)
from .api import load, quantize, save  # noqa: E402,F401
from .config import QuantConfig  # noqa: E402,F401
from . import export  # noqa: E402,F401  (a callable package: sliderquant.export(model, out, format=...))
