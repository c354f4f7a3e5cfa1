"""Exporters: ONNX (generators, KV-cache LMs), TensorRT engines, Triton repositories."""
