"""Variants of a bundle (INT8, INT4, TensorRT) made with ONNX Runtime's own quantizers, and what each one costs.

quant reads a bundle through the runtime and runs it (calibration, the report), so it sits above the runtime.
"""

INT4_BLOCK = 128  # `vtprune quantize --precision int4`'s block; another block is named in the variant (`int4-b32`)
