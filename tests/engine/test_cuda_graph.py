"""CUDA-graph backend: buckets, padding and the static-buffer program (CPU); capture itself on a GPU."""

import pytest
import torch

from lcmserve.engine import LCMSampler, Row
from lcmserve.engine.backends import BucketSet, CudaGraphBackend, CudaGraphConfig, TorchBackend, pad_batch
from lcmserve.errors import InvalidInputError
from lcmserve.models import load_model
from lcmserve.models.loading import _to_lcm_model
from lcmserve.models.presets import build_preset_pipeline

ROWS = [Row("a red circle", 1, 8.0), Row("a cat", 2, 1.0), Row("blue square", 3, 3.5)]
# Classifier-free guidance models: rows with and without a negative prompt in one batch.
NEGATIVE_ROWS = [Row("a red circle", 1, 8.0, "a dog"), Row("a cat", 2, 1.0, "red"), Row("blue square", 3, 3.5)]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny():
    return load_model("preset:tiny-sd", device="cpu", dtype="float32")


def test_bucket_set_sorts_and_checks():
    buckets = BucketSet.parse("8,1,4,2", "4,2", "64x64,32")
    assert buckets.batch_sizes == (1, 2, 4, 8) and buckets.steps == (2, 4)
    assert buckets.resolutions == ((32, 32), (64, 64))
    assert len(buckets.buckets()) == 4 * 2 * 2
    for kwargs, param in [
        ({"batch_sizes": ()}, "batch_sizes"), ({"batch_sizes": (0, 2)}, "batch_sizes"),
        ({"batch_sizes": (65,)}, "batch_sizes"), ({"steps": (9,)}, "steps"),
        ({"resolutions": ((100, 64),)}, "resolutions"), ({"resolutions": ((64,),)}, "resolutions"),
    ]:
        with pytest.raises(InvalidInputError) as info:
            BucketSet(**kwargs)
        assert info.value.param == param
    with pytest.raises(InvalidInputError, match="HEIGHTxWIDTH"):
        BucketSet.parse("1", "4", "64xbig")


def test_choose_picks_the_smallest_bucket_that_holds_the_batch():
    buckets = BucketSet((1, 2, 4, 8), (4,), ((64, 64),))
    assert [buckets.choose(n, 4, 64, 64).batch_size for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    largest = r"batch_size must be in \[1, 8\] \(the largest built bucket\); got 9"
    with pytest.raises(InvalidInputError, match=largest) as info:
        buckets.choose(9, 4, 64, 64)
    assert info.value.param == "batch_size"
    with pytest.raises(InvalidInputError, match=r"steps must be one of the built step counts \[4\]; got 2"):
        buckets.choose(1, 2, 64, 64)
    with pytest.raises(InvalidInputError, match="built resolution .64x64.; got 64x128"):
        buckets.choose(1, 4, 64, 128)


def test_pad_batch_repeats_the_last_row_and_keeps_the_others(tiny):
    sampler = LCMSampler(tiny)
    batch, _ = sampler.make_batch(ROWS, 2, 32, 32)
    padded = pad_batch(batch, 5)
    assert padded.noise.shape[1] == 5 and padded.input_ids[0].shape[0] == 5
    torch.testing.assert_close(padded.noise[:, :3], batch.noise, rtol=0, atol=0)
    torch.testing.assert_close(padded.noise[:, 4], batch.noise[:, 2], rtol=0, atol=0)
    assert padded.guidance_scale.tolist() == [8.0, 1.0, 3.5, 3.5, 3.5]
    assert pad_batch(batch, 3) is batch
    with pytest.raises(ValueError):
        pad_batch(batch, 2)
    assert padded.negative_ids is None and padded.negative_rows is None
    negative, _ = sampler.make_batch(NEGATIVE_ROWS, 2, 32, 32)
    padded = pad_batch(negative, 5)
    assert padded.negative_rows.tolist() == [True, True, False, False, False]
    assert torch.equal(padded.negative_ids[0][4], negative.negative_ids[0][2])


def test_capture_needs_a_gpu_and_cpu_rejects_float16(tiny):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(InvalidInputError, match="needs the model on a CUDA GPU") as info:
        CudaGraphBackend(tiny, CudaGraphConfig(BucketSet((1,), (2,), ((32, 32),))))
    assert info.value.param == "backend"
    half = load_model("preset:tiny-sd", device="cpu", dtype="float32")
    half.unet.half()
    with pytest.raises(InvalidInputError, match="dtype must be float32 or bfloat16 on CPU; got 'float16'"):
        CudaGraphBackend(half, CudaGraphConfig(BucketSet((1,), (2,), ((32, 32),)), capture=False))
    with pytest.raises(InvalidInputError, match="warmup_iters"):
        CudaGraphConfig(warmup_iters=0)


def _static_backend(model, **kwargs):
    buckets = BucketSet((1, 4), (2,), ((32, 32),))
    return CudaGraphBackend(model, CudaGraphConfig(buckets, capture=False, **kwargs))


def test_static_program_matches_eager_and_never_rebuilds(tiny):
    backend = _static_backend(tiny)
    assert backend.builds == 2  # both buckets at start-up
    eager, graphed = LCMSampler(tiny), LCMSampler(tiny, backend=backend)
    steps_seen = []
    for rows in (ROWS, ROWS[:1], ROWS[1:], ROWS):  # 3 rows pad to 4; 1 row; 2 rows pad to 4
        expected = eager.run_rows(rows, 2, 32, 32).images
        got = graphed.run_rows(rows, 2, 32, 32, on_step=lambda i, x: steps_seen.append((i, x.shape[0]))).images
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert backend.builds == 2
    assert steps_seen[:2] == [(0, 3), (1, 3)]
    result = graphed.run_rows(ROWS, 2, 32, 32)
    assert result.times.unet_s > 0 and result.times.vae_s > 0


def test_static_program_classifier_free_guidance_matches_eager():
    """A base model (LCM-LoRA style) takes CFG: the graph always runs it; w <= 1 rows keep the conditional.

    Negative prompts replace the empty one row by row; a batch without any after one with them gets the
    empty prompt's features back in the static buffers."""
    model = _to_lcm_model(build_preset_pipeline("tiny-sd", lcm=False, seed=2), "tiny-base", None, torch.device("cpu"))
    assert model.guidance_mode == "cfg"
    backend = _static_backend(model)
    unet_rows = []
    unet = backend.networks.unet
    backend.networks.unet = lambda sample, *args, **kw: unet_rows.append(sample.shape[0]) or unet(sample, *args, **kw)
    images = {}
    for rows, unet_batch in ((ROWS, 8), (NEGATIVE_ROWS, 8), ([Row("a cat", 5, 1.0)], 1), (ROWS, 8),
                             (NEGATIVE_ROWS[:1], 2), ([Row("a cat", 5, 1.0, "a dog")], 1)):
        expected = LCMSampler(model).run_rows(rows, 2, 32, 32).images
        unet_rows.clear()
        got = LCMSampler(model, backend=backend).run_rows(rows, 2, 32, 32).images
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        # the doubled (guided) batch only when a row has w > 1; the bucket's rows otherwise
        assert unet_rows == [unet_batch] * 2, (rows, unet_rows)
        images[tuple(rows)] = got
    # The negative prompt reached the program: it changes its guided row (w 8), not the w <= 1 one.
    assert (images[tuple(NEGATIVE_ROWS)][0] - images[tuple(ROWS)][0]).abs().max() > 1e-3
    torch.testing.assert_close(images[tuple(NEGATIVE_ROWS)][1:], images[tuple(ROWS)][1:], rtol=0, atol=1e-5)


def test_channels_last_converts_the_convolutions_and_keeps_the_images():
    model = load_model("preset:tiny-sd", device="cpu", dtype="float32")  # its own: the backend converts it
    expected = LCMSampler(model).run_rows(ROWS, 2, 32, 32).images
    backend = _static_backend(model, channels_last=True)
    assert model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    got = LCMSampler(model, backend=backend).run_rows(ROWS, 2, 32, 32).images
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_unbuilt_shapes_are_clear_errors(tiny):
    sampler = LCMSampler(tiny, backend=_static_backend(tiny))
    with pytest.raises(InvalidInputError, match="batch_size must be in \\[1, 4\\]"):
        sampler.run_rows(ROWS + ROWS, 2, 32, 32)
    with pytest.raises(InvalidInputError, match="steps must be one of the built step counts"):
        sampler.run_rows(ROWS, 4, 32, 32)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", [("float16", 2e-2), ("bfloat16", 6e-2)])
def test_captured_matches_eager_on_gpu(dtype, atol):
    model = load_model("preset:tiny-sd", device="cuda", dtype=dtype)
    backend = CudaGraphBackend(model, CudaGraphConfig(BucketSet((1, 2, 4), (1, 4), ((64, 64),))))
    captures = backend.captures
    assert captures == 3 * 3 * 2  # text, loop, vae per bucket
    eager, graphed = LCMSampler(model, backend=TorchBackend(model)), LCMSampler(model, backend=backend)
    for rows, steps in ((ROWS, 4), (ROWS[:1], 4), (ROWS[:2], 1), (ROWS, 4)):
        expected = eager.run_rows(rows, steps, 64, 64).images
        got = graphed.run_rows(rows, steps, 64, 64).images
        torch.testing.assert_close(got, expected, rtol=0, atol=atol)
    assert backend.captures == captures and backend.builds == 6  # no capture per request


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("compile_,channels_last", [(False, False), (False, True), (True, False)])
def test_captured_cfg_and_compiled_on_gpu(compile_, channels_last):
    pipe = build_preset_pipeline("tiny-sd", lcm=False, seed=2, dtype=torch.float16)
    model = _to_lcm_model(pipe, "tiny-base", None, torch.device("cuda"))
    backend = CudaGraphBackend(model, CudaGraphConfig(BucketSet((4,), (2,), ((64, 64),)), compile=compile_,
                                                      channels_last=channels_last))
    assert backend.captures == 4  # text, the guided and the unguided loop, vae
    # the captured text graph encodes negative prompts every time; ROWS[1:2] (w 1) replays the unguided loop
    for rows in (ROWS, NEGATIVE_ROWS, ROWS[1:2], ROWS):
        expected = LCMSampler(model).run_rows(rows, 2, 64, 64).images
        got = LCMSampler(model, backend=backend).run_rows(rows, 2, 64, 64).images
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-2)


def test_compiled_backend_compiles_at_start_up_and_matches_eager(tiny):
    """torch.compile over the bucketed program (packages off): compiled once per bucket at warm-up, then no retrace."""
    from torch._dynamo.utils import counters

    from lcmserve.engine.backends import create_backend

    before = counters["frames"]["ok"]
    # Kernel profiling makes the C++ wrapper name each call it makes in the profiler (checked below).
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        backend = create_backend("compiled", tiny, buckets=BucketSet((4,), (2,), ((32, 32),)), packages=False)
    assert backend.builds == 1 and backend.name == "compiled"
    compiled_frames = counters["frames"]["ok"]
    assert compiled_frames - before >= 3  # the text encoder, the UNet and the VAE decode, at warm-up
    eager, compiled = LCMSampler(tiny), LCMSampler(tiny, backend=backend)
    for rows in (ROWS, ROWS[:1], ROWS):  # 3 rows and 1 row both pad to the bucket of 4
        expected = eager.run_rows(rows, 2, 32, 32).images
        got = compiled.run_rows(rows, 2, 32, 32).images
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert backend.builds == 1 and counters["frames"]["ok"] == compiled_frames
    with pytest.raises(InvalidInputError, match="batch_size must be in \\[1, 4\\]"):
        compiled.run_rows(ROWS + ROWS, 2, 32, 32)
    # float32 compiles frozen: the weights are prepacked and the convolutions are oneDNN's fused ones, called
    # from inductor's C++ wrapper (aoti_torch_* shims) rather than from Python
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        compiled.run_rows(ROWS, 2, 32, 32)
    ops = {e.key for e in prof.key_averages()}
    assert "aoti_torch_cpu_mkldnn__convolution_pointwise" in ops
    unfused = {op for op in ops if op.startswith(("aten::", "aoti_")) and "convolution" in op and "mkldnn" not in op}
    assert not unfused
    assert "aten::linear" not in ops  # the text encoder is compiled too (its linears are oneDNN's, from C++)


def test_cpu_compile_keeps_the_guards_that_tell_buckets_apart():
    """The compiled backend keeps only dynamo's guards on tensor arguments: each shape still gets its own code."""
    from torch._dynamo.utils import counters

    from lcmserve.engine.backends.compiled import cpu_compile_options

    layer = torch.nn.Linear(4, 3)
    compiled = torch.compile(layer, dynamic=False, backend="eager", **cpu_compile_options())
    before = counters["frames"]["ok"]
    with torch.inference_mode():
        for rows in (1, 2, 1, 2):
            x = torch.randn(rows, 4)
            torch.testing.assert_close(compiled(x), layer(x))
    assert counters["frames"]["ok"] - before == 2  # one entry per shape, each found again


def test_compiled_backends_of_two_models_keep_to_their_own_weights(tiny):
    """The CPU compile drops dynamo's guards on the modules (their per-call cost), so two models of the same
    architecture compiled in one process must not reach each other's compiled code (weights frozen into it)."""
    from lcmserve.engine.backends import create_backend

    other = load_model("preset:tiny-sd", device="cpu", dtype="float32")
    with torch.no_grad():
        other.unet.conv_out.weight.add_(0.05)
        other.vae.decoder.conv_out.weight.mul_(-1.0)
    buckets = BucketSet((1,), (2,), ((32, 32),))
    rows = ROWS[:1]
    try:
        first = create_backend("compiled", tiny, buckets=buckets, packages=False)
        second = create_backend("compiled", other, buckets=buckets, packages=False)
        for model, backend in ((tiny, first), (other, second), (tiny, first)):
            expected = LCMSampler(model).run_rows(rows, 2, 32, 32).images
            got = LCMSampler(model, backend=backend).run_rows(rows, 2, 32, 32).images
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        assert not torch.allclose(LCMSampler(tiny).run_rows(rows, 2, 32, 32).images,
                                  LCMSampler(other).run_rows(rows, 2, 32, 32).images, atol=1e-2)
    finally:
        torch._dynamo.reset()


def test_compile_mode_is_checked_and_reaches_torch_compile_on_a_gpu():
    from lcmserve.engine.backends.compiled import compile_options, cpu_compile_options

    assert compile_options("cuda", "default") == {"mode": "default"}
    assert compile_options("cuda") == {"mode": "max-autotune-no-cudagraphs"}
    assert compile_options("cpu", "default").keys() == cpu_compile_options().keys()  # the CPU keeps its own set
    for mode in ("reduce-overhead", "max-autotune", "fast"):
        with pytest.raises(InvalidInputError, match="compile_mode must be one of") as info:
            CudaGraphConfig(compile_mode=mode)
        assert info.value.param == "compile_mode"
