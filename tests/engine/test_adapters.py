"""Per-request LoRA adapters: mixed batches against fused weights and against diffusers (fp32, CPU)."""

import threading

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline

from conftest import make_lora
from lcmserve.engine import GenerationRequest, LCMSampler, Row
from lcmserve.engine.adapters import AdapterSet
from lcmserve.errors import InvalidInputError, ModelLoadError
from lcmserve.models import load_model

TOL = 1e-4
STEPS = 2
# Convolutions (3x3 and 1x1), the time-embedding projection and attention, with alpha != r.
WIDE_TARGETS = ["conv1", "conv2", "conv_shortcut", "proj_in", "proj_out", "time_emb_proj", "to_q", "to_v", "ff.net.2"]


def make_wide_lora(base_dir, out_dir, seed: int):
    """A random LoRA over convs and linears, rank 4 and alpha 8, saved in peft's key format with its metadata, as
    ``lcmserve distill`` saves one."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=WIDE_TARGETS, init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe.unet.add_adapter(config)
    layers = get_peft_model_state_dict(pipe.unet)
    type(pipe).save_lora_weights(out_dir, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict())
    return out_dir


@pytest.fixture(scope="module")
def styles_sd(base_sd_dir, tmp_path_factory):
    """Two style adapters for the tiny SD base: attention only, and convs + linears."""
    return {"ink": make_lora(base_sd_dir, tmp_path_factory.mktemp("ink"), seed=11),
            "wide": make_wide_lora(base_sd_dir, tmp_path_factory.mktemp("wide"), seed=12)}


@pytest.fixture(scope="module")
def styles_lcm(lcm_sd_dir, tmp_path_factory):
    return {"ink": make_lora(lcm_sd_dir, tmp_path_factory.mktemp("lcm-ink"), seed=13),
            "wide": make_wide_lora(lcm_sd_dir, tmp_path_factory.mktemp("lcm-wide"), seed=14)}


def sampler_with(folder, styles, **load_kw) -> LCMSampler:
    model = load_model(str(folder), device="cpu", dtype="float32", **load_kw)
    adapters = AdapterSet(model)
    for name, path in styles.items():
        adapters.load(name, str(path))
    return LCMSampler(model, adapters=adapters)


def diffusers_pipe(pipe, styles, weights: dict[str, float], fuse: bool):
    """diffusers with the styles loaded by name and weighted by ``set_adapters``; fused into the UNet if asked."""
    for name, path in styles.items():
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(list(weights), list(weights.values()))
    if fuse:
        pipe.fuse_lora(components=["unet"], adapter_names=list(weights))
        pipe.unload_lora_weights()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lcm_lora_pipe(base_dir, lcm_lora):
    """The tiny base with its LCM-LoRA fused, as ``load_model(..., lora=...)`` builds it."""
    pipe = StableDiffusionPipeline.from_pretrained(base_dir)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(lcm_lora), adapter_name="lcm")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipe(pipe, row: Row):
    generator = [torch.Generator("cpu").manual_seed(row.seed)]
    return pipe([row.prompt], num_inference_steps=STEPS, guidance_scale=row.guidance_scale, generator=generator,
                height=64, width=64, output_type="pt").images[0]


MIXED_CFG = [
    Row("a red circle", 1, 2.0),
    Row("a photo of a cat", 2, 1.0, adapters={"ink": 1.0}),
    Row("blue square", 3, 2.0, adapters={"wide": -1.3, "ink": 0.7}),
    Row("a green triangle", 4, 1.5, adapters={"ink": 1.0}),
]


def test_cfg_mixed_batch_matches_fused_and_diffusers(base_sd_dir, lora_sd_dir, styles_sd):
    """A base + LCM-LoRA (classifier-free guidance, the doubled batch): rows over three adapter sets in one batch
    equal each row alone with its set fused into the UNet, and diffusers' set_adapters on the same weights."""
    sampler = sampler_with(base_sd_dir, styles_sd, lora=str(lora_sd_dir))
    before = {k: v.clone() for k, v in sampler.model.unet.state_dict().items()}
    batch = sampler.run_rows(MIXED_CFG, STEPS, 64, 64).images
    for i, row in enumerate(MIXED_CFG):
        pipe = lcm_lora_pipe(base_sd_dir, lora_sd_dir)
        if row.adapters:
            pipe = diffusers_pipe(pipe, styles_sd, dict(row.adapters), fuse=True)
        fused = run_pipe(pipe, row)
        assert (batch[i] - fused).abs().max() <= TOL, f"row {i} against its adapters fused"
    unfused = diffusers_pipe(lcm_lora_pipe(base_sd_dir, lora_sd_dir), styles_sd, dict(MIXED_CFG[2].adapters), False)
    torch.testing.assert_close(batch[2], run_pipe(unfused, MIXED_CFG[2]), rtol=0, atol=TOL)
    # The adapters change the image, and leave the base weights and the module tree untouched.
    plain = sampler.run_rows([Row(MIXED_CFG[2].prompt, 3, 2.0)], STEPS, 64, 64).images[0]
    assert (plain - batch[2]).abs().max() > 1e-3
    after = sampler.model.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks for m in sampler.model.unet.modules())


def test_embedding_lcm_mixed_batch_matches_diffusers(lcm_sd_dir, styles_lcm):
    """A distilled LCM (guidance through its embedding, one pass): mixed rows equal diffusers' LCM pipeline."""
    sampler = sampler_with(lcm_sd_dir, styles_lcm)
    rows = [Row("a red circle", 5, 8.0, adapters={"ink": 1.0, "wide": 0.5}), Row("a cat", 6, 4.0),
            Row("a blue square", 7, 6.0, adapters={"wide": 2.0})]
    batch = sampler.run_rows(rows, STEPS, 64, 64).images
    for i in (0, 2):
        pipe = LatentConsistencyModelPipeline.from_pretrained(lcm_sd_dir, safety_checker=None, feature_extractor=None)
        expected = run_pipe(diffusers_pipe(pipe, styles_lcm, dict(rows[i].adapters), False), rows[i])
        torch.testing.assert_close(batch[i], expected, rtol=0, atol=TOL)
    alone = sampler.run_rows([rows[1]], STEPS, 64, 64).images[0]
    torch.testing.assert_close(batch[1], alone, rtol=0, atol=1e-5)


def test_on_another_backend_batches_with_adapters_run_eager_and_the_rest_on_the_backend(lcm_sd_dir, styles_lcm):
    """Adapters' hooks reach torch's modules only: a compiled (here: recording) backend keeps the plain batches,
    and a batch with adapters runs on the eager path over the same weights, equal to a torch sampler's."""
    from lcmserve.engine.backends import TorchBackend

    reference = sampler_with(lcm_sd_dir, styles_lcm)
    sampler = sampler_with(lcm_sd_dir, styles_lcm)
    ran = []

    class Compiled(TorchBackend):
        name = "compiled"

        def run(self, batch, on_step=None):
            ran.append(batch.input_ids[0].shape[0])
            return super().run(batch, on_step)

    sampler.backend = Compiled(sampler.model)
    rows = [Row("a red circle", 5, 8.0, adapters={"ink": 1.0}), Row("a cat", 6, 4.0)]
    mixed = sampler.run_rows(rows, STEPS, 64, 64).images
    assert ran == [] and sampler.adapter_backend().name == "torch"
    torch.testing.assert_close(mixed, reference.run_rows(rows, STEPS, 64, 64).images, rtol=0, atol=1e-6)
    sampler.run_rows([Row("a cat", 6, 4.0)], STEPS, 64, 64)
    assert ran == [1]


def test_requests_carry_adapters_and_stay_hashable(lcm_sd_dir, styles_lcm):
    sampler = sampler_with(lcm_sd_dir, styles_lcm)
    request = GenerationRequest("a cat", num_images=2, steps=1, seed=3, adapters={"wide": 1, "ink": 0.5})
    assert request.adapters == (("ink", 0.5), ("wide", 1.0))
    assert hash(request) == hash(GenerationRequest("a cat", num_images=2, steps=1, seed=3,
                                                   adapters=[("wide", 1.0), ("ink", 0.5)]))
    resolved = sampler.resolve(request)
    assert all(row.adapters == request.adapters for row in resolved.rows())
    images = sampler.generate(request).images
    alone = sampler.run_rows([Row("a cat", 4, 8.0, adapters={"ink": 0.5, "wide": 1.0})], 1, 64, 64).images[0]
    torch.testing.assert_close(images[1], alone, rtol=0, atol=1e-5)


def test_unknown_adapter_is_named_with_the_loaded_ones(lcm_sd_dir, styles_lcm):
    sampler = sampler_with(lcm_sd_dir, styles_lcm)
    with pytest.raises(InvalidInputError, match=r"no adapter named 'oil' is loaded; loaded: ink, wide") as err:
        sampler.resolve(GenerationRequest("a cat", adapters={"oil": 1.0}))
    assert err.value.param == "adapters"
    with pytest.raises(InvalidInputError, match="'oil'"):
        sampler.run_rows([Row("a cat", 0, 8.0, adapters={"oil": 1.0})], 1, 64, 64)
    bare = LCMSampler(sampler.model)
    with pytest.raises(InvalidInputError, match="loaded: none"):
        bare.resolve(GenerationRequest("a cat", adapters={"ink": 1.0}))


@pytest.mark.parametrize("adapters", [
    {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0, "e": 1.0},
    {"a": 4.5}, {"a": -4.01}, {"a": float("nan")}, {"a": True}, {"": 1.0}, {3: 1.0}, "a", [("a", 1.0), ("a", 2.0)],
])
def test_adapter_count_and_scales_are_checked(adapters):
    with pytest.raises(InvalidInputError, match="adapters") as err:
        GenerationRequest("a cat", adapters=adapters)
    assert err.value.param == "adapters"
    with pytest.raises(InvalidInputError, match="adapters"):
        Row("a cat", 0, 1.0, adapters=adapters)
    assert Row("a cat", 0, 1.0, adapters={"a": -4, "b": 4.0}).adapters == (("a", -4.0), ("b", 4.0))


def test_bad_files_and_other_architectures_are_refused(lcm_sd_dir, lora_sdxl_dir, tmp_path):
    adapters = AdapterSet(load_model(str(lcm_sd_dir), device="cpu", dtype="float32"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="adapter 'junk' could not be loaded") as err:
        adapters.load("junk", str(junk))
    assert err.value.param == "path"
    with pytest.raises(ModelLoadError, match="does not exist"):
        adapters.load("gone", str(tmp_path / "gone.safetensors"))
    with pytest.raises(ModelLoadError, match="adapter 'xl'.*another architecture"):
        adapters.load("xl", str(lora_sdxl_dir))
    with pytest.raises(InvalidInputError, match="name"):
        adapters.load("bad name!", str(lora_sdxl_dir))
    assert adapters.names() == []


def test_load_remove_and_remove_waits_for_the_batch(lcm_sd_dir, styles_lcm):
    adapters = AdapterSet(load_model(str(lcm_sd_dir), device="cpu", dtype="float32"))
    adapters.load("ink", str(styles_lcm["ink"]))
    with pytest.raises(InvalidInputError, match="already loaded"):
        adapters.load("ink", str(styles_lcm["ink"]))
    adapters.load("wide", str(styles_lcm["wide"]), scale=0.5)
    assert adapters.names() == ["ink", "wide"]
    adapters.remove("wide")
    assert adapters.names() == ["ink"]
    with pytest.raises(InvalidInputError, match="no adapter named 'wide'"):
        adapters.remove("wide")
    # A removal during a batch that uses the adapter: new rows cannot ask for it, the batch keeps it.
    with adapters.applied([(("ink", 1.0),)]) as plan:
        remover = threading.Thread(target=adapters.remove, args=("ink",))
        remover.start()
        remover.join(0.3)
        assert remover.is_alive() and adapters.names() == []
        assert [a.name for a in plan.adapters] == ["ink"]
    remover.join(5)
    assert not remover.is_alive()


def test_a_removal_waits_for_the_requests_that_hold_the_adapter_while_they_are_queued(lcm_sd_dir, styles_lcm):
    adapters = AdapterSet(load_model(str(lcm_sd_dir), device="cpu", dtype="float32"))
    adapters.load("ink", str(styles_lcm["ink"]))
    held = adapters.hold(["ink"])  # a request admitted, its rows still queued
    remover = threading.Thread(target=adapters.remove, args=("ink",))
    remover.start()
    remover.join(0.3)
    # New requests are refused at once; the held one still runs with it when its batch comes.
    assert remover.is_alive() and adapters.names() == [] and adapters.describe() == []
    with pytest.raises(InvalidInputError, match="no adapter named 'ink' is loaded; loaded: none"):
        adapters.hold(["ink"])
    with pytest.raises(InvalidInputError, match="being removed"):
        adapters.load("ink", str(styles_lcm["ink"]))
    adapters.check(["ink"])
    with adapters.applied([(("ink", 1.0),)]) as plan:
        assert [a.name for a in plan.adapters] == ["ink"]
    assert remover.is_alive()
    adapters.release(held)
    remover.join(5)
    assert not remover.is_alive()
    with pytest.raises(InvalidInputError, match="no adapter named 'ink'"):
        adapters.check(["ink"])
    adapters.load("ink", str(styles_lcm["ink"]))
    assert adapters.names() == ["ink"]
    held = adapters.hold(["ink"])
    with pytest.raises(TimeoutError, match="stays loaded"):
        adapters.remove("ink", timeout_s=0.1)
    assert adapters.names() == ["ink"]
    adapters.release(held)
