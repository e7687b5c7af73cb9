"""Linear statistics of 2-D Coulomb gases at beta = 2 through the Ginibre ensemble (layer 1 tool)."""

__all__: list[str] = []
