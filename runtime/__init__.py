"""The torch-free runtime: a bundle runs with onnxruntime, numpy, tokenizers and pillow only.

No module here may import torch or transformers, even indirectly: the import-linter contract in pyproject.toml
(tests/test_layers.py) checks the import graph, and tests/runtime/test_torch_free.py blocks both and imports them all.
What it needs from below (the pruning knobs, the prompt, the image preprocessing) is in models/'s torch-free modules.
"""
