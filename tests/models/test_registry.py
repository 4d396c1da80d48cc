"""Bundled names and data sources reach the generic layers through the registry, not an import."""

from pathlib import Path

import pytest

from lcmserve.errors import ModelLoadError
from lcmserve.models import load_model, registry


@pytest.fixture
def clean_registry(monkeypatch):
    """A registry of its own for the test, so that planted names do not leak into other tests."""
    registry.load_plugins()  # into the shared registry first: a copy they filled would go with the test
    monkeypatch.setattr(registry, "_bundled", {kind: dict(names) for kind, names in registry._bundled.items()})
    monkeypatch.setattr(registry, "_data_sources", dict(registry._data_sources))
    monkeypatch.setattr(registry, "_prompt_guides", dict(registry._prompt_guides))
    monkeypatch.setattr(registry, "_served_adapters", {k: dict(v) for k, v in registry._served_adapters.items()})


def test_a_registered_name_loads_its_folder_and_others_pass_through(clean_registry, lcm_sd_dir, tmp_path):
    asked = []

    def locate(param: str) -> Path:
        asked.append(param)
        return lcm_sd_dir

    registry.register_bundled("tiny-bundled-lcm", locate)
    assert "tiny-bundled-lcm" in registry.bundled_names()
    model = load_model("tiny-bundled-lcm", device="cpu", dtype="float32")
    assert model.family == "sd" and asked == ["model"]
    assert registry.resolve_bundled("someone/some-lcm") == "someone/some-lcm"
    assert registry.resolve_bundled("tiny-bundled-lcm", kind="lora") == "tiny-bundled-lcm"  # a model, not a LoRA


def test_a_missing_bundled_folder_is_the_plug_ins_error(clean_registry):
    def locate(param: str) -> Path:
        raise ModelLoadError(f"{param}: the bundled thing is not in this installation", param=param)

    registry.register_bundled("not-shipped-lora", locate, kind="lora")
    with pytest.raises(ModelLoadError, match="lora: the bundled thing") as err:
        registry.resolve_bundled("not-shipped-lora", kind="lora", param="lora")
    assert err.value.param == "lora"
    with pytest.raises(ValueError, match="kind"):
        registry.register_bundled("x", locate, kind="vae")


def test_data_sources_by_name(clean_registry):
    registry.register_data_source("fake-data", lambda seed, n: ("fake", seed, n))
    assert registry.data_source("fake-data")(3, 4) == ("fake", 3, 4)
    assert registry.data_source("no-such-data") is None and "fake-data" in registry.data_source_names()


def test_a_bundled_model_describes_its_prompts(clean_registry):
    """The playground's model card and example prompts come from the registry; the bundled shapes models fill it."""
    from lcmserve.shapes.plugin import EXAMPLES

    guide = registry.PromptGuide("captions of one thing", ("a thing",))
    registry.register_prompt_guide("tiny-bundled-lcm", guide)
    assert registry.prompt_guide("tiny-bundled-lcm") is guide and registry.prompt_guide("someone/some-lcm") is None
    shapes = registry.prompt_guide("shapes-lcm")
    assert shapes is not None and registry.prompt_guide("shapes-teacher") is shapes
    assert set(shapes.examples) <= set(EXAMPLES)  # each with what it states (tests/shapes/test_examples.py)


def test_a_bundled_model_names_the_adapters_served_beside_it(clean_registry, lcm_sd_dir, tmp_path, caplog):
    """A server of a bundled model holds its bundled adapters unless told not to; --adapter of the same name wins,
    and a bundled adapter this installation lacks is a warning, not a server that does not start."""
    from conftest import make_lora
    from lcmserve.server.app import build_client
    from lcmserve.server.config import ServerConfig
    from lcmserve.server.metrics import ServerMetrics

    lora = make_lora(lcm_sd_dir, tmp_path / "style", seed=5)
    other = make_lora(lcm_sd_dir, tmp_path / "other", seed=6)
    registry.register_bundled("tiny-bundled-lcm", lambda param: lcm_sd_dir)
    registry.register_bundled("tiny-style", lambda param: lora, kind="lora")
    registry.register_served_adapter("tiny-bundled-lcm", "style", "tiny-style")
    assert registry.served_adapters("tiny-bundled-lcm") == {"style": "tiny-style"}
    assert registry.served_adapters("someone/some-lcm") == {}

    def served(*adapters: str, **env: str) -> list[dict]:
        config = ServerConfig.load({"adapters": list(adapters)}, {
            "LCMSERVE_MODEL": "tiny-bundled-lcm", "LCMSERVE_DEVICE": "cpu", "LCMSERVE_DTYPE": "float32",
            "LCMSERVE_BACKEND": "torch", "LCMSERVE_ATTENTION": "sdpa", **env})
        client = build_client(config, ServerMetrics())
        return [(a["name"], a["path"]) for a in client.describe_adapters()]

    assert served() == [("style", "tiny-style")]
    assert served(f"mine={other}") == [("mine", str(other)), ("style", "tiny-style")]
    assert served(f"style={other}") == [("style", str(other))]
    assert served(**{"LCMSERVE_BUNDLED_ADAPTERS": "false"}) == []

    def missing(param: str) -> Path:
        raise ModelLoadError(f"{param}: the bundled tiny-style is not in this installation", param=param)

    registry.register_bundled("tiny-style", missing, kind="lora")
    assert served() == [] and "bundled adapter style not loaded" in caplog.text
