"""CRReLU: the activation of the EAFO search (an nn.Module)."""

__all__: list[str] = []
