"""Score-distillation objectives through f-divergences (layer 3)."""

__all__: list[str] = []
