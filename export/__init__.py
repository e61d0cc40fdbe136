"""A llava-hf checkpoint -> a bundle: vision.onnx and decoder.onnx with both pruning stages inside, and its manifest."""
