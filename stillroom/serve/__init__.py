"""Runtimes (torch, onnxruntime, tensorrt), the student-vs-teacher benchmark and the HTTP server."""
