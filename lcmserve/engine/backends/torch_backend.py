"""Eager PyTorch backend: CPU (float32 / bfloat16) and GPU (float16 / bfloat16).

This is the reference path: every accelerated backend must match it within its dtype's
tolerance. Guidance follows diffusers' rule: a UNet with a guidance embedding
(``time_cond_proj_dim``) takes w as a condition in one pass; a UNet without one (a base model
with a fused LCM-LoRA) gets classical classifier-free guidance for rows with w > 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lcmserve.consistency import cfg_combine, guidance_embedding
from lcmserve.engine.backends.base import Backend, BackendOutput, DenoiseBatch, StageTimes
from lcmserve.engine.loop import StepCallback, lcm_sample
from lcmserve.models.model import LCMModel


@dataclass
class TextConditioning:
    """Per-row text features: cross-attention states and, for SDXL, pooled embeddings."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def expand(self, batch_size: int) -> "TextConditioning":
        pooled = None if self.pooled is None else self.pooled.expand(batch_size, -1)
        return TextConditioning(self.hidden.expand(batch_size, -1, -1), pooled)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TorchBackend(Backend):
    """The eager reference backend over an ``LCMModel``."""

    name = "torch"

    def __init__(self, model: LCMModel) -> None:
        self.model = model
        self._uncond: TextConditioning | None = None

    # -- text -----------------------------------------------------------------------------
    def encode_text(self, input_ids: tuple[torch.Tensor, ...]) -> TextConditioning:
        m = self.model
        if m.family == "sd":
            hidden = m.text_encoders[0](input_ids[0].to(m.device))[0]
            return TextConditioning(hidden.to(m.dtype))
        # SDXL: penultimate hidden states of both encoders side by side; pooled from the second.
        states, pooled = [], None
        for encoder, ids in zip(m.text_encoders, input_ids):
            out = encoder(ids.to(m.device), output_hidden_states=True)
            if out[0].ndim == 2:
                pooled = out[0]
            states.append(out.hidden_states[-2])
        return TextConditioning(torch.cat(states, dim=-1).to(m.dtype), pooled.to(m.dtype))

    def unconditional(self) -> TextConditioning:
        """Features of the empty prompt (zeros where SDXL asks for them), computed once."""
        if self._uncond is None:
            m = self.model
            if m.family == "sdxl" and m.force_zeros_for_empty_prompt:
                ref = self.encode_text(tuple(self._tokenize_empty(tok) for tok in m.tokenizers))
                self._uncond = TextConditioning(torch.zeros_like(ref.hidden), torch.zeros_like(ref.pooled))
            else:
                self._uncond = self.encode_text(tuple(self._tokenize_empty(tok) for tok in m.tokenizers))
        return self._uncond

    @staticmethod
    def _tokenize_empty(tokenizer) -> torch.Tensor:
        return tokenizer(
            [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    # -- the pieces of one batch ---------------------------------------------------------------
    def _added_cond(self, cond: TextConditioning, batch: DenoiseBatch) -> dict[str, torch.Tensor] | None:
        if self.model.family != "sdxl":
            return None
        # SDXL micro-conditioning: original size, crop top-left (0, 0), target size.
        ids = [batch.height, batch.width, 0, 0, batch.height, batch.width]
        time_ids = torch.tensor([ids], dtype=self.model.dtype, device=self.model.device)
        return {"text_embeds": cond.pooled, "time_ids": time_ids.expand(cond.hidden.shape[0], -1)}

    def _denoiser(self, cond: TextConditioning, batch: DenoiseBatch):
        m = self.model
        w = batch.guidance_scale.to(m.device, torch.float32)
        unet = m.unet
        if m.guidance_mode == "embedding":
            # The Imagen-style scale w of diffusers is LCM's w + 1 (diffusers' LCM pipelines do the same).
            w_emb = guidance_embedding(w - 1, unet.config.time_cond_proj_dim).to(m.dtype)
            added = self._added_cond(cond, batch)

            def denoise(latents: torch.Tensor, t: int) -> torch.Tensor:
                return unet(
                    latents.to(m.dtype), t, encoder_hidden_states=cond.hidden, timestep_cond=w_emb,
                    added_cond_kwargs=added, return_dict=False,
                )[0]

            return denoise

        guided = w > 1
        if not bool(guided.any()):
            added = self._added_cond(cond, batch)
            return lambda latents, t: unet(
                latents.to(m.dtype), t, encoder_hidden_states=cond.hidden, added_cond_kwargs=added, return_dict=False
            )[0]

        size = cond.hidden.shape[0]
        uncond = self.unconditional().expand(size)
        pooled = None if cond.pooled is None else torch.cat([uncond.pooled, cond.pooled])
        both = TextConditioning(torch.cat([uncond.hidden, cond.hidden]), pooled)
        added = self._added_cond(both, batch)
        scale = w.view(-1, 1, 1, 1)
        mask = guided.view(-1, 1, 1, 1)

        def denoise_cfg(latents: torch.Tensor, t: int) -> torch.Tensor:
            x = latents.to(m.dtype)
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=both.hidden, added_cond_kwargs=added,
                       return_dict=False)[0].float()
            out_uncond, out_cond = out.chunk(2)
            # Rows with w <= 1 take the conditional prediction unchanged, as they would alone.
            return torch.where(mask, cfg_combine(out_cond, out_uncond, scale), out_cond)

        return denoise_cfg

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.model.vae
        scaled = latents / vae.config.scaling_factor
        images = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # -- the contract -----------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: DenoiseBatch, on_step: StepCallback | None = None) -> BackendOutput:
        device = self.model.device
        times = StageTimes()
        # 1. text encoder (and the guidance condition)
        start = time.perf_counter()
        cond = self.encode_text(batch.input_ids)
        denoiser = self._denoiser(cond, batch)
        _sync(device)
        times.text_s = time.perf_counter() - start
        # 2. the LCM loop: one UNet call per step
        start = time.perf_counter()
        latents = lcm_sample(denoiser, batch.noise.to(device), batch.timesteps, self.model.schedule, on_step)
        _sync(device)
        times.unet_s = time.perf_counter() - start
        # 3. VAE decode
        start = time.perf_counter()
        images = self.decode(latents).cpu()
        times.vae_s = time.perf_counter() - start
        return BackendOutput(images, times)
