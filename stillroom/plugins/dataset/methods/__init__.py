"""Dataset distillation methods, one per file."""
