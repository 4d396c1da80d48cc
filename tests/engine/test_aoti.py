"""The compiled backend's AOTInductor packages: built once into the cache, loaded at the next start, checked."""

import logging
import shutil

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from lcmserve.engine import LCMSampler, Row
from lcmserve.engine.backends import BucketSet, aoti, create_backend
from lcmserve.engine.backends.aoti import PackageStats
from lcmserve.engine.kernels.group_norm import for_inductor_export, use_group_norm_kernel
from lcmserve.models import load_model

# Each test builds or loads a backend of the tiny model; the module's fixture compiles three packages.
pytestmark = pytest.mark.slow

ROWS = [Row("a red circle", 1, 8.0), Row("a cat", 2, 1.0)]
BUCKETS = BucketSet((2,), (2,), ((32, 32),))
NETWORKS = 3  # text encoder, UNet, VAE decode: one input shape each in a single bucket


@pytest.fixture(scope="module")
def tiny():
    model = load_model("preset:tiny-sd", device="cpu", dtype="float32")
    yield model
    model.unet.set_attn_processor(AttnProcessor2_0())


def backend(model, cache):
    return create_backend("compiled", model, buckets=BUCKETS, cache_dir=cache, attention="small-head")


def images(model, backend=None, rows=ROWS):
    return LCMSampler(model, backend=backend).run_rows(rows, 2, 32, 32).images


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    cache = tmp_path_factory.mktemp("aoti-cache")
    return cache, backend(tiny, cache)


def packages(cache, network="*"):
    return sorted((cache / "aoti").glob(f"aoti-{network}-*/network.pt2"))


def test_packages_are_built_at_warm_up_and_match_eager(tiny, built):
    cache, first = built
    assert first.package_stats == PackageStats(built=NETWORKS)
    assert len(packages(cache)) == NETWORKS
    with torch.profiler.profile() as prof:
        got = images(tiny, first)
    torch.testing.assert_close(got, images(tiny), rtol=0, atol=1e-4)
    ops = {e.key for e in prof.key_averages()}
    # our kernels survive torch.export and AOTInductor as operators the package calls
    assert {"lcmserve::small_head_attention", "lcmserve::group_norm_stats"} <= ops


def test_a_second_backend_loads_the_packages_without_compiling(tiny, built, monkeypatch):
    from torch._dynamo.utils import counters

    cache, first = built

    def no_build(*args, **kwargs):
        raise AssertionError("a package was compiled at the second start")

    monkeypatch.setattr(aoti, "aoti_compile_and_package", no_build)
    frames = counters["frames"]["ok"]
    second = backend(tiny, cache)
    assert second.package_stats == PackageStats(loaded=NETWORKS)  # a build would have counted as a fallback
    assert counters["frames"]["ok"] == frames  # nor did torch.compile run
    for rows in (ROWS, ROWS[:1]):
        torch.testing.assert_close(images(tiny, second, rows), images(tiny, first, rows), rtol=0, atol=0)


def test_a_damaged_package_is_detected_and_rebuilt(tiny, built, caplog):
    cache, first = built
    (package,) = packages(cache, "vae-decode")
    data = bytearray(package.read_bytes())
    data[len(data) // 2] ^= 0xFF
    package.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="lcmserve.engine.cache"):
        again = backend(tiny, cache)
    assert "does not match its checksum" in caplog.text and "vae-decode" in caplog.text
    assert again.package_stats == PackageStats(loaded=NETWORKS - 1, built=1)
    assert package.read_bytes() != bytes(data)
    torch.testing.assert_close(images(tiny, again), images(tiny, first), rtol=0, atol=1e-4)


def test_a_network_without_a_package_falls_back_to_torch_compile(tiny, built, monkeypatch, caplog):
    cache, first = built
    shutil.rmtree(packages(cache, "vae-decode")[0].parent)

    def fails(*args, **kwargs):
        raise RuntimeError("this network does not export")

    monkeypatch.setattr(aoti, "aoti_compile_and_package", fails)
    try:
        with caplog.at_level(logging.WARNING, logger="lcmserve.engine.backends.aoti"):
            fallback = backend(tiny, cache)
        assert fallback.package_stats == PackageStats(loaded=NETWORKS - 1, fallbacks=1)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "vae-decode" in warnings[0] and "does not export" in warnings[0]
        assert "torch.compile" in warnings[0]
        torch.testing.assert_close(images(tiny, fallback), images(tiny), rtol=0, atol=1e-4)
        assert len(packages(cache, "vae-decode")) == 0  # nothing half-built left behind
    finally:
        torch._dynamo.reset()


def test_the_package_key_covers_weights_attention_and_shapes(tiny):
    from lcmserve.engine.backends.aoti import DecodeExport, module_form, signature

    twin = load_model("preset:tiny-sd", device="cpu", dtype="float32")
    before = module_form(twin.vae)
    use_group_norm_kernel(twin.vae)
    assert module_form(twin.vae) != before  # our group norm changes the graph without touching a weight
    assert signature((torch.zeros(2, 4, 16, 16),)) != signature((torch.zeros(1, 4, 16, 16),))
    assert signature((torch.zeros(2, 4),)) != signature((torch.zeros(2, 4, dtype=torch.bfloat16),))
    with for_inductor_export(), torch.no_grad():  # under it the exporter keeps our group norm for inductor
        program = torch.export.export(DecodeExport(twin.vae), (torch.zeros(1, 4, 16, 16),))
    assert any("group_norm_stats" in str(node.target) for node in program.graph.nodes)
