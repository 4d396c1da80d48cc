"""CUDA-graph backend: each bucket's whole request (text encoder, every UNet call, VAE decode)
captured once and replayed, fp16 by default (bf16 or fp32 as the model was loaded).

Per bucket (rows, steps, resolution) the backend owns static buffers: token ids, the
[steps, B, C, h, w] noise, the guidance condition (the embedding of each row's w, or w itself
for classifier-free guidance), the x0 estimate of every step and the decoded images. A
request copies its rows into the input buffers (through pinned memory, asynchronously),
replays three graphs (text, the unrolled LCM loop, VAE) and copies the images back; the only
host-device synchronisation is that final copy. Because the sampler draws every row's noise
on the CPU from the row's own seed, replaying a graph gives each row the same image as eager.

Why three graphs and not one: CUDA events between them give the per-stage split for free,
and a text encoder that cannot be captured (``capture_text=False``) can run eagerly into the
same buffers. The three share one memory pool per bucket and are replayed in capture order.

Trade-offs (the flags): graphs take memory per bucket and minutes to warm up at start-up;
``compile=True`` adds ``torch.compile`` of the UNet and VAE (longer warm-up, faster
kernels); ``channels_last=True`` moves the convolutions to NHWC. A batch that falls between buckets pads to the next one. ``capture=False`` runs
the same static-buffer program without graphs: the way to tell a capture problem from a
model problem, and the only mode on a CPU (used by the CPU tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from lcmserve.engine.backends.base import BackendOutput, Bucket, DenoiseBatch, StageTimes
from lcmserve.engine.backends.buckets import BucketSet, pad_batch
from lcmserve.engine.backends.torch_backend import TextConditioning, TorchBackend
from lcmserve.engine.loop import StepCallback, lcm_sample
from lcmserve.errors import EngineError, InvalidInputError
from lcmserve.models.model import LCMModel

logger = logging.getLogger(__name__)

GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# torch.compile modes on a GPU, inside our own CUDA graphs: "reduce-overhead" and "max-autotune" capture
# graphs of their own and are left out. max-autotune-no-cudagraphs benchmarks Triton templates against
# cuBLAS/cuDNN for every matrix product and convolution at compile time (minutes for an SD1.5 bucket);
# default keeps the libraries' kernels and fuses the elementwise work around them (group norm + SiLU, ...).
COMPILE_MODES = ("max-autotune-no-cudagraphs", "default")
COMPILE_MODE = COMPILE_MODES[0]
UNGUIDED_LOOP = "loop-unguided"  # the stage of a CFG model's batches whose rows all have w <= 1


def inductor_cpu_settings(freeze: bool = True) -> dict[str, bool]:
    """Inductor's global settings while the compiled backend compiles on a CPU (``torch._inductor.config.patch``)."""
    # cpp_wrapper: inductor writes the code that calls its kernels and oneDNN's as C++ rather than
    # Python. The shapes UNet makes about 150 such calls per step; in C++ a batch-1 request is 8-12%
    # faster and one of batch 8-32 3-6% (docs/engine.md), with the same output. Building the wrapper
    # apart from the kernels compiles it at -O1 instead of -O3 with them: 14-20% less compile time,
    # the same speed.
    settings = {"cpp_wrapper": True, "cpp_wrapper_build_separate": True}
    if freeze:
        # Freezing folds the weights in as constants, which lets inductor prepack them for oneDNN
        # and fuse the activation into the convolution (mkldnn::_convolution_pointwise); safe because
        # a served model's weights never change.
        settings["freezing"] = True
    # These have to be in inductor's global config while a graph compiles:
    # torch.compile(options={"freezing": True}) does not reach the freezing pass.
    return settings


def cpu_compile_options() -> dict:
    """``torch.compile`` keywords for the compiled backend's functions on a CPU: guards on tensor arguments only."""
    # Before every call dynamo checks its guards. On the shapes UNet those on the modules' attributes
    # cost 1-1.5 ms a call, and those left after dropping them (global state, the functions and
    # globals the model's code reads) 0.1 ms more, per compiled call: 1.4 ms of a 37 ms batch-1
    # request (docs/engine.md). Nothing they watch changes in a served model after warm-up: the
    # weights are frozen into the code, the backend calls its functions only under inference mode
    # with its own static tensors, so the guards that stay are those on the tensor arguments, which
    # tell the bucket shapes apart. isolate_recompiles keeps these guard-light entries to this
    # backend's own calls (another model compiled in the same process cannot hit them).
    return {"options": {"guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe}, "isolate_recompiles": True}


def check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise InvalidInputError.out_of_range(
            "compile_mode", mode, "one of " + ", ".join(COMPILE_MODES) + " (reduce-overhead and max-autotune capture "
            "CUDA graphs of their own, which this backend already does)")
    return mode


def compile_options(device_type: str, mode: str = COMPILE_MODE) -> dict:
    """``torch.compile`` keywords of the bucketed backends: ``mode`` on a GPU; on a CPU our own set."""
    check_compile_mode(mode)
    return cpu_compile_options() if device_type == "cpu" else {"mode": mode}


@dataclass(frozen=True)
class CudaGraphConfig:
    """How the cuda-graph backend builds its buckets."""

    buckets: BucketSet = dataclasses.field(default_factory=BucketSet)
    """Shapes captured at start-up; a batch runs in the smallest bucket that holds it."""
    capture: bool = True
    """Capture CUDA graphs; False runs the same static-buffer program eagerly (debugging, CPU)."""
    capture_text: bool = True
    """Capture the text encoder too; False runs it eagerly into the static buffers."""
    compile: bool = False
    """torch.compile the UNet and VAE decoder before capture (GPU: ``compile_mode``;
    CPU, where nothing is captured: the text encoder too, inductor with frozen weights and a C++
    wrapper, ``inductor_cpu_settings``), compiling each bucket at warm-up."""
    compile_mode: str = COMPILE_MODE
    """GPU compile only: max-autotune-no-cudagraphs (the fastest kernels, minutes of autotuning per
    bucket at warm-up) or default (library kernels with fused elementwise work; a far shorter warm-up)."""
    channels_last: bool = False
    """Put the UNet's and VAE's convolution weights in channels-last (NHWC) memory, the layout of
    cuDNN's tensor-core kernels, so activations follow. This changes the model the backend is given
    (numerically the same network)."""
    freeze: bool = True
    """CPU compile only: inductor freezing (weights folded in as constants, prepacked for oneDNN, the
    activation fused into the convolution). Measured as fast or faster than without, in float32 and
    bfloat16 (docs/engine.md); False compiles without it."""
    warmup: bool = True
    """Build every bucket at construction instead of on its first request."""
    warmup_iters: int = 2
    """Eager runs before each capture (lazy initialisation, cuDNN/cuBLAS autotuning, compilation)."""

    def __post_init__(self) -> None:
        if not isinstance(self.buckets, BucketSet):
            raise InvalidInputError.out_of_range("buckets", self.buckets, "a BucketSet")
        if isinstance(self.warmup_iters, bool) or not isinstance(self.warmup_iters, int) or self.warmup_iters < 1:
            raise InvalidInputError.out_of_range("warmup_iters", self.warmup_iters, "an integer >= 1")
        check_compile_mode(self.compile_mode)


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
    time_ids: torch.Tensor | None
    timestep_values: dict[int, torch.Tensor]
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


class _Clock:
    """Stage boundaries: CUDA events on a GPU (no sync until read), wall time on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


class CudaGraphBackend(TorchBackend):
    """Whole-request CUDA graphs per bucket over the eager backend's own stage code."""

    name = "cuda-graph"

    def __init__(self, model: LCMModel, config: CudaGraphConfig | None = None, progress: bool = False) -> None:
        super().__init__(model)
        self.config = config or CudaGraphConfig()
        self.device = model.device
        self._check_device_dtype()
        self.schedule = dataclasses.replace(
            model.schedule, alphas_cumprod=model.schedule.alphas_cumprod.to(self.device)
        )
        self._programs: dict[Bucket, _Program] = {}
        self.builds = 0  # buckets built so far; requests after warm-up must not add any
        self.captures = 0  # CUDA graphs captured so far
        if self.config.channels_last:
            model.unet.to(memory_format=torch.channels_last)
            model.vae.to(memory_format=torch.channels_last)
        self._unet_fn = self._vae_fn = self._text_fns = None
        if self.config.compile:
            self._unet_fn, self._vae_fn, self._text_fns = self._compiled()
        if self.config.warmup:
            self.warmup(progress)

    def _check_device_dtype(self) -> None:
        dtype = self.model.dtype_name
        if self.config.capture:
            if self.device.type != "cuda":
                raise InvalidInputError(
                    f"backend: cuda-graph captures CUDA graphs and needs the model on a CUDA GPU (it is on "
                    f"{self.device.type}); use --backend torch or onnx here, or --device cuda",
                    param="backend",
                )
            if self.model.dtype not in GPU_DTYPES:
                raise InvalidInputError.out_of_range("dtype", dtype, "float16 (default), bfloat16 or float32")
        elif self.device.type == "cpu" and self.model.dtype not in (torch.float32, torch.bfloat16):
            raise InvalidInputError.out_of_range("dtype", dtype, "float32 or bfloat16 on CPU")

    def _compiled(self):
        vae = self.model.vae
        # Dynamo keeps one compiled variant per input shape of a function, up to recompile_limit (8 by
        # default); past that it silently runs eagerly. Every bucket shape needs its own variant.
        shapes = len(self.config.buckets.batch_sizes) * len(self.config.buckets.resolutions)
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, shapes + 1)
        how = compile_options(self.device.type, self.config.compile_mode)  # CPU freezing: see _compile_context
        unet = torch.compile(self.model.unet, dynamic=False, **how)
        decode = torch.compile(lambda z: vae.decode(z, return_dict=False)[0], dynamic=False, **how)
        # On a CPU the eager text encoder is 7% of a batch-1 request (3.3 ms of the shapes model's 45 ms;
        # 2.1 ms compiled); on a GPU it runs inside the captured graph, where compiling it would buy little.
        text = None
        if self.device.type == "cpu":
            text = tuple(torch.compile(encoder, dynamic=False, **how) for encoder in self.model.text_encoders)
        return unet, decode, text

    def _compile_context(self):
        """Inductor settings in force while the buckets compile (compilation happens on first call)."""
        if self.device.type != "cpu" or not self.config.compile:
            return contextlib.nullcontext()
        return torch._inductor.config.patch(**inductor_cpu_settings(self.config.freeze))

    # -- the networks, compiled when asked ----------------------------------------------------
    def text_encoder(self, index: int):
        if self._text_fns is None:
            return super().text_encoder(index)
        return self._text_fns[index]

    def unet_forward(self, sample, timestep, hidden, timestep_cond=None, added=None) -> torch.Tensor:
        if self._unet_fn is None:
            return super().unet_forward(sample, timestep, hidden, timestep_cond, added)
        return self._unet_fn(sample, timestep, encoder_hidden_states=hidden, timestep_cond=timestep_cond,
                             added_cond_kwargs=added, return_dict=False)[0]

    def vae_forward(self, scaled_latents: torch.Tensor) -> torch.Tensor:
        if self._vae_fn is None:
            return super().vae_forward(scaled_latents)
        return self._vae_fn(scaled_latents.to(self.model.vae.dtype))

    # -- building a bucket ------------------------------------------------------------------
    @torch.inference_mode()
    def warmup(self, progress: bool = False) -> None:
        """Build (and capture) every configured bucket."""
        from tqdm import tqdm

        for bucket in tqdm(self.config.buckets.buckets(), desc=f"{self.name} warm-up", unit="bucket",
                           disable=not progress):
            if bucket not in self._programs:
                self._programs[bucket] = self._build(bucket)

    def _program(self, bucket: Bucket) -> _Program:
        program = self._programs.get(bucket)
        if program is None:
            if self.config.warmup:
                logger.warning("bucket %s was not warmed up; building it now", bucket)
            program = self._build(bucket)
            self._programs[bucket] = program
        return program

    def _allocate(self, bucket: Bucket) -> _Program:
        from lcmserve.consistency import lcm_timesteps

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
        time_ids = self.time_ids(bucket.height, bucket.width, b)
        negative = {}
        if m.guidance_mode == "cfg":
            negative_ids = tuple(torch.zeros_like(t) for t in ids)
            rows = torch.zeros(b, dtype=torch.bool, device=dev)
            negative = {
                "negative_ids": negative_ids, "negative_rows": rows,
                "host_negative_ids": tuple(torch.zeros_like(t, device="cpu").pin_memory() for t in ids) if pin else (),
                "host_negative_rows": torch.zeros_like(rows, device="cpu").pin_memory() if pin else None,
            }
        return _Program(
            bucket=bucket, timesteps=timesteps, input_ids=ids,
            host_ids=tuple(torch.zeros_like(t, device="cpu").pin_memory() if pin else torch.zeros_like(t) for t in ids),
            noise=noise, host_noise=torch.zeros_like(noise, device="cpu").pin_memory() if pin else noise.new_zeros(0),
            guidance=guidance,
            host_guidance=torch.zeros_like(guidance, device="cpu").pin_memory() if pin else guidance.new_zeros(0),
            time_ids=None if time_ids is None else time_ids.contiguous(),
            # Timesteps as device tensors: a Python int would be copied host-to-device inside the graph.
            timestep_values={t: torch.tensor(float(t), device=dev) for t in timesteps},
            **negative,
        )

    def _stages(self, p: _Program):
        m = self.model

        def text() -> None:
            cond = self.encode_text(p.input_ids)
            p.hidden.copy_(cond.hidden)
            if p.pooled is not None:
                p.pooled.copy_(cond.pooled)
            if p.uncond is not None:
                # A captured graph always encodes the negative prompts (it cannot branch on the batch);
                # uncaptured, a batch without any skips that encoder pass.
                encode = self.config.capture or p.any_negative
                uncond = self.negative_conditioning(p.negative_ids if encode else None, p.negative_rows,
                                                    p.bucket.batch_size)
                p.uncond.hidden.copy_(uncond.hidden)
                if p.uncond.pooled is not None:
                    p.uncond.pooled.copy_(uncond.pooled)

        def loop(guided: bool = True) -> None:
            cond = TextConditioning(p.hidden, p.pooled)
            if m.guidance_mode == "embedding":
                base = self.embedding_denoiser(cond, p.guidance, p.time_ids)
            elif guided:  # every row through CFG; rows with w <= 1 keep the conditional output, as eager
                base = self.cfg_denoiser(cond, p.guidance, p.time_ids, p.uncond)
            else:  # no row above w = 1: the conditional pass alone, half the UNet work
                base = self.plain_denoiser(cond, p.time_ids)
            # Every step's x0 estimate lands in p.x0; the last one is the loop's result.
            lcm_sample(
                lambda x, t: base(x, p.timestep_values[t]), p.noise, p.timesteps, self.schedule,
                on_step=lambda i, x0: p.x0[i].copy_(x0),
            )

        def vae() -> None:
            p.images.copy_(self.decode(p.x0[-1]))

        stages = {"text": text, "loop": loop, "vae": vae}
        if m.guidance_mode == "cfg":
            # A second loop for batches with no row above w = 1 (an LCM-LoRA's default): which one runs
            # is known on the host from the request, so choosing needs no device sync.
            stages[UNGUIDED_LOOP] = lambda: loop(guided=False)
        return stages

    def _build(self, bucket: Bucket) -> _Program:
        # Under inductor's settings from the first call on: the eager pass below compiles the text encoder.
        with self._compile_context():
            return self._build_program(bucket)

    def _build_program(self, bucket: Bucket) -> _Program:
        m = self.model
        p = self._allocate(bucket)
        # Output buffers take their shapes from one eager pass.
        cond = self.encode_text(p.input_ids)
        p.hidden = cond.hidden.clone()
        p.pooled = None if cond.pooled is None else cond.pooled.clone()
        if m.guidance_mode == "cfg":
            # The empty prompt's features are cached now, eagerly: no host-to-device copies during capture.
            uncond = self.unconditional().expand(bucket.batch_size)
            p.uncond = TextConditioning(uncond.hidden.clone(), None if uncond.pooled is None else uncond.pooled.clone())
        p.x0 = torch.zeros_like(p.noise)
        f = m.vae_scale_factor
        p.images = torch.zeros(bucket.batch_size, 3, p.noise.shape[-2] * f, p.noise.shape[-1] * f, device=self.device)
        p.host_images = p.images.new_zeros(0) if self.device.type != "cuda" else \
            torch.zeros_like(p.images, device="cpu").pin_memory()
        stages = self._stages(p)
        if self.config.capture:
            p.graphs = self._capture(stages)
        elif self.config.compile:  # compile at start-up, not on the bucket's first request
            for _ in range(self.config.warmup_iters):
                for fn in stages.values():
                    fn()
        self.builds += 1
        return p

    def _capture(self, stages) -> dict[str, torch.cuda.CUDAGraph]:
        # 1. warm up on a side stream (the recipe of torch.cuda.graphs' documentation)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.config.warmup_iters):
                for fn in stages.values():
                    fn()
        torch.cuda.current_stream().wait_stream(side)
        # 2. capture each stage into one shared pool. The stages pass data only through the program's
        # static buffers, allocated outside the pool, so a replay may skip a stage (a CFG model's batch
        # runs one of its two loops) or take them in another order.
        pool = torch.cuda.graph_pool_handle()
        graphs = {}
        for name, fn in stages.items():
            if name == "text" and not self.config.capture_text:
                continue
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool):
                    fn()
            except Exception as exc:
                hint = " (capture_text=False runs the text encoder eagerly)" if name == "text" else ""
                raise EngineError(
                    f"cuda-graph: capturing the {name} stage failed: {exc}{hint}; --backend torch avoids graphs"
                ) from exc
            graphs[name] = graph
            self.captures += 1
        return graphs

    # -- the contract -----------------------------------------------------------------------
    def _upload(self, p: _Program, batch: DenoiseBatch) -> None:
        if self.model.guidance_mode == "embedding":
            guidance = self.guidance_condition(batch.guidance_scale).to(self.model.dtype)
        else:
            guidance = batch.guidance_scale.float()
        if p.negative_rows is not None:
            self._upload_negatives(p, batch)
        if self.device.type != "cuda":
            for static, ids in zip(p.input_ids, batch.input_ids):
                static.copy_(ids)
            p.noise.copy_(batch.noise)
            p.guidance.copy_(guidance)
            return
        # Pinned staging buffers make the host-to-device copies asynchronous.
        for host, static, ids in zip(p.host_ids, p.input_ids, batch.input_ids):
            host.copy_(ids)
            static.copy_(host, non_blocking=True)
        p.host_noise.copy_(batch.noise)
        p.noise.copy_(p.host_noise, non_blocking=True)
        p.host_guidance.copy_(guidance)
        p.guidance.copy_(p.host_guidance, non_blocking=True)

    def _upload_negatives(self, p: _Program, batch: DenoiseBatch) -> None:
        p.any_negative = batch.negative_rows is not None
        rows = batch.negative_rows if p.any_negative else torch.zeros(p.negative_rows.shape, dtype=torch.bool)
        if self.device.type != "cuda":
            p.negative_rows.copy_(rows)
            for static, ids in zip(p.negative_ids, batch.negative_ids or ()):
                static.copy_(ids)
            return
        p.host_negative_rows.copy_(rows)
        p.negative_rows.copy_(p.host_negative_rows, non_blocking=True)
        for host, static, ids in zip(p.host_negative_ids, p.negative_ids, batch.negative_ids or ()):
            host.copy_(ids)
            static.copy_(host, non_blocking=True)

    @torch.inference_mode()
    def run(self, batch: DenoiseBatch, on_step: StepCallback | None = None) -> BackendOutput:
        rows = batch.noise.shape[1]
        bucket = self.config.buckets.choose(rows, len(batch.timesteps), batch.height, batch.width)
        p = self._program(bucket)
        if tuple(batch.timesteps) != p.timesteps:
            raise InvalidInputError.out_of_range(
                "timesteps", list(batch.timesteps), f"the schedule the bucket was built for, {list(p.timesteps)}"
            )
        padded = pad_batch(batch, bucket.batch_size)
        stages = self._stages(p)
        clock = _Clock(self.device)
        clock.mark()
        self._upload(p, padded)
        guided = self.model.guidance_mode == "embedding" or self.any_guided(padded)
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


class CompiledBackend(CudaGraphBackend):
    """torch.compile over the bucketed static-shape program, without graph capture: the CPU's fast path.

    Inductor fuses the element-wise work between the convolutions and matrix products (group
    norm + SiLU, residual adds, the LCM step math) into generated C++ loops and, with frozen
    weights, prepacks them for oneDNN. Its kernels are specialised to shapes, so they are
    compiled per batch size at start-up (a minute or two each for the shapes model on two
    cores; inductor's on-disk cache, ``$TORCHINDUCTOR_CACHE_DIR``, makes a restart faster) and a
    batch pads to the next bucket, as with CUDA graphs. On a CPU the text encoder is compiled too, inductor
    calls its kernels from C++ (``inductor_cpu_settings``), and group norms over large maps take
    our statistics kernel (``group_norm_kernel``; engine/kernels/group_norm.py). On a GPU, ``cuda-graph`` with
    ``compile=True`` adds the graphs on top and is the better choice.
    """

    name = "compiled"

    def __init__(self, model: LCMModel, buckets: BucketSet | None = None, progress: bool = False,
                 freeze: bool = True, group_norm_kernel: bool = True, cache_dir=None) -> None:
        if group_norm_kernel and model.device.type == "cpu":
            # inductor's group norm is slow on the channels-last maps it gives oneDNN (engine/kernels/group_norm.py)
            from lcmserve.engine.kernels.group_norm import use_group_norm_kernel

            use_group_norm_kernel(model.unet, model.vae, cache_dir=cache_dir)
        config = CudaGraphConfig(buckets=buckets or BucketSet(), capture=False, compile=True, freeze=freeze)
        super().__init__(model, config, progress)
