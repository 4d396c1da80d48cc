"""The static-shape program that the bucketed backends share (compiled, cuda-graph, tensorrt).

Per bucket (rows, steps, resolution) the program owns static buffers: token ids, the
[steps, B, C, h, w] noise, the guidance condition (the embedding of each row's w, or w itself
for classifier-free guidance), the x0 estimate of every step and the decoded images. A
request copies its rows into the input buffers (through pinned memory on a GPU,
asynchronously), runs three stages (text, the unrolled LCM loop, VAE) and copies the images
back; the only host-device synchronisation is that final copy. The stages are the eager
backend's own code over the backend's networks, so a row gives the same image as eager.

Why three stages and not one: their boundaries give the per-stage split for free, and a
stage that cannot be captured as a CUDA graph (``capture_text=False``) can run eagerly into
the same buffers. The stages pass data only through the buffers, so a batch may skip one (a
CFG model's batch runs one of its two loops). A batch that falls between buckets pads to the
next one (``buckets.pad_batch``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lcmserve.consistency import lcm_timesteps
from lcmserve.engine.backends.base import BackendOutput, Bucket, DenoiseBatch, StageClock, StageTimes
from lcmserve.engine.backends.buckets import BucketSet, pad_batch
from lcmserve.engine.backends.torch import TorchBackend
from lcmserve.engine.conditioning import TextConditioning, sdxl_time_ids
from lcmserve.engine.loop import StepCallback, lcm_sample
from lcmserve.errors import InvalidInputError

logger = logging.getLogger(__name__)

UNGUIDED_LOOP = "loop-unguided"  # the stage of a CFG model's batches whose rows all have w <= 1
Stages = dict[str, Callable[[], None]]
#: Turns a bucket's stages into replayable CUDA graphs by stage name (cuda_graph.capture_stages).
Capture = Callable[[Stages], dict[str, "torch.cuda.CUDAGraph"]]


def check_cpu_dtype(model) -> None:
    """The bucketed program on a CPU runs float32 or bfloat16 (no float16 kernels worth having)."""
    if model.device.type == "cpu" and model.dtype not in (torch.float32, torch.bfloat16):
        raise InvalidInputError.out_of_range("dtype", model.dtype_name, "float32 or bfloat16 on CPU")


@dataclass
class _Program:
    """Static buffers and stage graphs of one bucket."""

    bucket: Bucket
    timesteps: tuple[int, ...]
    input_ids: tuple[torch.Tensor, ...]
    host_ids: tuple[torch.Tensor, ...]
    noise: torch.Tensor
    host_noise: torch.Tensor
    guidance: torch.Tensor  # [B, dim] embedding (model dtype) or [B] w (float32) for CFG
    host_guidance: torch.Tensor
    timestep_values: dict[int, torch.Tensor]
    time_ids: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    x0: torch.Tensor | None = None
    images: torch.Tensor | None = None
    host_images: torch.Tensor | None = None
    graphs: dict[str, torch.cuda.CUDAGraph] | None = None
    # Classifier-free guidance models only: each row's negative prompt, which rows have one, and the
    # unconditional features the loop uses (the negative prompt's or the empty prompt's, per row).
    negative_ids: tuple[torch.Tensor, ...] = ()
    host_negative_ids: tuple[torch.Tensor, ...] = ()
    negative_rows: torch.Tensor | None = None
    host_negative_rows: torch.Tensor | None = None
    any_negative: bool = False
    uncond: TextConditioning | None = None


def _host_twin(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """The pinned CPU staging buffer of a device buffer (an empty tensor where none is needed)."""
    return torch.zeros_like(t, device="cpu").pin_memory() if pin else t.new_zeros(0)


def _upload(static: torch.Tensor, host: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` into a static buffer: straight on a CPU, through pinned memory (asynchronously) on a GPU."""
    if host.numel() == 0:
        static.copy_(value)
        return
    host.copy_(value)
    static.copy_(host, non_blocking=True)


class BucketPrograms:
    """One static program per bucket over ``eager``'s logic and networks, built once and run per batch.

    ``capture``: turns each bucket's stages into CUDA graphs (None: run them as they are).
    ``build_context``: in force while a bucket builds (the compiled backend's inductor settings).
    ``warm_runs``: runs of every stage at build time when nothing is captured, so that torch.compile
    compiles at start-up rather than on a bucket's first request."""

    def __init__(self, eager: TorchBackend, buckets: BucketSet, *, name: str, capture: Capture | None = None,
                 build_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 warm_runs: int = 0) -> None:
        self.eager, self.model, self.buckets, self.name = eager, eager.model, buckets, name
        self.device = self.model.device
        self.capture, self.build_context, self.warm_runs = capture, build_context, warm_runs
        self.schedule = dataclasses.replace(
            self.model.schedule, alphas_cumprod=self.model.schedule.alphas_cumprod.to(self.device))
        self._programs: dict[Bucket, _Program] = {}
        self.warmed = False
        self.builds = 0  # buckets built so far; requests after warm-up must not add any

    # -- building a bucket ------------------------------------------------------------------
    @torch.inference_mode()
    def warmup(self, progress: bool = False) -> None:
        """Build (and capture) every bucket."""
        from tqdm import tqdm

        self.warmed = True
        buckets = self.buckets.buckets()
        for done, bucket in enumerate(tqdm(buckets, desc=f"{self.name} warm-up", unit="bucket",
                                           disable=not progress), 1):
            if bucket not in self._programs:
                started = time.perf_counter()
                self._programs[bucket] = self._build(bucket)
                # The log is the progress a server shows (no terminal for a bar); a bar makes it noise.
                logger.log(logging.DEBUG if progress else logging.INFO, "%s warm-up: bucket %d/%d (batch %d, %d steps, "
                           "%dx%d) built in %.1f s", self.name, done, len(buckets), bucket.batch_size, bucket.steps,
                           bucket.height, bucket.width, time.perf_counter() - started)

    def _program(self, bucket: Bucket) -> _Program:
        program = self._programs.get(bucket)
        if program is None:
            if self.warmed:
                logger.warning("bucket %s was not warmed up; building it now", bucket)
            program = self._programs[bucket] = self._build(bucket)
        return program

    def _allocate(self, bucket: Bucket) -> _Program:
        m, dev = self.model, self.device
        pin = dev.type == "cuda"
        b, f = bucket.batch_size, m.vae_scale_factor
        ids = tuple(torch.zeros(b, tok.model_max_length, dtype=torch.int64, device=dev) for tok in m.tokenizers)
        noise = torch.zeros(bucket.steps, b, m.latent_channels, bucket.height // f, bucket.width // f, device=dev)
        if m.guidance_mode == "embedding":
            guidance = torch.zeros(b, m.unet.config.time_cond_proj_dim, dtype=m.dtype, device=dev)
        else:
            guidance = torch.zeros(b, device=dev)
        timesteps = tuple(lcm_timesteps(bucket.steps, m.schedule.num_train_timesteps, m.schedule.original_steps))
        negative = {}
        if m.guidance_mode == "cfg":
            rows = torch.zeros(b, dtype=torch.bool, device=dev)
            negative = {
                "negative_ids": tuple(torch.zeros_like(t) for t in ids), "negative_rows": rows,
                "host_negative_ids": tuple(_host_twin(t, pin) for t in ids),
                "host_negative_rows": _host_twin(rows, pin),
            }
        return _Program(
            bucket=bucket, timesteps=timesteps, input_ids=ids, host_ids=tuple(_host_twin(t, pin) for t in ids),
            noise=noise, host_noise=_host_twin(noise, pin), guidance=guidance, host_guidance=_host_twin(guidance, pin),
            # Timesteps as device tensors: a Python int would be copied host-to-device inside the graph.
            timestep_values={t: torch.tensor(float(t), device=dev) for t in timesteps},
            **negative,
        )

    def _stages(self, p: _Program) -> Stages:
        m, eager = self.model, self.eager

        def text() -> None:
            cond = eager.encode_text(p.input_ids)
            p.hidden.copy_(cond.hidden)
            if p.pooled is not None:
                p.pooled.copy_(cond.pooled)
            if p.uncond is not None:
                # A captured graph always encodes the negative prompts (it cannot branch on the batch);
                # uncaptured, a batch without any skips that encoder pass.
                encode = self.capture is not None or p.any_negative
                uncond = eager.negative_conditioning(p.negative_ids if encode else None, p.negative_rows,
                                                     p.bucket.batch_size)
                p.uncond.hidden.copy_(uncond.hidden)
                if p.uncond.pooled is not None:
                    p.uncond.pooled.copy_(uncond.pooled)

        def loop(guided: bool = True) -> None:
            cond = TextConditioning(p.hidden, p.pooled)
            if m.guidance_mode == "embedding":
                base = eager.embedding_denoiser(cond, p.guidance, p.time_ids)
            elif guided:  # every row through CFG; rows with w <= 1 keep the conditional output, as eager
                base = eager.cfg_denoiser(cond, p.guidance, p.time_ids, p.uncond)
            else:  # no row above w = 1: the conditional pass alone, half the UNet work
                base = eager.plain_denoiser(cond, p.time_ids)
            # Every step's x0 estimate lands in p.x0; the last one is the loop's result.
            lcm_sample(
                lambda x, t: base(x, p.timestep_values[t]), p.noise, p.timesteps, self.schedule,
                on_step=lambda i, x0: p.x0[i].copy_(x0),
            )

        def vae() -> None:
            p.images.copy_(eager.decode(p.x0[-1]))

        stages = {"text": text, "loop": loop, "vae": vae}
        if m.guidance_mode == "cfg":
            # A second loop for batches with no row above w = 1 (an LCM-LoRA's default): which one runs
            # is known on the host from the request, so choosing needs no device sync.
            stages[UNGUIDED_LOOP] = lambda: loop(guided=False)
        return stages

    def _build(self, bucket: Bucket) -> _Program:
        with self.build_context():
            p = self._allocate(bucket)
            # Output buffers take their shapes from one eager pass.
            cond = self.eager.encode_text(p.input_ids)
            p.hidden, p.pooled = cond.hidden.clone(), None if cond.pooled is None else cond.pooled.clone()
            time_ids = sdxl_time_ids(p.pooled, bucket.height, bucket.width)
            p.time_ids = None if time_ids is None else time_ids.contiguous()
            if self.model.guidance_mode == "cfg":
                # The empty prompt's features are cached now, eagerly: no host-to-device copies during capture.
                p.uncond = self.eager.unconditional().expand(bucket.batch_size).clone()
            p.x0 = torch.zeros_like(p.noise)
            f = self.model.vae_scale_factor
            p.images = torch.zeros(bucket.batch_size, 3, p.noise.shape[-2] * f, p.noise.shape[-1] * f,
                                   device=self.device)
            p.host_images = _host_twin(p.images, self.device.type == "cuda")
            stages = self._stages(p)
            if self.capture is not None:
                p.graphs = self.capture(stages)
            else:
                for _ in range(self.warm_runs):
                    for fn in stages.values():
                        fn()
        self.builds += 1
        return p

    # -- running a batch ------------------------------------------------------------------------
    def _upload(self, p: _Program, batch: DenoiseBatch) -> None:
        if self.model.guidance_mode == "embedding":
            guidance = self.eager.guidance_condition(batch.guidance_scale).to(self.model.dtype)
        else:
            guidance = batch.guidance_scale.float()
        for host, static, ids in zip(p.host_ids, p.input_ids, batch.input_ids):
            _upload(static, host, ids)
        _upload(p.noise, p.host_noise, batch.noise)
        _upload(p.guidance, p.host_guidance, guidance)
        if p.negative_rows is not None:
            p.any_negative = batch.negative_rows is not None
            rows = batch.negative_rows if p.any_negative else torch.zeros(p.negative_rows.shape, dtype=torch.bool)
            _upload(p.negative_rows, p.host_negative_rows, rows)
            for host, static, ids in zip(p.host_negative_ids, p.negative_ids, batch.negative_ids or ()):
                _upload(static, host, ids)

    @torch.inference_mode()
    def run(self, batch: DenoiseBatch, on_step: StepCallback | None = None) -> BackendOutput:
        rows = batch.noise.shape[1]
        bucket = self.buckets.choose(rows, len(batch.timesteps), batch.height, batch.width)
        p = self._program(bucket)
        if tuple(batch.timesteps) != p.timesteps:
            raise InvalidInputError.out_of_range(
                "timesteps", list(batch.timesteps), f"the schedule the bucket was built for, {list(p.timesteps)}"
            )
        padded = pad_batch(batch, bucket.batch_size)
        stages = self._stages(p)
        clock = StageClock(self.device)
        clock.mark()
        self._upload(p, padded)
        guided = self.model.guidance_mode == "embedding" or self.eager.any_guided(padded)
        for name in ("text", "loop" if guided else UNGUIDED_LOOP, "vae"):
            if p.graphs is not None and name in p.graphs:
                p.graphs[name].replay()
            else:
                stages[name]()
            if name == "vae" and self.device.type == "cuda":
                p.host_images.copy_(p.images, non_blocking=True)
            clock.mark()
        text_s, unet_s, vae_s = clock.seconds()
        images = (p.host_images if self.device.type == "cuda" else p.images)[:rows].clone()
        if on_step is not None:
            for i in range(len(p.timesteps)):
                on_step(i, p.x0[i, :rows])
        return BackendOutput(images, StageTimes(text_s, unet_s, vae_s))
