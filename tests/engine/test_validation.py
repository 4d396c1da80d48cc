"""Bad input to the sampler: each error names its parameter and the allowed values."""

import logging
import math

import pytest

from lcmserve.engine import GenerationRequest, LCMSampler, Limits, Row
from lcmserve.engine.request import MAX_SEED
from lcmserve.errors import InvalidInputError
from lcmserve.models import load_model


@pytest.fixture(scope="module")
def sampler():
    return LCMSampler(load_model("preset:tiny-sd", device="cpu"))


BAD = [
    ("steps", 0, r"\[1, 8\]"),
    ("steps", 9, r"\[1, 8\]"),
    ("steps", 2.5, "integer"),
    ("steps", True, "integer"),
    ("width", 60, "multiple of 8"),
    ("width", 8, r"\[16, 128\]"),
    ("height", 4096, r"\[16, 128\]"),
    ("height", "64", "multiple of 8"),
    ("num_images", 0, r"\[1, 64\]"),
    ("num_images", 65, r"\[1, 64\]"),
    ("guidance_scale", -0.5, r"\[0, 50"),
    ("guidance_scale", math.nan, "finite"),
    ("guidance_scale", math.inf, "finite"),
    ("guidance_scale", "8", "number"),
    ("seed", -1, "integer"),
    ("seed", MAX_SEED + 1, "integer"),
    ("seed", 1.5, "integer"),
    ("prompt", None, "string"),
    ("prompt", "a\x00b", "NUL"),
    ("prompt", "a\ud800b", "lone surrogate"),
    ("negative_prompt", "\udc00", "lone surrogate"),
]


@pytest.mark.parametrize("field,value,allowed", BAD)
def test_bad_request_fields(sampler, field, value, allowed):
    request = GenerationRequest(**{"prompt": "a cat", field: value})
    with pytest.raises(InvalidInputError, match=allowed) as err:
        sampler.resolve(request)
    assert err.value.param == field
    assert str(err.value).startswith(field)
    if field not in ("prompt", "negative_prompt"):  # prompts are not echoed back whole
        assert repr(value) in str(err.value)


def test_seed_range_leaves_room_for_every_image(sampler):
    with pytest.raises(InvalidInputError, match="image i uses seed\\+i") as err:
        sampler.resolve(GenerationRequest("a cat", num_images=2, seed=MAX_SEED))
    assert err.value.param == "seed"


def test_defaults_are_filled(sampler):
    resolved = sampler.resolve(GenerationRequest("a cat"))
    assert (resolved.width, resolved.height) == (64, 64)
    assert isinstance(resolved.seed, int) and 0 <= resolved.seed < 2**31
    assert resolved.truncated is False


@pytest.fixture
def transformers_warnings():
    """transformers at its users' default verbosity (the test session runs it at "error")."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    hf_logging.enable_propagation()  # so that caplog sees its records
    yield
    hf_logging.disable_propagation()
    hf_logging.set_verbosity(level)


def test_long_prompt_is_truncated_with_a_warning(sampler, caplog, transformers_warnings):
    prompt = "a red circle " * 60
    for tokenizer in sampler.model.tokenizers:  # transformers warns once per tokenizer: make this test see it
        getattr(tokenizer, "deprecation_warnings", {}).clear()
    with caplog.at_level(logging.WARNING):
        assert sampler.resolve(GenerationRequest(prompt)).truncated
        result = sampler.run_rows([Row(prompt, 0, 8.0), Row("a cat", 1, 8.0)], 1, 64, 64)
    assert result.truncated == [True, False]
    assert any("over this model's limit of 77 tokens" in r.getMessage() for r in caplog.records)
    # Ours is the only warning: transformers' "will result in indexing errors" would mislead (we cut, not index).
    assert not any("indexing errors" in r.getMessage() for r in caplog.records)
    # The kept part is the prompt's first 75 tokens between the start and end tokens.
    (ids,), _ = sampler.tokenize([prompt])
    full = sampler.model.tokenizers[0](prompt, verbose=False).input_ids
    assert ids.shape == (1, 77)
    assert ids[0, :76].tolist() == full[:76] and ids[0, 76] == sampler.model.tokenizers[0].eos_token_id


def test_bad_rows_for_the_batcher(sampler):
    with pytest.raises(InvalidInputError, match="at least one row"):
        sampler.run_rows([], 4, 64, 64)
    with pytest.raises(InvalidInputError) as err:
        sampler.run_rows([Row("a", 0, 8.0), Row("b", 1, -2.0)], 4, 64, 64)
    assert err.value.param == "guidance_scale"
    with pytest.raises(InvalidInputError) as err:
        sampler.run_rows([Row("a", -5, 8.0)], 4, 64, 64)
    assert err.value.param == "seed"


def test_limits_follow_native_size():
    assert Limits.for_native_size(512) == Limits(min_size=128, max_size=1024)
    assert Limits.for_native_size(1024).max_size == 2048
    with pytest.raises(ValueError, match="min_size"):
        Limits(min_size=256, max_size=128)
