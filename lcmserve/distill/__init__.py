"""Latent consistency distillation (LCD), LCM-LoRA and latent consistency fine-tuning (LCF)."""
