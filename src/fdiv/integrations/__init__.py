"""Layer 4: adapters to training frameworks (Hugging Face transformers / TRL)."""
