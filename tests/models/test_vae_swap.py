"""--vae: a replacement decoder (TAESD's AutoencoderTiny, or another KL VAE) for every backend."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, LatentConsistencyModelPipeline

from lcmserve.engine import LCMSampler, Row
from lcmserve.engine.cache import fingerprint_module
from lcmserve.errors import ModelLoadError
from lcmserve.models import load_model
from lcmserve.models.presets import VAE_PRESETS, build_preset_vae

PROMPTS = ["a red circle at the top left", "a photo of a cat"]
SEEDS = [0, 7]
ROWS = [Row(p, s, 6.5) for p, s in zip(PROMPTS, SEEDS)]


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("taesd")
    build_preset_vae("preset:tiny-taesd", seed=3).save_pretrained(folder)
    return folder


def test_taesd_preset_has_the_published_architecture():
    vae = build_preset_vae("preset:taesd")
    assert isinstance(vae, AutoencoderTiny)
    # madebyollin/taesd: about 2.4M parameters in all, 1.2M of them in the decoder
    assert 2.3e6 < sum(p.numel() for p in vae.parameters()) < 2.5e6
    assert 1.1e6 < sum(p.numel() for p in vae.decoder.parameters()) < 1.3e6
    latents = torch.randn(1, 4, 8, 8)
    assert vae.decode(latents).sample.shape == (1, 3, 64, 64)
    assert set(VAE_PRESETS) == {"taesd", "tiny-taesd"}


def test_taesd_folder_matches_diffusers_pipeline_with_the_same_decoder(lcm_sd_dir, taesd_dir):
    """Our sampler with --vae equals diffusers' LCM pipeline with pipe.vae swapped for the same AutoencoderTiny."""
    pipe = LatentConsistencyModelPipeline.from_pretrained(lcm_sd_dir, safety_checker=None, feature_extractor=None)
    pipe.vae = AutoencoderTiny.from_pretrained(taesd_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPTS, num_inference_steps=2, guidance_scale=6.5, height=64, width=64, output_type="pt",
                    generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS]).images
    model = load_model(str(lcm_sd_dir), vae=str(taesd_dir), device="cpu", dtype="float32")
    assert isinstance(model.vae, AutoencoderTiny)
    assert (model.describe()["vae"], model.describe()["vae_source"]) == ("AutoencoderTiny", str(taesd_dir))
    got = LCMSampler(model).run_rows(ROWS, 2, 64, 64).images
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    # and the swap changes the images (the full VAE decodes the same latents differently)
    full = LCMSampler(load_model(str(lcm_sd_dir), device="cpu", dtype="float32")).run_rows(ROWS, 2, 64, 64).images
    assert (full - got).abs().mean() > 1e-2


def test_vae_is_found_in_a_pipeline_folder_and_keeps_its_class(lcm_sd_dir):
    """A pipeline folder's vae/ is used; a KL VAE stays a KL VAE (here: the same one, so the same images)."""
    model = load_model("preset:tiny-sd", vae=str(lcm_sd_dir), device="cpu", dtype="bfloat16")
    assert isinstance(model.vae, AutoencoderKL) and model.vae.dtype == torch.bfloat16
    own = load_model(str(lcm_sd_dir), device="cpu")
    assert fingerprint_module(load_model("preset:tiny-sd", vae=str(lcm_sd_dir), device="cpu").vae) == \
        fingerprint_module(own.vae)


def test_sdxl_takes_a_tiny_decoder_without_the_upcast(lcm_sdxl_dir):
    model = load_model(str(lcm_sdxl_dir), vae="preset:tiny-taesd", device="cpu", dtype="bfloat16")
    assert isinstance(model.vae, AutoencoderTiny) and model.vae.dtype == torch.bfloat16
    images = LCMSampler(model).run_rows(ROWS[:1], 1, 64, 64).images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_onnx_export_follows_the_decoder_and_matches_eager(tmp_path):
    """The vae_decoder graph is exported anew for the tiny decoder (the cache key follows the VAE), the other
    graphs are reused, and ONNX Runtime decodes as eager does."""
    pytest.importorskip("onnxruntime")
    from lcmserve.engine.backends.onnx import OnnxBackend
    from lcmserve.engine.export import export_model

    kl_paths = export_model(load_model("preset:tiny-sd", device="cpu"), tmp_path, 32, 32, exporter="legacy")
    model = load_model("preset:tiny-sd", vae="preset:tiny-taesd", device="cpu", dtype="float32")
    paths = export_model(model, tmp_path, 32, 32, exporter="legacy")
    assert paths["text_encoder"] == kl_paths["text_encoder"] and paths["unet"] == kl_paths["unet"]
    assert paths["vae_decoder"] != kl_paths["vae_decoder"]
    expected = LCMSampler(model).run_rows(ROWS, 2, 32, 32).images
    backend = OnnxBackend(model, tmp_path, exporter="legacy", build=False)
    got = LCMSampler(model, backend=backend).run_rows(ROWS, 2, 32, 32).images
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_static_bucket_program_decodes_with_the_tiny_decoder():
    """The bucketed program of the cuda-graph and compiled backends (static buffers, padding to the bucket)."""
    from lcmserve.engine.backends import BucketSet, CudaGraphBackend, CudaGraphConfig

    model = load_model("preset:tiny-sd", vae="preset:tiny-taesd", device="cpu", dtype="bfloat16")
    expected = LCMSampler(model).run_rows(ROWS, 2, 32, 32).images
    backend = CudaGraphBackend(model, CudaGraphConfig(BucketSet((4,), (2,), ((32, 32),)), capture=False))
    got = LCMSampler(model, backend=backend).run_rows(ROWS, 2, 32, 32).images
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-2)


@pytest.mark.parametrize("spec,match", [
    ("preset:nope", "vae: unknown preset 'preset:nope'; allowed: preset:taesd, preset:tiny-taesd"),
    ("/no/such/vae", "vae: folder '/no/such/vae' does not exist"),
    ("madebyollin/taesd", "vae: 'madebyollin/taesd' is not a local folder or preset and could not be loaded from the "
                          "Hugging Face Hub"),
    ("", "vae: give a VAE folder, a Hub id or preset:taesd"),
])
def test_bad_vae_specs_are_clear_errors(spec, match, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=match) as info:
        load_model("preset:tiny-sd", vae=spec, device="cpu")
    assert info.value.param == "vae"


def test_vae_that_does_not_fit_the_unet_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="upsamples latents 8x; the model's VAE does 2x") as info:
        load_model("preset:tiny-sd", vae="preset:taesd", device="cpu")  # 4 blocks, against the tiny VAE's 2
    assert info.value.param == "vae"
    AutoencoderTiny(**{**VAE_PRESETS["tiny-taesd"][1], "latent_channels": 8}).save_pretrained(tmp_path / "c8")
    with pytest.raises(ModelLoadError, match="decodes 8-channel latents; the model's UNet makes 4"):
        load_model("preset:tiny-sd", vae=str(tmp_path / "c8"), device="cpu")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ModelLoadError, match="holds a UNet2DModel; allowed: AutoencoderKL, AutoencoderTiny"):
        load_model("preset:tiny-sd", vae=str(tmp_path / "other"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="holds no VAE"):
        load_model("preset:tiny-sd", vae=str(tmp_path / "empty"), device="cpu")


def test_cli_generate_and_bench_take_the_decoder(tmp_path, lcm_sd_dir, taesd_dir):
    from lcmserve.cli import main

    assert main(["generate", "a cat", "--model", str(lcm_sd_dir), "--vae", str(taesd_dir), "--steps", "1",
                 "-o", str(tmp_path / "gen"), "-q"]) == 0
    record = json.loads((tmp_path / "gen" / "generation.json").read_text())
    assert (record["model"]["vae"], record["model"]["vae_source"]) == ("AutoencoderTiny", str(taesd_dir))
    assert main(["bench", "--model", "preset:tiny-sd", "--vae", "preset:tiny-taesd", "--backends", "torch",
                 "--batch-sizes", "1", "--steps", "1", "--resolutions", "32x32", "--warmup", "0", "--iters", "1",
                 "--device", "cpu", "--out", str(tmp_path), "--name", "taesd", "-q"]) == 0
    markdown = (tmp_path / "taesd.md").read_text()
    assert markdown.startswith("# lcmserve bench: preset:tiny-sd with VAE preset:tiny-taesd")
    assert "| torch + VAE preset:tiny-taesd | 1 | 1 | 32x32 |" in markdown
    result = json.loads((tmp_path / "taesd.json").read_text())
    assert {r["backend"] for r in result["rows"]} == {"diffusers", "torch"}
    assert result["model"]["vae"] == "AutoencoderTiny"


def test_diffusers_baseline_decodes_with_the_same_decoder():
    from lcmserve.engine.bench import diffusers_pipeline

    model = load_model("preset:tiny-sd", vae="preset:tiny-taesd", device="cpu")
    assert diffusers_pipeline(model).vae is model.vae


def test_server_takes_the_decoder_from_flag_or_environment():
    import argparse

    from lcmserve.server.config import ServerConfig, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert ServerConfig.load(parser.parse_args(["--vae", "preset:taesd"]), {}).vae == "preset:taesd"
    assert ServerConfig.load(parser.parse_args([]), {"LCMSERVE_VAE": "/models/taesd"}).vae == "/models/taesd"
    assert ServerConfig.load(parser.parse_args([]), {}).vae is None


def test_preview_decoder_decodes_the_previews_and_leaves_the_images_alone():
    """--preview-vae: the per-step previews come from the tiny decoder, the final images from the model's VAE."""
    from lcmserve.engine.request import GenerationRequest
    from lcmserve.server.app import build_client
    from lcmserve.server.config import ServerConfig
    from lcmserve.server.metrics import ServerMetrics

    config = ServerConfig(model="preset:tiny-sd", device="cpu", dtype="float32", warmup_steps=(),
                          max_queue_delay_ms=0, grpc_port=0, backend="torch", attention="sdpa")
    plain = build_client(config, ServerMetrics())
    metrics = ServerMetrics()
    tiny = build_client(ServerConfig(**{**config.__dict__, "preview_vae": "preset:tiny-taesd"}), metrics)
    assert 'vae="AutoencoderKL"' in metrics.render()[0].decode()  # the model's decoder, on /metrics
    assert plain.preview_decoder is None and isinstance(tiny.preview_decoder, AutoencoderTiny)
    assert tiny.preview_decoder.device == tiny.sampler.model.device
    results = {}
    for name, client in (("plain", plain), ("tiny", tiny)):
        events = []
        client.start(())
        try:
            results[name] = client.submit(GenerationRequest("a cat", steps=2, seed=3), on_step=events.append,
                                          previews=True).result(60), events
        finally:
            client.close(0)
    (plain_gen, plain_events), (tiny_gen, tiny_events) = results["plain"], results["tiny"]
    torch.testing.assert_close(tiny_gen.images[0], plain_gen.images[0], rtol=0, atol=0)  # same final image
    # the plain server's last preview is its final image; the tiny one's is TAESD's decode of the same latents
    torch.testing.assert_close(plain_events[-1].previews[0], plain_gen.images[0], rtol=0, atol=1e-4)
    assert tiny_events[-1].previews[0].shape == tiny_gen.images[0].shape
    assert (tiny_events[-1].previews[0] - tiny_gen.images[0]).abs().mean() > 1e-2
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = (build_preset_vae("preset:tiny-taesd").decode(latents).sample[0] / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(tiny.decode_previews(latents)[0], expected, rtol=0, atol=1e-5)


def test_preview_decoder_errors_name_the_setting():
    from lcmserve.server.app import build_client
    from lcmserve.server.config import ServerConfig
    from lcmserve.server.metrics import ServerMetrics

    config = ServerConfig(model="preset:tiny-sd", device="cpu", warmup_steps=(), grpc_port=0, preview_vae="preset:taesd",
                          backend="torch")
    with pytest.raises(ModelLoadError, match="preview_vae: 'preset:taesd' upsamples latents 8x") as info:
        build_client(config, ServerMetrics())
    assert info.value.param == "preview_vae"
