"""Variants of a bundle (INT8, INT4, TensorRT) made with ONNX Runtime's own quantizers, and what each one costs.

quant reads a bundle through the runtime and runs it (calibration, the report), so it sits above the runtime.
"""
