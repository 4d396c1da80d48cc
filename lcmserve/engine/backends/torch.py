"""Eager PyTorch backend: CPU (float32 / bfloat16) and GPU (float16 / bfloat16).

This is the reference path: every accelerated backend must match it within its dtype's
tolerance. It is also the logic they all share. A backend is this code (text features, the
guidance rule, the LCM loop, decoding) over a ``Networks`` triple: the model's own modules
here; compiled modules, ONNX Runtime sessions or TensorRT engines in the others.

Guidance follows diffusers' rule: a UNet with a guidance embedding (``time_cond_proj_dim``)
takes w as a condition in one pass; a UNet without one (a base model with a fused LCM-LoRA)
gets classical classifier-free guidance for rows with w > 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lcmserve.consistency import cfg_batch, cfg_combine, cfg_split, guidance_embedding, lcm_w
from lcmserve.engine.backends.base import Backend, BackendOutput, DenoiseBatch, StageClock, StageTimes
from lcmserve.engine.conditioning import TextConditioning, added_cond_kwargs, cfg_text, sdxl_time_ids
from lcmserve.engine.loop import StepCallback, lcm_sample
from lcmserve.models.model import LCMModel

TextFn = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
UNetFn = Callable[..., torch.Tensor]


@dataclass
class Networks:
    """The three networks as a backend calls them; each accelerated backend supplies its own."""

    text: TextFn
    """``text(index, input_ids)``: encoder ``index`` on [B, L] ids: its last (SD) or penultimate (SDXL) hidden
    states, and its pooled projection if it has one."""
    unet: UNetFn
    """``unet(sample, timestep, hidden, timestep_cond, added)``: the model output (epsilon, v or x0)."""
    vae: Callable[[torch.Tensor], torch.Tensor]
    """``vae(latents / scaling_factor)``: decoded images in [-1, 1]."""


def module_networks(model: LCMModel, encoders: Sequence[Callable] | None = None, unet: Callable | None = None,
                    decode: Callable | None = None) -> Networks:
    """The networks as torch modules: the model's own (looked up at call time), or stand-ins with the same
    signatures (``torch.compile`` of them)."""
    last_layer = model.family == "sd"  # SDXL attends to the penultimate hidden states

    def text(index: int, input_ids: torch.Tensor):
        encoder = (model.text_encoders if encoders is None else encoders)[index]
        ids = input_ids.to(model.device)
        if last_layer:
            return encoder(ids)[0], None
        out = encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2], (out[0] if out[0].ndim == 2 else None)

    def unet_fn(sample, timestep, hidden, timestep_cond=None, added=None) -> torch.Tensor:
        module = model.unet if unet is None else unet
        return module(sample, timestep, encoder_hidden_states=hidden, timestep_cond=timestep_cond,
                      added_cond_kwargs=added, return_dict=False)[0]

    def vae(scaled_latents: torch.Tensor) -> torch.Tensor:
        latents = scaled_latents.to(model.vae.dtype)
        return decode(latents) if decode is not None else model.vae.decode(latents, return_dict=False)[0]

    return Networks(text, unet_fn, vae)


class TorchBackend(Backend):
    """The eager reference backend over an ``LCMModel`` (``networks``: the model's modules by default)."""

    name = "torch"

    def __init__(self, model: LCMModel, networks: Networks | None = None) -> None:
        self.model = model
        self.networks = networks or module_networks(model)
        self._uncond: TextConditioning | None = None

    # -- text -----------------------------------------------------------------------------
    def encode_text(self, input_ids: tuple[torch.Tensor, ...]) -> TextConditioning:
        m = self.model
        # SDXL: the hidden states of both encoders side by side; pooled from the second.
        states, pooled = [], None
        for index, ids in enumerate(input_ids):
            hidden, row_pooled = self.networks.text(index, ids)
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
            uncond = self.encode_text(tuple(self._tokenize_empty(tok) for tok in m.tokenizers))
            if m.family == "sdxl" and m.force_zeros_for_empty_prompt:
                uncond = TextConditioning(torch.zeros_like(uncond.hidden), torch.zeros_like(uncond.pooled))
            self._uncond = uncond
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

    # -- guidance: one denoiser per rule ---------------------------------------------------------
    def guidance_condition(self, guidance_scale: torch.Tensor) -> torch.Tensor:
        """The UNet's guidance embedding of each row's LCM w (requests carry the Imagen-style scale)."""
        return guidance_embedding(lcm_w(guidance_scale.float()), self.model.unet.config.time_cond_proj_dim)

    def embedding_denoiser(self, cond: TextConditioning, w_emb: torch.Tensor, time_ids: torch.Tensor | None):
        """Guidance through the UNet's embedding: one pass per step (a full LCM)."""
        m = self.model
        w_emb = w_emb.to(m.device, m.dtype)
        added = added_cond_kwargs(cond, time_ids)
        return lambda latents, t: self.networks.unet(latents.to(m.dtype), t, cond.hidden, w_emb, added)

    def plain_denoiser(self, cond: TextConditioning, time_ids: torch.Tensor | None):
        """No guidance: the conditional prediction alone (w <= 1 for every row)."""
        m = self.model
        added = added_cond_kwargs(cond, time_ids)
        return lambda latents, t: self.networks.unet(latents.to(m.dtype), t, cond.hidden, None, added)

    def cfg_denoiser(self, cond: TextConditioning, scale: torch.Tensor, time_ids: torch.Tensor | None,
                     uncond: TextConditioning | None = None):
        """Classifier-free guidance in one doubled batch; rows with scale <= 1 take the conditional output.

        ``uncond``: each row's unconditional features (``negative_conditioning``); None: the empty prompt's."""
        m = self.model
        uncond = self.unconditional().expand(cond.hidden.shape[0]) if uncond is None else uncond
        both = cfg_text(cond, uncond)
        added = added_cond_kwargs(both, None if time_ids is None else cfg_batch(time_ids, time_ids))
        scale = scale.to(m.device, torch.float32)
        guided = (scale > 1).view(-1, 1, 1, 1)
        scale = scale.view(-1, 1, 1, 1)

        def denoise_cfg(latents: torch.Tensor, t) -> torch.Tensor:
            x = latents.to(m.dtype)
            out_cond, out_uncond = cfg_split(self.networks.unet(cfg_batch(x, x), t, both.hidden, None, added).float())
            # Rows with scale <= 1 take the conditional prediction unchanged, as they would alone.
            return torch.where(guided, cfg_combine(out_cond, out_uncond, scale), out_cond)

        return denoise_cfg

    @staticmethod
    def any_guided(batch: DenoiseBatch) -> bool:
        """Whether classifier-free guidance has work in this batch: a row with w > 1 (at w <= 1 a row takes the
        conditional prediction alone). Read on the host, from the request."""
        return bool((batch.guidance_scale > 1).any())

    def denoiser(self, cond: TextConditioning, batch: DenoiseBatch):
        """The denoiser of this batch under the model's guidance rule."""
        time_ids = sdxl_time_ids(cond.pooled, batch.height, batch.width)
        if self.model.guidance_mode == "embedding":
            return self.embedding_denoiser(cond, self.guidance_condition(batch.guidance_scale), time_ids)
        if not self.any_guided(batch):
            return self.plain_denoiser(cond, time_ids)
        uncond = self.negative_conditioning(batch.negative_ids, batch.negative_rows, cond.hidden.shape[0])
        return self.cfg_denoiser(cond, batch.guidance_scale, time_ids, uncond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.networks.vae(latents / self.model.vae.config.scaling_factor)
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # -- the contract -----------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: DenoiseBatch, on_step: StepCallback | None = None) -> BackendOutput:
        device = self.model.device
        clock = StageClock(device)
        clock.mark()
        # 1. text encoder (and the guidance condition)
        cond = self.encode_text(batch.input_ids)
        denoiser = self.denoiser(cond, batch)
        clock.mark()
        # 2. the LCM loop: one UNet call per step
        latents = lcm_sample(denoiser, batch.noise.to(device), batch.timesteps, self.model.schedule, on_step)
        clock.mark()
        # 3. VAE decode
        images = self.decode(latents).cpu()
        clock.mark()
        return BackendOutput(images, StageTimes(*clock.seconds()))
