"""Optimal transport between samples: the public namespace (``fdiv.transport.sinkhorn``, ...).

Entropic optimal transport (log-domain Sinkhorn: balanced or unbalanced, batched, ε-scaling,
tensorized or online with memory ``O((n + m) d)``, envelope / unrolled / implicit gradients),
the debiased Sinkhorn divergence and the Monge gap. Tensors are keyword-only by role:
``sinkhorn(x=..., y=..., a=..., b=..., epsilon=...)``, ``sinkhorn_divergence(x=..., y=..., epsilon=...)``,
``monge_gap(source=..., mapped=...)``. Orientation: ``x``/``a`` is the first measure (the plan's
rows), ``y``/``b`` the second; every quantity here is symmetric for a symmetric cost.
``"sqeuclidean"`` is ``|x - y|^2`` with no ½. The implementation lives in layer 1,
:mod:`fdiv.math.transport`; conventions against POT, GeomLoss and OTT-JAX are in
``docs/transport.md``.
"""

from .math.transport import *  # noqa: F401,F403
from .math.transport import __all__ as _transport_all

from .objectives.transport import MongeMapFit, MongeMapLoss, fit_monge_map, monge_map_loss  # noqa: E402

__all__ = [*_transport_all, "MongeMapFit", "MongeMapLoss", "fit_monge_map", "monge_map_loss"]
