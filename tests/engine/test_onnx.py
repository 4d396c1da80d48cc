"""ONNX export and the ONNX Runtime backend: parity with eager, a cache that is never stale, clear errors."""

import logging
import shutil

import pytest
import torch

from lcmserve.engine import LCMSampler, Row
from lcmserve.engine import export as export_mod
from lcmserve.engine.backends.onnx import OnnxBackend, OrtGraph
from lcmserve.engine.cache import MANIFEST, ArtifactCache, default_cache_dir
from lcmserve.engine.export import export_model, graph_names
from lcmserve.errors import InvalidInputError
from lcmserve.models import load_model

pytest.importorskip("onnxruntime")

ROWS = [Row("a red circle", 1, 8.0), Row("a cat", 2, 1.0), Row("blue square", 3, 3.5)]
SIZE = 32
TOL = 1e-4  # float32 graphs through ONNX Runtime's CPU kernels


@pytest.fixture(scope="module")
def tiny():
    return load_model("preset:tiny-sd", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    cache = tmp_path_factory.mktemp("onnx-cache")
    return cache, export_model(tiny, cache, SIZE, SIZE, exporter="legacy")


def _images(model, backend, rows=ROWS, steps=2):
    return LCMSampler(model, backend=backend).run_rows(rows, steps, SIZE, SIZE).images


def test_onnx_runtime_matches_eager(tiny, exported):
    cache, paths = exported
    assert set(paths) == {"text_encoder", "unet", "vae_decoder"}
    backend = OnnxBackend(tiny, cache, exporter="legacy", build=False)
    expected = _images(tiny, None)
    torch.testing.assert_close(_images(tiny, backend), expected, rtol=0, atol=TOL)
    # dynamic batch axis: one row alone through the same graphs gives the same image
    torch.testing.assert_close(_images(tiny, backend, ROWS[1:2]), expected[1:2], rtol=0, atol=TOL)


def test_graphs_have_a_dynamic_batch_axis_and_the_guidance_input(exported):
    import onnx

    _, paths = exported
    graph = onnx.load(str(paths["unet"]), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert set(inputs) == {"sample", "timestep", "encoder_hidden_states", "timestep_cond"}
    assert all(isinstance(dims[0], str) for dims in inputs.values())  # symbolic batch
    assert inputs["sample"][1:] == [4, SIZE // 2, SIZE // 2]


def _counting_export(monkeypatch):
    """Replace the (slow) exporter by one that writes a small file and records what it built."""
    built = []

    def fake(model, name, height, width, path, exporter, opset):
        built.append((name, height, width))
        path.write_bytes(b"fake graph " + name.encode())

    monkeypatch.setattr(export_mod, "export_graph", fake)
    return built


def test_cache_rebuilds_exactly_what_changed(tmp_path, monkeypatch):
    model = load_model("preset:tiny-sd", device="cpu", dtype="float32")
    built = _counting_export(monkeypatch)
    export_model(model, tmp_path, SIZE, SIZE)
    assert sorted(n for n, _, _ in built) == sorted(graph_names(model))
    built.clear()
    export_model(model, tmp_path, SIZE, SIZE)
    assert built == []  # all hits
    # a new resolution: new UNet and VAE graphs, the text encoder is shared
    export_model(model, tmp_path, 2 * SIZE, SIZE)
    assert sorted(built) == [("unet", 2 * SIZE, SIZE), ("vae_decoder", 2 * SIZE, SIZE)]
    built.clear()
    # changed weights: only that module's graph
    with torch.no_grad():
        next(model.unet.parameters()).add_(1e-3)
    export_model(model, tmp_path, SIZE, SIZE)
    assert built == [("unet", SIZE, SIZE)]
    built.clear()
    # another exporter or another library version: everything
    export_model(model, tmp_path, SIZE, SIZE, exporter="legacy")
    assert len(built) == 3
    built.clear()
    real_versions = export_mod.library_versions
    monkeypatch.setattr(export_mod, "library_versions", lambda names: {**real_versions(names), "torch": "99.0"})
    export_model(model, tmp_path, SIZE, SIZE, exporter="legacy")
    assert len(built) == 3


def test_cache_key_follows_dtype(tmp_path, monkeypatch):
    built = _counting_export(monkeypatch)
    model = load_model("preset:tiny-sd", device="cpu", dtype="float32")
    export_model(model, tmp_path, SIZE, SIZE)
    built.clear()
    model.vae.to(torch.bfloat16)
    export_model(model, tmp_path, SIZE, SIZE)
    assert built == [("vae_decoder", SIZE, SIZE)]


def test_damaged_entries_are_rebuilt_with_a_warning(tmp_path, monkeypatch, caplog):
    built = _counting_export(monkeypatch)
    model = load_model("preset:tiny-sd", device="cpu", dtype="float32")
    paths = export_model(model, tmp_path, SIZE, SIZE)
    built.clear()
    unet = paths["unet"]
    unet.write_bytes(unet.read_bytes().replace(b"fake", b"FAKE"))  # same size, other bytes
    (paths["vae_decoder"].parent / MANIFEST).write_text("{ not json")
    with caplog.at_level(logging.WARNING, logger="lcmserve.engine.cache"):
        export_model(model, tmp_path, SIZE, SIZE)
    assert sorted(n for n, _, _ in built) == ["unet", "vae_decoder"]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "model.onnx does not match its checksum" in messages and "unreadable manifest" in messages
    assert ArtifactCache(tmp_path).check(paths["unet"].parent, {}, "onnx-unet") is not None  # spec mismatch noticed


def test_corrupted_real_graph_is_rebuilt_and_still_matches(tiny, exported, tmp_path, caplog):
    shutil.copytree(exported[0], tmp_path, dirs_exist_ok=True)
    folder = exported[1]["vae_decoder"].parent
    data = tmp_path / folder.name / "model.onnx"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="lcmserve.engine.cache"):
        backend = OnnxBackend(tiny, tmp_path, exporter="legacy")
        got = _images(tiny, backend, ROWS[:1])
    assert any("damaged" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(got, _images(tiny, None, ROWS[:1]), rtol=0, atol=TOL)


def test_a_failed_build_leaves_no_entry(tmp_path):
    cache = ArtifactCache(tmp_path)

    def broken(folder):
        (folder / "half.onnx").write_bytes(b"x")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="exporter crashed"):
        cache.get_or_build("onnx-unet", {"a": 1}, broken)
    assert list(tmp_path.iterdir()) == []


def test_cache_folder_follows_the_servers_variable(tmp_path, monkeypatch):
    # LCMSERVE_CACHE_DIR is also the server's `cache_dir` setting and the image's cache volume.
    monkeypatch.setenv("LCMSERVE_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LCMSERVE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lcmserve"


def test_missing_graphs_are_clear_errors(tiny, tmp_path):
    backend = OnnxBackend(tiny, tmp_path / "empty", build=False)
    with pytest.raises(InvalidInputError, match=r"no ONNX file of text_encoder .* at 32x32.*lcmserve export") as info:
        _images(tiny, backend)
    assert info.value.param == "cache_dir"
    with pytest.raises(InvalidInputError, match="does not exist"):
        OrtGraph(tmp_path / "nowhere.onnx", ["CPUExecutionProvider"])


def test_unsupported_dtype_on_cpu_is_a_clear_error():
    model = load_model("preset:tiny-sd", device="cpu", dtype="bfloat16")
    with pytest.raises(InvalidInputError, match="dtype must be float32 for the onnx backend on CPU; got 'bfloat16'"):
        OnnxBackend(model)
    with pytest.raises(InvalidInputError, match="exporter must be one of dynamo, legacy"):
        export_model(model, "unused", SIZE, SIZE, exporter="jit")


@pytest.mark.slow
def test_dynamo_exporter_matches_eager(tiny, tmp_path):
    backend = OnnxBackend(tiny, tmp_path, exporter="dynamo")
    torch.testing.assert_close(_images(tiny, backend, ROWS[:2]), _images(tiny, None, ROWS[:2]), rtol=0, atol=TOL)


def test_sessions_are_prepared_once_per_resolution(tiny, exported, monkeypatch):
    # Verifying the cache hashes every graph file: once per resolution, not once per request.
    cache, _ = exported
    backend = OnnxBackend(tiny, cache, exporter="legacy", build=False)
    calls = []
    real = backend.prepare
    monkeypatch.setattr(backend, "prepare", lambda h, w, progress=False: calls.append((h, w)) or real(h, w))
    first = _images(tiny, backend)
    second = _images(tiny, backend)
    assert calls == [(SIZE, SIZE)]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    graph = next(iter(backend._graphs.values()))
    assert graph.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_classifier_free_guidance_and_negative_prompts_through_onnx(tmp_path):
    """A base model (LCM-LoRA style): the UNet graph takes the doubled CFG batch, the text graph the negatives."""
    from lcmserve.models.loading import _to_lcm_model
    from lcmserve.models.presets import build_preset_pipeline

    model = _to_lcm_model(build_preset_pipeline("tiny-sd", lcm=False, seed=2), "tiny-base", None, torch.device("cpu"))
    assert model.guidance_mode == "cfg"
    export_model(model, tmp_path, SIZE, SIZE, exporter="legacy")
    backend = OnnxBackend(model, tmp_path, exporter="legacy", build=False)
    rows = [Row("a red circle", 1, 8.0, "a dog"), Row("a cat", 2, 1.0), Row("blue square", 3, 3.5)]
    torch.testing.assert_close(_images(model, backend, rows), _images(model, None, rows), rtol=0, atol=TOL)
