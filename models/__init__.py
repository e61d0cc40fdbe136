"""The oracle: what export reads and every test compares against.

Loading a llava-hf folder (`loading.ModelFolder`), the pruning knobs (`config`), the two stages as pure functions
(`pruning`), the scored KV cache (`cache`), the PyTorch reference (`reference`), generation on it (`generate`),
model shapes (`shapes`), the Stage-1 baselines (`baselines`), and the checkpoint's prompt and image preprocessing
(`prompt`, `preprocess`, torch-free, shared with the runtime). It imports no layer above it (tests/test_layers.py).
The embedded model that was trained with all this, and its data set, is the sub-package `embedded`.

This `__init__` imports nothing, so the runtime can import the torch-free modules here without torch.
"""
