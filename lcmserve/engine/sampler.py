"""The N-step LCM sampler over a batch of rows, each with its own prompt, seed and guidance.

The sampler owns what must be identical across backends: request checks, tokenization,
the timestep schedule and every random draw. Noise for a row comes from a CPU generator
seeded with that row's seed, in the same order as diffusers' pipelines draw it with a list
of generators (initial latent, then one draw per later step), so a row gives the same image
alone, inside any batch, and in diffusers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lcmserve.consistency import lcm_timesteps
from lcmserve.engine.adapters import AdapterSet
from lcmserve.engine.backends.base import Backend, DenoiseBatch, StageTimes
from lcmserve.engine.backends.torch import TorchBackend
from lcmserve.engine.loop import StepCallback
from lcmserve.engine.request import (
    MAX_SEED,
    GenerationRequest,
    Limits,
    ResolvedRequest,
    Row,
    check_adapters,
    check_guidance,
    check_num_images,
    check_negative_prompt,
    check_prompt,
    check_seed,
    check_size,
    check_steps,
)
from lcmserve.errors import InvalidInputError
from lcmserve.models.model import LCMModel

logger = logging.getLogger(__name__)


@dataclass
class BatchResult:
    """Images of one batch, float32 [B, 3, H, W] in [0, 1], with per-row truncation flags."""

    images: torch.Tensor
    times: StageTimes
    truncated: list[bool]


@dataclass
class GenerationResult:
    """All images of one request, the seed of each, and the time spent per stage."""

    request: ResolvedRequest
    images: torch.Tensor
    seeds: list[int]
    times: StageTimes = field(default_factory=StageTimes)

    def to_pil(self) -> list:
        from PIL import Image

        arrays = (self.images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
        return [Image.fromarray(a) for a in arrays]


class LCMSampler:
    """Checks requests, builds batches and runs them on a backend (eager torch by default)."""

    def __init__(
        self,
        model: LCMModel,
        backend: Backend | None = None,
        limits: Limits | None = None,
        max_batch_size: int = 8,
        adapters: AdapterSet | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1; got {max_batch_size}")
        self.model = model
        self.backend = backend or TorchBackend(model)
        self._eager: TorchBackend | None = None
        self.limits = limits or Limits.for_native_size(model.native_size)
        self.max_batch_size = max_batch_size
        self.adapters = adapters
        """LoRA adapters held beside the model, chosen per row; None: rows may name none."""

    # 1. checks --------------------------------------------------------------------------
    def resolve(self, request: GenerationRequest) -> ResolvedRequest:
        """Check every field and fill defaults; raises InvalidInputError naming the field."""
        prompt = check_prompt(request.prompt)
        negative_prompt = check_negative_prompt(request.negative_prompt, self.model.guidance_mode)
        num_images = check_num_images(request.num_images, self.limits)
        steps = check_steps(request.steps)
        w = self.model.default_guidance_scale if request.guidance_scale is None else request.guidance_scale
        guidance = check_guidance(w, self.limits)
        native = self.model.native_size
        width = check_size("width", native if request.width is None else request.width, self.limits)
        height = check_size("height", native if request.height is None else request.height, self.limits)
        seed = check_seed(request.seed)
        if seed + num_images - 1 > MAX_SEED:
            raise InvalidInputError.out_of_range(
                "seed", seed, f"at most {MAX_SEED - num_images + 1} for num_images={num_images} (image i uses seed+i)"
            )
        return ResolvedRequest(
            prompt=prompt, num_images=num_images, steps=steps, guidance_scale=guidance,
            width=width, height=height, seed=seed, negative_prompt=negative_prompt,
            adapters=self.check_adapter_names(request.adapters),
            truncated=self.count_tokens(prompt) > self.model.max_prompt_tokens,
        )

    def check_rows(self, rows: Sequence[Row], steps: int, width: int, height: int) -> None:
        """The same checks for callers (the batcher) that build rows themselves."""
        if not rows:
            raise InvalidInputError("rows: a batch needs at least one row", param="rows")
        check_steps(steps)
        check_size("width", width, self.limits)
        check_size("height", height, self.limits)
        for row in rows:
            check_prompt(row.prompt)
            check_negative_prompt(row.negative_prompt, self.model.guidance_mode)
            check_guidance(row.guidance_scale, self.limits)
            if check_seed(row.seed) != row.seed:
                raise InvalidInputError.out_of_range("seed", row.seed, "an integer per row")
            self.check_adapter_names(row.adapters)

    def check_adapter_names(self, adapters) -> tuple[tuple[str, float], ...]:
        """The adapters checked (count and scales) and known to this engine."""
        items = check_adapters(adapters)
        if not items:
            return items
        if self.adapters is None:
            raise InvalidInputError(f"adapters: no adapter named {items[0][0]!r} is loaded; loaded: none "
                                    "(load adapters beside the model to choose them per request)", param="adapters")
        self.adapters.check(name for name, _ in items)
        return items

    # 2. tokens and noise ------------------------------------------------------------------------
    def count_tokens(self, prompt: str) -> int:
        # verbose=False: counting is not encoding, so transformers' "will result in indexing errors" does not
        # apply; an over-long prompt gets tokenize()'s warning, which names the limit.
        return len(self.model.tokenizers[0](prompt, verbose=False).input_ids)

    def tokenize(self, prompts: Sequence[str], param: str = "prompt") -> tuple[tuple[torch.Tensor, ...], list[bool]]:
        """Token ids per text encoder, padded to its limit; over-long prompts are cut with a warning."""
        ids = []
        for tokenizer in self.model.tokenizers:
            ids.append(
                tokenizer(
                    list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt",
                ).input_ids
            )
        limit = self.model.max_prompt_tokens
        truncated = []
        lengths = [len(row) for row in self.model.tokenizers[0](list(prompts), verbose=False).input_ids]
        for prompt, n in zip(prompts, lengths):
            truncated.append(n > limit)
            if n > limit:
                logger.warning(
                    "%s: %d tokens is over this model's limit of %d tokens; the end was cut off: %.80r",
                    param, n, limit, prompt,
                )
        return tuple(ids), truncated

    def draw_noise(self, seeds: Sequence[int], steps: int, height: int, width: int) -> torch.Tensor:
        """[steps, B, C, h, w] float32 standard normal noise, row b drawn from its own seed."""
        f = self.model.vae_scale_factor
        shape = (1, self.model.latent_channels, height // f, width // f)
        per_row = []
        for seed in seeds:
            generator = torch.Generator("cpu").manual_seed(seed)
            per_row.append(torch.cat([torch.randn(shape, generator=generator) for _ in range(steps)]))
        return torch.stack(per_row, dim=1)

    def make_batch(self, rows: Sequence[Row], steps: int, width: int, height: int) -> tuple[DenoiseBatch, list[bool]]:
        input_ids, truncated = self.tokenize([row.prompt for row in rows])
        timesteps = lcm_timesteps(steps, self.model.schedule.num_train_timesteps, self.model.schedule.original_steps)
        negative_ids = negative_rows = None
        if any(row.negative_prompt for row in rows):
            negative_ids, _ = self.tokenize([row.negative_prompt for row in rows], "negative_prompt")
            negative_rows = torch.tensor([bool(row.negative_prompt) for row in rows])
        batch = DenoiseBatch(
            input_ids=input_ids,
            noise=self.draw_noise([row.seed for row in rows], steps, height, width),
            guidance_scale=torch.tensor([row.guidance_scale for row in rows], dtype=torch.float32),
            timesteps=tuple(timesteps),
            height=height,
            width=width,
            negative_ids=negative_ids,
            negative_rows=negative_rows,
        )
        return batch, truncated

    # 3. running ------------------------------------------------------------------------------
    def run_rows(
        self, rows: Sequence[Row], steps: int, width: int, height: int, on_step: StepCallback | None = None
    ) -> BatchResult:
        """Generate one image per row; rows share steps and resolution."""
        self.check_rows(rows, steps, width, height)
        batch, truncated = self.make_batch(rows, steps, width, height)
        row_adapters = [row.adapters for row in rows]
        if not any(row_adapters):
            out = self.backend.run(batch, on_step=on_step)
        else:
            with self.adapters.applied(row_adapters):
                out = self.adapter_backend().run(batch, on_step=on_step)
        return BatchResult(out.images, out.times, truncated)

    def adapter_backend(self) -> Backend:
        """What a batch with adapters runs on: the eager path over the same model and weights, whatever the backend.

        The adapters' per-layer hooks (adapters.py) reach torch's modules only, not a compiled graph, captured
        CUDA graphs or exported files; so batches without adapters keep the backend's speed, and those with
        adapters run eager."""
        if self.backend.name == "torch":
            return self.backend
        if self._eager is None:
            self._eager = TorchBackend(self.model)
        return self._eager

    def generate(
        self,
        request: GenerationRequest,
        on_step: Callable[[int, int], None] | None = None,
    ) -> GenerationResult:
        """Run a request in batches of at most ``max_batch_size``; ``on_step(done, total)`` reports progress."""
        resolved = self.resolve(request)
        rows = resolved.rows()
        chunks = [rows[i : i + self.max_batch_size] for i in range(0, len(rows), self.max_batch_size)]
        total = len(chunks) * resolved.steps
        images, times = [], StageTimes()
        for c, chunk in enumerate(chunks):
            step_cb = None
            if on_step is not None:
                step_cb = lambda i, _x, c=c: on_step(c * resolved.steps + i + 1, total)  # noqa: E731
            result = self.run_rows(chunk, resolved.steps, resolved.width, resolved.height, step_cb)
            images.append(result.images)
            for name in ("text_s", "unet_s", "vae_s"):
                setattr(times, name, getattr(times, name) + getattr(result.times, name))
        return GenerationResult(
            request=resolved, images=torch.cat(images), seeds=[row.seed for row in rows], times=times
        )


__all__ = ["BatchResult", "GenerationResult", "LCMSampler"]
