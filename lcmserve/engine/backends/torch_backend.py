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

    def expand(self, batch_size: int) -> TextConditioning:
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

    # -- the three networks: accelerated backends that reuse this logic override these -------
    def text_encoder(self, index: int):
        """Text encoder ``index`` as this backend calls it (compiled backends return their compiled twin)."""
        return self.model.text_encoders[index]

    def text_forward(self, index: int, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder ``index``: its last (SD) or penultimate (SDXL) hidden states, and its pooled projection if any."""
        m = self.model
        encoder = self.text_encoder(index)
        ids = input_ids.to(m.device)
        if m.family == "sd":
            return encoder(ids)[0], None
        out = encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2], (out[0] if out[0].ndim == 2 else None)

    def unet_forward(
        self,
        sample: torch.Tensor,
        timestep: int | torch.Tensor,
        hidden: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
        added: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One UNet call: the model output (epsilon, v or x0) for ``sample`` at ``timestep``."""
        return self.model.unet(
            sample, timestep, encoder_hidden_states=hidden, timestep_cond=timestep_cond,
            added_cond_kwargs=added, return_dict=False,
        )[0]

    def vae_forward(self, scaled_latents: torch.Tensor) -> torch.Tensor:
        """VAE decode of latents already divided by the scaling factor; images in [-1, 1]."""
        vae = self.model.vae
        return vae.decode(scaled_latents.to(vae.dtype), return_dict=False)[0]

    # -- text -----------------------------------------------------------------------------
    def encode_text(self, input_ids: tuple[torch.Tensor, ...]) -> TextConditioning:
        m = self.model
        # SDXL: the hidden states of both encoders side by side; pooled from the second.
        states, pooled = [], None
        for index, ids in enumerate(input_ids):
            hidden, row_pooled = self.text_forward(index, ids)
            states.append(hidden)
            pooled = row_pooled if row_pooled is not None else pooled
        hidden = states[0] if len(states) == 1 else torch.cat(states, dim=-1)
        if m.family == "sd":
            return TextConditioning(hidden.to(m.dtype))
        return TextConditioning(hidden.to(m.dtype), pooled.to(m.dtype))

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

    def negative_conditioning(self, negative_ids: tuple[torch.Tensor, ...] | None, negative_rows: torch.Tensor | None,
                              size: int) -> TextConditioning:
        """Each row's unconditional features: its negative prompt's where ``negative_rows`` ([B] bool) marks
        one, the empty prompt's elsewhere; ``negative_ids`` None: the empty prompt's in every row."""
        uncond = self.unconditional().expand(size)
        if negative_ids is None:
            return uncond
        negative = self.encode_text(negative_ids)
        rows = negative_rows.to(self.model.device)
        hidden = torch.where(rows.view(-1, 1, 1), negative.hidden, uncond.hidden)
        pooled = None if uncond.pooled is None else torch.where(rows.view(-1, 1), negative.pooled, uncond.pooled)
        return TextConditioning(hidden, pooled)

    @staticmethod
    def _tokenize_empty(tokenizer) -> torch.Tensor:
        return tokenizer(
            [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    # -- the pieces of one batch ---------------------------------------------------------------
    def time_ids(self, height: int, width: int, batch_size: int) -> torch.Tensor | None:
        """SDXL micro-conditioning (original size, crop top-left (0, 0), target size); None for SD."""
        if self.model.family != "sdxl":
            return None
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.model.dtype, device=self.model.device)
        return ids.expand(batch_size, -1)

    def guidance_condition(self, guidance_scale: torch.Tensor) -> torch.Tensor:
        """The UNet's guidance embedding of each row's w: diffusers' Imagen-style w is LCM's w + 1."""
        return guidance_embedding(guidance_scale.float() - 1, self.model.unet.config.time_cond_proj_dim)

    @staticmethod
    def _added(cond: TextConditioning, time_ids: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
        return None if time_ids is None else {"text_embeds": cond.pooled, "time_ids": time_ids}

    def embedding_denoiser(self, cond: TextConditioning, w_emb: torch.Tensor, time_ids: torch.Tensor | None):
        """Guidance through the UNet's embedding: one pass per step (a full LCM)."""
        m = self.model
        w_emb = w_emb.to(m.device, m.dtype)
        added = self._added(cond, time_ids)
        return lambda latents, t: self.unet_forward(latents.to(m.dtype), t, cond.hidden, w_emb, added)

    def plain_denoiser(self, cond: TextConditioning, time_ids: torch.Tensor | None):
        """No guidance: the conditional prediction alone (w <= 1 for every row)."""
        m = self.model
        added = self._added(cond, time_ids)
        return lambda latents, t: self.unet_forward(latents.to(m.dtype), t, cond.hidden, None, added)

    def cfg_denoiser(self, cond: TextConditioning, w: torch.Tensor, time_ids: torch.Tensor | None,
                     uncond: TextConditioning | None = None):
        """Classifier-free guidance in one doubled batch; rows with w <= 1 take the conditional output.

        ``uncond``: each row's unconditional features (``negative_conditioning``); None: the empty prompt's."""
        m = self.model
        size = cond.hidden.shape[0]
        uncond = self.unconditional().expand(size) if uncond is None else uncond
        pooled = None if cond.pooled is None else torch.cat([uncond.pooled, cond.pooled])
        both = TextConditioning(torch.cat([uncond.hidden, cond.hidden]), pooled)
        added = self._added(both, None if time_ids is None else torch.cat([time_ids, time_ids]))
        w = w.to(m.device, torch.float32)
        scale = w.view(-1, 1, 1, 1)
        mask = (w > 1).view(-1, 1, 1, 1)

        def denoise_cfg(latents: torch.Tensor, t) -> torch.Tensor:
            x = latents.to(m.dtype)
            out = self.unet_forward(torch.cat([x, x]), t, both.hidden, None, added).float()
            out_uncond, out_cond = out.chunk(2)
            # Rows with w <= 1 take the conditional prediction unchanged, as they would alone.
            return torch.where(mask, cfg_combine(out_cond, out_uncond, scale), out_cond)

        return denoise_cfg

    @staticmethod
    def any_guided(batch: DenoiseBatch) -> bool:
        """Whether classifier-free guidance has work in this batch: a row with w > 1 (at w <= 1 a row takes the
        conditional prediction alone). Read on the host, from the request."""
        return bool((batch.guidance_scale > 1).any())

    def _denoiser(self, cond: TextConditioning, batch: DenoiseBatch):
        m = self.model
        time_ids = self.time_ids(batch.height, batch.width, cond.hidden.shape[0])
        if m.guidance_mode == "embedding":
            return self.embedding_denoiser(cond, self.guidance_condition(batch.guidance_scale), time_ids)
        if not self.any_guided(batch):
            return self.plain_denoiser(cond, time_ids)
        return self.cfg_denoiser(cond, batch.guidance_scale, time_ids,
                                 self.negative_conditioning(batch.negative_ids, batch.negative_rows,
                                                            cond.hidden.shape[0]))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae_forward(latents / self.model.vae.config.scaling_factor)
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
