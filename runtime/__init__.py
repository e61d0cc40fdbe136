"""The torch-free runtime: a bundle runs with onnxruntime, numpy, tokenizers and pillow only.

No module here may import torch or transformers (tests/runtime/test_torch_free.py blocks both and imports them all).
"""
