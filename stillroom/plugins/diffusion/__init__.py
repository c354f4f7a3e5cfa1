"""Built-in diffusion step-distillation methods (registered through the ``stillroom`` entry point)."""
