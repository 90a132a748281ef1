"""PyTorch -> ONNX: wrappers with explicit ids inputs, export, verification, precision variants."""
