"""Optimal-density weighted least squares with volume / DPP sampling (layer 1 tool)."""

__all__: list[str] = []
