"""Layer 4: adapters to training frameworks.

:mod:`fdiv.integrations.hf` (Hugging Face transformers: distillation loss, on-policy GKD
batches, ``DistillationTrainer``, per-token log-probabilities, DC-PDD batch scores) needs
``transformers`` (the ``[hf]`` extra); it is imported on use, never from here.
:mod:`fdiv.integrations.teacher_cache` writes and serves an offline top-k teacher cache
(safetensors shards; re-exported by ``fdiv.distill``); :mod:`fdiv.integrations.trl` gives TRL's
distillation trainers ``divergence=`` (the ``[trl]`` extra).
"""
