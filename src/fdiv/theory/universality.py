"""The universality lens: mixture learners and their regret (layer 1 tool)."""

__all__: list[str] = []
