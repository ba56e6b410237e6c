"""quantbench: compare low-bit LLM quantization methods on the same models, data and budget."""

__version__ = "0.1.0"
