"""The backend factory, bf16 parity, the TensorRT backend's pure logic (with a fake TensorRT) and the CLI."""

import importlib.util
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

from lcmserve.cli import main
from lcmserve.engine import LCMSampler, Row
from lcmserve.engine.backends import (
    BucketSet,
    CudaGraphBackend,
    CudaGraphConfig,
    TorchBackend,
    create_backend,
)
from lcmserve.engine.backends import tensorrt as trt_mod
from lcmserve.errors import EngineError, InvalidInputError
from lcmserve.models import load_model

ROWS = [Row("a red circle", 1, 8.0), Row("a cat", 2, 1.0)]
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def tiny():
    return load_model("preset:tiny-sd", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def tiny_bf16():
    return load_model("preset:tiny-sd", device="cpu", dtype="bfloat16")


def test_factory_names_and_errors(tiny):
    assert isinstance(create_backend("torch", tiny), TorchBackend)
    with pytest.raises(InvalidInputError,
                       match="backend must be one of auto, torch, compiled, cuda-graph, onnx, tensorrt; got 'tvm'"):
        create_backend("tvm", tiny)
    if not torch.cuda.is_available():
        for name in ("cuda-graph", "tensorrt"):
            with pytest.raises(InvalidInputError, match="needs the model on a CUDA GPU") as info:
                create_backend(name, tiny, buckets=BucketSet((1,), (2,), ((32, 32),)))
            assert info.value.param == "backend"


def test_bfloat16_eager_is_within_bf16_tolerance_of_float32(tiny, tiny_bf16):
    reference = LCMSampler(tiny).run_rows(ROWS, 2, 32, 32).images
    got = LCMSampler(tiny_bf16).run_rows(ROWS, 2, 32, 32).images
    assert got.dtype == torch.float32
    err = (got - reference).abs()
    assert err.max() < 3e-2 and err.mean() < 5e-3, (err.max(), err.mean())


def test_static_graph_program_in_bfloat16_matches_eager_bfloat16(tiny_bf16):
    backend = CudaGraphBackend(tiny_bf16, CudaGraphConfig(BucketSet((2,), (2,), ((32, 32),)), capture=False))
    expected = LCMSampler(tiny_bf16).run_rows(ROWS, 2, 32, 32).images
    got = LCMSampler(tiny_bf16, backend=backend).run_rows(ROWS, 2, 32, 32).images
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-2)


# -- TensorRT: pure logic -----------------------------------------------------------------------
def test_tensorrt_is_imported_lazily_with_an_install_hint():
    if HAS_TRT:
        pytest.skip("TensorRT is installed")
    with pytest.raises(InvalidInputError, match=r"needs TensorRT; install TensorRT 10 .*lcmserve\[tensorrt\]"):
        trt_mod.import_tensorrt()
    with pytest.raises(InvalidInputError, match="TensorRT 8.5.1 is too old"):
        trt_mod.check_version("8.5.1")
    assert trt_mod.check_version("10.3.0") == (10, 3)


def test_tensorrt_config_checks():
    for kwargs, param in [({"workspace_gb": 0}, "workspace_gb"), ({"optimization_level": 6}, "optimization_level"),
                          ({"buckets": (1, 2)}, "buckets")]:
        with pytest.raises(InvalidInputError) as info:
            trt_mod.TensorRTConfig(**kwargs)
        assert info.value.param == param


def test_profiles_follow_the_buckets():
    buckets = BucketSet((2, 8, 4), (4,), ((64, 64),))
    assert trt_mod.graph_batch_sizes("text_encoder", buckets, "embedding") == (1, 2, 4, 8)
    assert trt_mod.graph_batch_sizes("unet", buckets, "embedding") == (2, 4, 8)
    assert trt_mod.graph_batch_sizes("unet", buckets, "cfg") == (2, 4, 8, 16)  # unguided and guided batches
    assert trt_mod.graph_batch_sizes("vae_decoder", buckets, "cfg") == (2, 4, 8)
    profiles = trt_mod.engine_profiles({"sample": (4, 8, 8), "timestep": ()}, (1, 4))
    assert profiles == [
        {"sample": ((1, 4, 8, 8),) * 3, "timestep": ((1,),) * 3},
        {"sample": ((4, 4, 8, 8),) * 3, "timestep": ((4,),) * 3},
    ]
    table = trt_mod.ProfileTable("unet", (2, 4, 8))
    assert [table.index(b) for b in (2, 4, 8)] == [0, 1, 2]
    with pytest.raises(InvalidInputError, match=r"batch_size must be one of the batch sizes the unet engine was built "
                                                r"for \[2, 4, 8\].*got 16") as info:
        table.index(16)
    assert info.value.param == "batch_size"


def test_engine_cache_key_covers_model_version_gpu_and_profile():
    from lcmserve.engine.cache import cache_key

    config = trt_mod.TensorRTConfig()
    profiles = trt_mod.engine_profiles({"sample": (4, 8, 8)}, (1, 2))
    base = trt_mod.engine_spec("unet", "onnx-key", "10.3.0", "NVIDIA H100 sm_90", profiles, config)
    variants = [
        trt_mod.engine_spec("unet", "other-weights", "10.3.0", "NVIDIA H100 sm_90", profiles, config),
        trt_mod.engine_spec("unet", "onnx-key", "10.4.0", "NVIDIA H100 sm_90", profiles, config),
        trt_mod.engine_spec("unet", "onnx-key", "10.3.0", "NVIDIA A100 sm_80", profiles, config),
        trt_mod.engine_spec("unet", "onnx-key", "10.3.0", "NVIDIA H100 sm_90", profiles[:1], config),
    ]
    keys = {cache_key(s) for s in [base, *variants]}
    assert len(keys) == 5
    assert cache_key(base) == cache_key(trt_mod.engine_spec("unet", "onnx-key", "10.3.0", "NVIDIA H100 sm_90",
                                                            profiles, config))


def _fake_trt(parse_ok=True, build_ok=True):
    """Just enough of the TensorRT Python API to check what build_engine asks of it."""
    calls = []

    class Parser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls.append(("parse", path))
            return parse_ok

        def get_error(self, i):
            return "Unsupported operator Foo"

    class Profile:
        def set_shape(self, name, low, opt, high):
            calls.append(("shape", name, low, opt, high))

    class Config:
        builder_optimization_level = None

        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", size))

        def set_flag(self, flag):
            calls.append(("flag", flag))

        def add_optimization_profile(self, profile):
            calls.append(("profile",))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("network", flags))

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"engine-bytes" if build_ok else None

    trt = types.SimpleNamespace(
        __version__="10.3.0", Logger=type("Logger", (), {"WARNING": 1, "__init__": lambda self, level: None}),
        Builder=Builder, OnnxParser=Parser, MemoryPoolType=types.SimpleNamespace(WORKSPACE="ws"),
        BuilderFlag=types.SimpleNamespace(FP16="fp16"), NetworkDefinitionCreationFlag=None,
    )
    return trt, calls


def test_build_engine_asks_tensorrt_for_fp16_and_one_profile_per_bucket(tmp_path):
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"graph")
    trt, calls = _fake_trt()
    profiles = trt_mod.engine_profiles({"sample": (4, 8, 8)}, (1, 2))
    config = trt_mod.TensorRTConfig(workspace_gb=2)
    trt_mod.build_engine(trt, onnx_file, profiles, config, tmp_path / "model.plan")
    assert (tmp_path / "model.plan").read_bytes() == b"engine-bytes"
    assert ("network", 0) in calls and ("flag", "fp16") in calls and ("workspace", 2 << 30) in calls
    assert [c for c in calls if c[0] == "shape"] == [
        ("shape", "sample", (1, 4, 8, 8), (1, 4, 8, 8), (1, 4, 8, 8)),
        ("shape", "sample", (2, 4, 8, 8), (2, 4, 8, 8), (2, 4, 8, 8)),
    ]
    assert calls.count(("profile",)) == 2
    bad, _ = _fake_trt(parse_ok=False)
    with pytest.raises(EngineError, match="could not parse .*Unsupported operator Foo"):
        trt_mod.build_engine(bad, onnx_file, profiles, config, tmp_path / "x.plan")
    failing, _ = _fake_trt(build_ok=False)
    with pytest.raises(EngineError, match="building the engine .* failed"):
        trt_mod.build_engine(failing, onnx_file, profiles, config, tmp_path / "y.plan")
    with pytest.raises(InvalidInputError, match="ONNX file .*missing.onnx does not exist") as info:
        trt_mod.build_engine(trt, tmp_path / "missing.onnx", profiles, config, tmp_path / "z.plan")
    assert info.value.param == "cache_dir"


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRT and torch.cuda.is_available()), reason="needs TensorRT and a CUDA GPU")
def test_tensorrt_matches_eager_on_gpu(tmp_path):
    model = load_model("preset:tiny-sd", device="cuda", dtype="float16")
    backend = trt_mod.TensorRTBackend(model, trt_mod.TensorRTConfig(BucketSet((1, 2), (2,), ((64, 64),))), tmp_path)
    expected = LCMSampler(model).run_rows(ROWS, 2, 64, 64).images
    got = LCMSampler(model, backend=backend).run_rows(ROWS, 2, 64, 64).images
    torch.testing.assert_close(got, expected, rtol=0, atol=3e-2)
    with pytest.raises(InvalidInputError, match="batch_size must be in \\[1, 2\\]"):
        LCMSampler(model, backend=backend).run_rows(ROWS * 2, 2, 64, 64)


# -- the CLI -----------------------------------------------------------------------------
def test_cli_export_then_generate_with_onnx_matches_torch(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    cache = tmp_path / "cache"
    assert main(["export", "preset:tiny-sd", "--out", str(cache), "--height", "32", "--width", "32",
                 "--exporter", "legacy", "--device", "cpu"]) == 0
    index = json.loads((cache / "export.json").read_text())
    assert set(index["graphs"]) == {"text_encoder", "unet", "vae_decoder"}
    assert all((cache / rel).is_file() for rel in index["graphs"].values())
    out = {}
    for backend in ("torch", "onnx"):
        args = ["generate", "a cat", "--seed", "3", "-n", "2", "--width", "32", "--height", "32", "--steps", "2",
                "-o", str(tmp_path / backend), "-q", "--backend", backend, "--cache-dir", str(cache), "--device", "cpu",
                "--exporter", "legacy"]
        assert main(args) == 0
        out[backend] = [np.asarray(Image.open(tmp_path / backend / f"00{i}-seed{3 + i}.png"), dtype=np.int16)
                        for i in range(2)]
    for a, b in zip(out["torch"], out["onnx"]):
        assert np.abs(a - b).max() <= 1  # 8-bit rounding of float32 images ~1e-6 apart
    capsys.readouterr()
    code = main(["generate", "a cat", "-q", "--backend", "cuda-graph", "--device", "cpu", "-o", str(tmp_path / "g")])
    assert code == 2
    assert "cuda-graph captures CUDA graphs and needs the model on a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
