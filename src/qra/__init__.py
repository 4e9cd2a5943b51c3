"""qra: per-layer mixed-bit GPTQ + per-layer-rank LoRA plans under a hard memory budget."""

__version__ = "0.1.0"
