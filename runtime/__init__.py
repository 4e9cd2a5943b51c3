"""The runtime: quantize, attach LoRA, train with measured memory, package for serving."""
