"""sliderquant: SliderQuant post-training quantization for LLMs, with a C core."""
__version__ = "0.1.0"
