"""vtprune: visual-text interactive token pruning for LLaVA-1.5, from PyTorch to ONNX to a torch-free runtime."""

__version__ = "0.1.0"
