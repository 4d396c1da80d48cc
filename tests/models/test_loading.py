"""Loading diffusers folders, LCM-LoRA and swapped UNets; every bad folder gets its clear error."""

import json
import shutil

import pytest
import torch

from lcmserve.errors import InvalidInputError, ModelLoadError
from lcmserve.models import load_model, resolve_device_dtype


def test_sd_lcm_folder(lcm_sd_dir):
    model = load_model(str(lcm_sd_dir), device="cpu")
    assert model.family == "sd"
    assert model.guidance_mode == "embedding"
    assert model.unet.config.time_cond_proj_dim == 32
    assert model.native_size == 64 and model.vae_scale_factor == 2
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert not any(p.requires_grad for p in model.unet.parameters())


def test_sdxl_lcm_folder(lcm_sdxl_dir):
    model = load_model(str(lcm_sdxl_dir), device="cpu")
    assert model.family == "sdxl"
    assert len(model.text_encoders) == 2 and len(model.tokenizers) == 2
    assert model.unet.config.addition_embed_type == "text_time"
    assert model.guidance_mode == "embedding"


def test_base_plus_lora_is_fused(base_sd_dir, lora_sd_dir):
    model = load_model(str(base_sd_dir), lora=str(lora_sd_dir), device="cpu")
    assert model.guidance_mode == "cfg" and model.lora == str(lora_sd_dir)
    # Fused: plain modules again, no peft wrappers left behind.
    names = {type(m).__name__ for m in model.unet.modules()}
    assert not any("Lora" in n for n in names), names
    base = load_model(str(base_sd_dir), lora=str(lora_sd_dir), lora_scale=0.0, device="cpu")
    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(model.unet.state_dict()[q], base.unet.state_dict()[q])


def test_v_prediction_is_read_from_scheduler(lcm_sd_v_dir):
    assert load_model(str(lcm_sd_v_dir), device="cpu").schedule.prediction_type == "v_prediction"


def test_lcm_unet_swapped_into_base(base_sd_dir, lcm_sd_dir):
    model = load_model(str(base_sd_dir), unet=str(lcm_sd_dir), device="cpu")
    assert model.guidance_mode == "embedding"
    only_unet = load_model(str(base_sd_dir), unet=str(lcm_sd_dir / "unet"), device="cpu")
    assert only_unet.unet.config.time_cond_proj_dim == 32


def test_bf16_load(lcm_sd_dir):
    model = load_model(str(lcm_sd_dir), device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_missing_folder():
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_model("/no/such/folder", device="cpu")
    assert err.value.param == "model"


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline .no model_index.json"):
        load_model(str(tmp_path), device="cpu")


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(str(f), device="cpu")


def test_broken_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(str(tmp_path), device="cpu")


def test_pipeline_without_unet(tmp_path, lcm_sd_dir):
    shutil.copytree(lcm_sd_dir, tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    del index["unet"]
    (tmp_path / "m" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="lacks unet"):
        load_model(str(tmp_path / "m"), device="cpu")


def test_corrupt_weights(tmp_path, lcm_sd_dir):
    shutil.copytree(lcm_sd_dir, tmp_path / "m")
    for f in (tmp_path / "m" / "unet").glob("*.safetensors"):
        f.write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="could not load folder"):
        load_model(str(tmp_path / "m"), device="cpu")


def test_non_lcm_without_lora(base_sd_dir):
    with pytest.raises(ModelLoadError, match="not an LCM.*--lora") as err:
        load_model(str(base_sd_dir), device="cpu")
    assert err.value.param == "model"


def test_missing_lora(base_sd_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="lora") as err:
        load_model(str(base_sd_dir), lora=str(tmp_path / "nope"), device="cpu")
    assert err.value.param == "lora"


def test_a_bundled_lora_name_missing_from_the_installation_names_lora(base_sd_dir, tmp_path, monkeypatch):
    from lcmserve.shapes import bundle

    monkeypatch.setattr(bundle, "weights_dir", lambda: tmp_path)  # an installation without the shapes weights
    with pytest.raises(ModelLoadError, match="lora: the bundled shapes-lcm-lora is not in this installation") as err:
        load_model(str(base_sd_dir), lora="shapes-lcm-lora", device="cpu")
    assert err.value.param == "lora"


def test_missing_unet_folder(base_sd_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="holds no UNet") as err:
        load_model(str(base_sd_dir), unet=str(tmp_path), device="cpu")
    assert err.value.param == "unet"


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not a local folder and could not be loaded from the Hugging Face Hub"):
        load_model("someone/some-lcm", device="cpu")


def test_unknown_preset():
    with pytest.raises(ModelLoadError, match="unknown preset.*preset:sd15"):
        load_model("preset:sd99", device="cpu")


@pytest.mark.parametrize(
    "device,dtype,match",
    [("tpu", "auto", "device"), ("cpu", "float16", "float16 is not supported on CPU"), ("cpu", "int8", "dtype")],
)
def test_bad_device_or_dtype(device, dtype, match):
    with pytest.raises(InvalidInputError, match=match):
        resolve_device_dtype(device, dtype)


def test_cuda_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(InvalidInputError, match="no CUDA GPU"):
        resolve_device_dtype("cuda", "auto")


def test_saved_lcm_loads_in_diffusers_own_pipeline(lcm_sd_dir):
    """Our folders are plain diffusers: its own pipeline class loads them."""
    from diffusers import DiffusionPipeline, LatentConsistencyModelPipeline

    pipe = DiffusionPipeline.from_pretrained(lcm_sd_dir, safety_checker=None, feature_extractor=None)
    assert isinstance(pipe, LatentConsistencyModelPipeline)


def test_bfloat16_on_a_cpu_without_its_instructions_warns(monkeypatch, caplog):
    import platform

    from lcmserve.models.loading import cpu_has_bfloat16, resolve_device_dtype

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    for avx512_bf16, amx, native in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert cpu_has_bfloat16() is native
        caplog.clear()
        assert resolve_device_dtype("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
        assert ("no bfloat16 instructions" in caplog.text) is (not native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    caplog.clear()
    resolve_device_dtype("cpu", "float32")  # float32 is not warned about on any CPU
    assert caplog.text == ""
