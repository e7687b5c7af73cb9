"""Layer 4: adapters to training frameworks.

:mod:`fdiv.integrations.hf` (Hugging Face transformers: distillation loss, on-policy GKD
batches, ``DistillationTrainer``, per-token log-probabilities, DC-PDD batch scores) needs
``transformers``, which fdiv does not install; it is imported on use, never from here.
"""
