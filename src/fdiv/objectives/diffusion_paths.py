"""Diffusion sampler paths, KL-regularised control and score-field diagnostics (layer 3)."""

__all__: list[str] = []
