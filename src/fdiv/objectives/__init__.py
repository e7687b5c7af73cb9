"""Layer 3: training objectives built on the generators (layer 1) and kernels (layer 2)."""
