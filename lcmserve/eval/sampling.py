"""Images from each sampler the evaluation compares, for a list of (caption, seed) rows.

``lcm`` runs our engine on an LCM. ``ddim``, ``dpmsolver`` and ``dpmsolver++`` run the
teacher through diffusers' own StableDiffusionPipeline with classifier-free guidance and the
scheduler swapped, with "trailing" timestep spacing (SD's default "leading" spacing starts a
one-step run at t = 1, which is no baseline at all).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

SAMPLERS = ("lcm", "ddim", "dpmsolver", "dpmsolver++")


def teacher_pipeline(model: str, sampler: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    config = dict(pipe.scheduler.config, timestep_spacing="trailing")
    if sampler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(config)
    else:
        algorithm = "dpmsolver++" if sampler == "dpmsolver++" else "dpmsolver"
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            config, algorithm_type=algorithm, solver_order=2, final_sigmas_type="zero"
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(model: str, sampler: str, steps: int, guidance: float, captions: Sequence[str], seeds: Sequence[int],
           batch_size: int = 64, on_batch: Callable[[int], None] | None = None,
           device: torch.device | str = "cpu", lora: str | None = None, adapter: str | None = None) -> torch.Tensor:
    """float32 [N, 3, H, W] images in [0, 1] on the CPU, one per (caption, seed).

    Noise is drawn on the CPU from each row's seed on any ``device``, so a GPU run samples the
    same starting points as a CPU run. ``lora``: an LCM-LoRA fused into ``model``; ``adapter``: a LoRA
    held beside it and named by every row at scale 1, as a server's per-request adapter (lcm only).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    if (lora is not None or adapter is not None) and sampler != "lcm":
        raise ValueError(f"lora, adapter: only with the lcm sampler; got {sampler!r}")
    images = []
    if sampler == "lcm":
        from lcmserve.engine import LCMSampler, Row
        from lcmserve.engine.adapters import AdapterSet
        from lcmserve.models import load_model

        loaded = load_model(model, lora=lora, device=str(device), dtype="float32")
        adapters = AdapterSet(loaded)
        if adapter is not None:
            adapters.load("eval", adapter)
        engine = LCMSampler(loaded, max_batch_size=batch_size, adapters=adapters)
        size = engine.model.native_size
        named = {"eval": 1.0} if adapter is not None else None
        for i in range(0, len(captions), batch_size):
            rows = [Row(c, s, guidance, adapters=named)
                    for c, s in zip(captions[i : i + batch_size], seeds[i : i + batch_size])]
            images.append(engine.run_rows(rows, steps, size, size).images.float().cpu())
            if on_batch:
                on_batch(len(rows))
        return torch.cat(images)
    pipe = teacher_pipeline(model, sampler).to(device)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    for i in range(0, len(captions), batch_size):
        chunk = list(captions[i : i + batch_size])
        generators = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch_size]]
        with torch.no_grad():
            out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                       height=size, width=size, output_type="pt").images
        images.append(out.float().cpu())
        if on_batch:
            on_batch(len(chunk))
    return torch.cat(images)
