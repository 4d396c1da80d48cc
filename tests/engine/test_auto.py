"""backend auto: the rule table on faked machines, the user's choices winning, the factory, the CLI and the docs."""

import json
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from lcmserve.cli import main
from lcmserve.engine import LCMSampler, Row
from lcmserve.engine.backends import BACKEND_CHOICES, BACKENDS, BucketSet, auto, create_backend
from lcmserve.engine.backends.auto import RULES, Machine, choose_backend, head_dims, read_unet_config
from lcmserve.errors import InvalidInputError
from lcmserve.models import load_model

CPU, GPU = torch.device("cpu"), torch.device("cuda")
AMX = Machine("cpu", cpu_bfloat16=True, cpu_vectors="AVX512", compiler=True, onnx=True)
AVX512 = Machine("cpu", cpu_bfloat16=False, cpu_vectors="AVX512", compiler=True, onnx=True)
AVX2 = Machine("cpu", cpu_bfloat16=False, cpu_vectors="AVX2", compiler=True, onnx=True)
AVX2_NO_ONNX = Machine("cpu", cpu_bfloat16=False, cpu_vectors="AVX2", compiler=True, onnx=False)
NO_COMPILER = Machine("cpu", cpu_bfloat16=False, cpu_vectors="AVX2", compiler=False, onnx=False)
BF16_NO_COMPILER = Machine("cpu", cpu_bfloat16=True, cpu_vectors="AVX512", compiler=False, onnx=False)
CUDA = Machine("cuda")
SMALL = read_unet_config("preset:tiny-sd")  # heads of 8 channels: the small-head kernel takes them
LARGE = read_unet_config("preset:sd15")  # heads of 40-160 channels
ROWS = [Row("a red circle", 1, 8.0), Row("a cat", 2, 1.0)]


def pick(config, machine, device=CPU, **kwargs):
    choice = choose_backend(config, device, machine=machine, **kwargs)
    return choice.backend, choice.dtype, choice.attention


@pytest.mark.parametrize(("config", "machine", "device", "expected"), [
    (SMALL, CUDA, GPU, ("cuda-graph", "float16", "sdpa")),
    (LARGE, CUDA, GPU, ("cuda-graph", "float16", "sdpa")),
    (SMALL, AMX, CPU, ("compiled", "bfloat16", "small-head")),
    (LARGE, AMX, CPU, ("compiled", "bfloat16", "sdpa")),
    (SMALL, AVX2, CPU, ("onnx", "float32", "sdpa")),
    (LARGE, AVX2, CPU, ("onnx", "float32", "sdpa")),
    (SMALL, AVX2_NO_ONNX, CPU, ("compiled", "float32", "small-head")),
    (SMALL, AVX512, CPU, ("compiled", "float32", "small-head")),
    (LARGE, AVX512, CPU, ("compiled", "float32", "sdpa")),
    (SMALL, BF16_NO_COMPILER, CPU, ("torch", "bfloat16", "sdpa")),
    (SMALL, NO_COMPILER, CPU, ("torch", "float32", "sdpa")),
    ({}, AMX, CPU, ("compiled", "bfloat16", "sdpa")),  # config unknown: no small heads assumed
])
def test_the_rule_table_picks_what_it_says(config, machine, device, expected):
    assert pick(config, machine, device) == expected


@pytest.mark.parametrize(("machine", "kwargs", "expected"), [
    (AMX, {"dtype": "float32"}, ("compiled", "float32", "small-head")),
    (AMX, {"attention": "sdpa"}, ("compiled", "bfloat16", "sdpa")),
    (AMX, {"dtype": "float32", "attention": "sdpa"}, ("compiled", "float32", "sdpa")),
    # onnx cannot run the kernel or bfloat16 on a CPU: the next row that can wins
    (AVX2, {"attention": "small-head"}, ("compiled", "float32", "small-head")),
    (AVX2, {"dtype": "bfloat16"}, ("compiled", "bfloat16", "small-head")),
    (NO_COMPILER, {"attention": "small-head"}, ("torch", "float32", "small-head")),
])
def test_the_users_dtype_and_attention_win(machine, kwargs, expected):
    choice = choose_backend(SMALL, CPU, machine=machine, **kwargs)
    assert (choice.backend, choice.dtype, choice.attention) == expected
    assert all(f"{name} {value} as given" in choice.reason for name, value in kwargs.items())


def test_a_one_off_run_does_not_compile_and_the_reason_says_why():
    choice = choose_backend(SMALL, CPU, machine=AMX, one_off=True)
    assert (choice.backend, choice.dtype, choice.attention) == ("torch", "float32", "sdpa")
    assert "bfloat16 instructions" in choice.reason and "one-off run" in choice.reason
    assert "docs/results/bench-cpu-xeon-amx-bf16.md" in choice.reason
    given = choose_backend(SMALL, CPU, "bfloat16", machine=AMX, one_off=True)
    assert (given.backend, given.dtype, given.attention) == ("torch", "bfloat16", "sdpa")
    assert choose_backend(SMALL, GPU, machine=CUDA, one_off=True).backend == "cuda-graph"


def test_every_rule_names_a_backend_and_a_result_that_exist():
    results = Path(__file__).parents[2] / "docs" / "results"
    for rule in RULES:
        assert rule.backend in BACKENDS and rule.once[0] in BACKENDS
        assert (results / rule.results).is_file(), rule.results
    assert RULES[-1].applies(NO_COMPILER, False)  # the last row always applies: the choice never fails


def test_docs_mirror_the_table():
    assert auto.rules_markdown() in (Path(__file__).parents[2] / "docs" / "engine.md").read_text()


def test_the_probe_reads_the_machine(monkeypatch):
    monkeypatch.setattr(auto, "cpu_has_bfloat16", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(auto, "find_compilers", lambda: ("cc", None))
    assert Machine.probe(CPU) == Machine("cpu", False, "AVX2", False, Machine.probe(CPU).onnx)
    monkeypatch.setattr(auto, "cpu_has_bfloat16", lambda: True)
    monkeypatch.setattr(auto, "find_compilers", lambda: ("cc", "c++"))
    probed = Machine.probe(CPU)
    assert probed.cpu_bfloat16 and probed.compiler
    assert Machine.probe(GPU) == CUDA


def test_head_dims_from_a_config_match_the_loaded_model():
    for spec in ("preset:tiny-sd", "preset:tiny-sdxl"):
        model = load_model(spec, device="cpu")
        assert head_dims(read_unet_config(spec)) == head_dims(model) != ()
    assert head_dims(LARGE) == (40, 80, 160)


def test_unet_config_of_a_folder_and_of_nothing(lcm_sd_dir, tmp_path):
    assert head_dims(read_unet_config(str(lcm_sd_dir))) == head_dims(SMALL)
    assert head_dims(read_unet_config("preset:sd15", unet=str(lcm_sd_dir))) == head_dims(SMALL)  # --unet wins
    assert read_unet_config(str(tmp_path / "missing")) == {} and read_unet_config(str(tmp_path)) == {}


def test_bad_names_list_the_allowed_values_with_auto(tiny):
    with pytest.raises(InvalidInputError, match="backend must be one of auto, torch, compiled, cuda-graph, onnx, "
                                                "tensorrt; got 'tvm'"):
        create_backend("tvm", tiny)
    assert BACKEND_CHOICES == ("auto", *BACKENDS)
    with pytest.raises(InvalidInputError, match="dtype must be one of auto, float32"):
        choose_backend(SMALL, CPU, dtype="half", machine=AMX)
    with pytest.raises(InvalidInputError, match="attention must be one of auto, sdpa, small-head"):
        choose_backend(SMALL, CPU, attention="flash", machine=AMX)


@pytest.fixture(scope="module")
def tiny():
    return load_model("preset:tiny-sd", device="cpu", dtype="float32")


def test_create_backend_auto_runs_the_rules_pick_and_matches_eager(tiny, monkeypatch):
    """A float32 model on a machine without bfloat16: the rule's compiled backend with the kernel, as eager."""
    monkeypatch.setattr(Machine, "probe", classmethod(lambda cls, device: AVX512))
    expected = LCMSampler(tiny).run_rows(ROWS, 2, 32, 32).images
    try:
        backend = create_backend("auto", tiny, buckets=BucketSet((2,), (2,), ((32, 32),)), attention="auto")
        assert backend.name == "compiled"
        assert any(type(p).__name__ == "SmallHeadAttnProcessor" for p in tiny.unet.attn_processors.values())
        got = LCMSampler(tiny, backend=backend).run_rows(ROWS, 2, 32, 32).images
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    finally:
        tiny.unet.set_attn_processor(AttnProcessor2_0())
        torch._dynamo.reset()


def test_attention_auto_beside_a_named_backend(tiny, monkeypatch):
    monkeypatch.setattr(Machine, "probe", classmethod(lambda cls, device: NO_COMPILER))
    assert auto.auto_attention("torch", tiny) == "sdpa"  # no compiler: no kernel
    monkeypatch.setattr(Machine, "probe", classmethod(lambda cls, device: AMX))
    assert auto.auto_attention("torch", tiny) == "small-head"
    assert auto.auto_attention("onnx", tiny) == "sdpa"


def test_generate_defaults_to_auto_and_records_the_choice(tmp_path, lcm_sd_dir, monkeypatch):
    monkeypatch.setattr(Machine, "probe", classmethod(lambda cls, device: AMX))
    assert main(["generate", "a cat", "--model", str(lcm_sd_dir), "--steps", "1", "--dtype", "float32",
                 "--attention", "sdpa", "-o", str(tmp_path), "-q"]) == 0
    record = json.loads((tmp_path / "generation.json").read_text())
    assert {k: record["backend"][k] for k in ("backend", "dtype", "attention")} == {
        "backend": "torch", "dtype": "float32", "attention": "sdpa"}  # one-off: eager; the flags given win
    assert "one-off run" in record["backend"]["reason"] and record["model"]["dtype"] == "float32"


def test_bench_default_row_runs_autos_pick_beside_diffusers(tmp_path, monkeypatch):
    monkeypatch.setattr(Machine, "probe", classmethod(lambda cls, device: NO_COMPILER))
    assert main(["bench", "--model", "preset:tiny-sd", "--batch-sizes", "1", "--steps", "1", "--resolutions", "32x32",
                 "--warmup", "0", "--iters", "1", "--device", "cpu", "--out", str(tmp_path), "--name", "d", "-q"]) == 0
    result = json.loads((tmp_path / "d.json").read_text())
    assert [r["backend"] for r in result["rows"]] == ["diffusers", "default"]
    default = result["rows"][1]
    assert default["auto"]["backend"] == "torch" and default["dtype"] == "float32" and default["attention"] == "sdpa"
    markdown = (tmp_path / "d.md").read_text()
    assert "| default = torch | 1 | 1 | 32x32 | float32 |" in markdown and "picks for a server: anything else" in markdown
