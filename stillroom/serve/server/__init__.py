"""The HTTP server: OpenAI-shaped routes over one loaded model, with dynamic micro-batching."""
