"""The asymptotic KL risk of the MLE to the information projection (layer 1 tool)."""

__all__: list[str] = []
