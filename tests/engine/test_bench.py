"""`lcmserve bench` end to end on a tiny preset (1 iteration) and `bench compare`."""

import json

import pytest
import torch

from lcmserve.cli import main
from lcmserve.engine.bench import BenchConfig, compare, summarize
from lcmserve.errors import InvalidInputError


def test_summarize_percentiles_and_throughput():
    stats = summarize([0.1, 0.2, 0.3, 0.4], batch_size=4)
    assert stats["p50_ms"] == pytest.approx(250.0)
    assert stats["p99_ms"] == pytest.approx(397.0)
    assert stats["throughput_img_s"] == pytest.approx(4 / 0.25)


@pytest.mark.parametrize("kwargs,param", [
    ({"backends": ("tvm",)}, "backends"), ({"batch_sizes": (33,)}, "batch_sizes"), ({"steps": (0,)}, "steps"),
    ({"iters": 0}, "iters"), ({"warmup": -1}, "warmup"), ({"resolutions": ((100, 64),)}, "resolutions"),
    ({"backends": (), "baseline": False}, "backends"),
    ({"threads": 0}, "threads"), ({"interleave": True, "channels_last": True}, "interleave"),
    ({"baseline_dtype": "fp8"}, "baseline_dtype"), ({"compile_mode": "reduce-overhead"}, "compile_mode"),
    ({"profile_top": 0}, "profile_top"),
])
def test_bench_config_checks(kwargs, param):
    with pytest.raises(InvalidInputError) as info:
        BenchConfig(**kwargs)
    assert info.value.param == param


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "--model", "preset:tiny-sd", "--backends", "torch,onnx", "--batch-sizes", "1,2",
                 "--steps", "1", "--resolutions", "32x32", "--warmup", "0", "--iters", "2", "--device", "cpu",
                 "--cache-dir", str(out / "cache"), "--exporter", "legacy", "--profile", "--profile-top", "5", "--out", str(out), "--name", "run",
                 "-q"])
    assert code == 0
    return out


def test_bench_writes_json_markdown_and_plot(bench_run, capsys):
    result = json.loads((bench_run / "run.json").read_text())
    rows = result["rows"]
    assert {(r["backend"], r["batch_size"]) for r in rows} == {
        (b, n) for b in ("torch", "onnx", "diffusers") for n in (1, 2)
    }
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["throughput_img_s"] > 0 and r["peak_memory_mb"] > 0
        assert r["speedup_vs_diffusers"] > 0
        if r["backend"] != "diffusers":
            assert r["unet_ms"] > 0 and r["vae_ms"] > 0 and r["text_ms"] > 0
    assert result["config"]["guidance"] == 8.0  # none given: the model's default, recorded
    env = result["environment"]
    assert env["device_type"] == "cpu" and env["versions"]["torch"] and env["date"]
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(env["cpu_bfloat16"], bool)
    assert f"bfloat16 instructions {'yes' if env['cpu_bfloat16'] else 'no'}" in (bench_run / "run.md").read_text()
    assert "| onnx | 2 | 1 | 32x32 |" in (bench_run / "run.md").read_text()
    assert (bench_run / "run.png").read_bytes()[:4] == b"\x89PNG"


def test_profile_lists_the_top_operators_of_the_torch_rows(bench_run):
    result = json.loads((bench_run / "run.json").read_text())
    for r in result["rows"]:
        if r["backend"] == "onnx":  # runs outside torch: nothing to profile
            assert "profile" not in r
            continue
        prof = r["profile"]
        assert prof["clock"] == "cpu" and prof["total_ms"] > 0 and len(prof["ops"]) == 5  # --profile-top
        selfs = [op["self_ms"] for op in prof["ops"]]
        assert selfs == sorted(selfs, reverse=True) and 0 < sum(op["share"] for op in prof["ops"]) <= 1.0001
        names = {op["op"] for op in prof["ops"]}
        assert any("conv" in n for n in names), names  # a UNet and a VAE run: convolutions must show up
    md = (bench_run / "run.md").read_text()
    assert "## Where the time goes" in md and "### torch, batch 2, 1 steps, 32x32" in md
    assert "### onnx" not in md


def test_profile_of_a_compiled_row_says_how_to_name_the_calls_inside_its_graph():
    from lcmserve.engine.bench import _profile_markdown

    def row(*ops):
        return {"backend": "compiled", "batch_size": 1, "steps": 4, "height": 64, "width": 64,
                "profile": {"clock": "cpu", "total_ms": 3.0,
                            "ops": [{"op": op, "self_ms": 1.0, "share": 0.3, "calls": 4} for op in ops]}}

    hint = "TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1"
    assert hint in _profile_markdown([row("## Call CompiledFxGraph None ##", "lcmserve::small_head_attention")])
    assert hint not in _profile_markdown([row("## Call CompiledFxGraph None ##", "aoti_torch_cpu__linear_pointwise")])
    assert hint not in _profile_markdown([row("aten::mkldnn_convolution")])


def test_compare_merges_runs_from_two_machines(bench_run, tmp_path):
    first = json.loads((bench_run / "run.json").read_text())
    second = json.loads(json.dumps(first))
    second["environment"]["device"] = "NVIDIA A6000"
    for r in second["rows"]:
        r["p50_ms"] /= 10
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(second))
    assert main(["bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path),
                 "--name", "both"]) == 0
    merged = json.loads((tmp_path / "both.json").read_text())
    assert len(merged["rows"]) == 2 * len(first["rows"])
    assert {r["device"] for r in merged["rows"]} == {first["environment"]["device"], "NVIDIA A6000"}
    table = (tmp_path / "both.md").read_text()
    assert "| NVIDIA A6000 | torch | 1 | 1 | 32x32 |" in table
    assert (tmp_path / "both.png").stat().st_size > 0
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(InvalidInputError, match="is not a bench result"):
        compare([tmp_path / "junk.json"], tmp_path)


@pytest.mark.parametrize("interleave", [False, True])
def test_a_backend_that_fails_does_not_cost_the_rows_of_the_others(tmp_path, monkeypatch, interleave):
    from lcmserve.engine.bench import run_bench
    from lcmserve.engine.sampler import LCMSampler

    real_run_rows = LCMSampler.run_rows

    def fails_at_batch_2(self, rows, steps, width, height, on_step=None):
        if len(rows) == 2:
            raise RuntimeError("CUDA out of memory")
        return real_run_rows(self, rows, steps, width, height, on_step)

    monkeypatch.setattr(LCMSampler, "run_rows", fails_at_batch_2)
    # cuda-graph refuses a model on the CPU at setup; torch breaks at batch 2 only.
    cfg = BenchConfig(model="preset:tiny-sd", backends=("torch", "cuda-graph"), batch_sizes=(1, 2), steps=(1,),
                      resolutions=((32, 32),), warmup=0, iters=1, device="cpu", out=str(tmp_path), name="mixed",
                      interleave=interleave, progress=False)
    result = run_bench(cfg)
    assert sorted((r["backend"], r["batch_size"]) for r in result["rows"]) == [("diffusers", 1), ("diffusers", 2),
                                                                               ("torch", 1)]
    errors = {(e["backend"], e["stage"]): e for e in result["errors"]}
    assert set(errors) == {("cuda-graph", "setup"), ("torch", "run")}
    assert errors[("cuda-graph", "setup")]["error"].startswith("InvalidInputError:")
    assert "CUDA GPU" in errors[("cuda-graph", "setup")]["error"]
    assert errors[("torch", "run")]["batch_size"] == 2 and "out of memory" in errors[("torch", "run")]["error"]
    assert json.loads((tmp_path / "mixed.json").read_text())["errors"] == result["errors"]
    table = (tmp_path / "mixed.md").read_text()
    assert "| torch | 1 | 1 | 32x32 |" in table and "| torch | 2 |" not in table
    assert "- cuda-graph failed (setup): InvalidInputError:" in table
    assert "- torch failed (run, batch 2, 1 steps, 32x32): RuntimeError: CUDA out of memory" in table
    assert next(r for r in result["rows"] if r["backend"] == "torch")["speedup_vs_diffusers"] > 0


@pytest.mark.parametrize("interleave,order", [(False, "DDDOOO"), (True, "DODODO")])
def test_interleave_takes_turns_batch_by_batch(tmp_path, monkeypatch, interleave, order):
    from lcmserve.engine import bench
    from lcmserve.engine.sampler import LCMSampler

    calls = []
    real_run_rows, real_pipeline = LCMSampler.run_rows, bench.diffusers_pipeline

    def ours(self, *args, **kwargs):
        calls.append("O")
        return real_run_rows(self, *args, **kwargs)

    def theirs(model):
        pipe = real_pipeline(model)
        return lambda *args, **kwargs: (calls.append("D"), pipe(*args, **kwargs))[1]

    monkeypatch.setattr(LCMSampler, "run_rows", ours)
    monkeypatch.setattr(bench, "diffusers_pipeline", theirs)
    cfg = BenchConfig(model="preset:tiny-sd", backends=("torch",), batch_sizes=(1,), steps=(1,),
                      resolutions=((32, 32),), warmup=1, iters=2, device="cpu", out=str(tmp_path), name="turns",
                      interleave=interleave, progress=False,
                      # interleaved, also: ours in bfloat16 against diffusers' default float32
                      dtype="bfloat16" if interleave else "auto", baseline_dtype="float32" if interleave else None)
    result = bench.run_bench(cfg)
    assert "".join(calls) == order
    assert [r["backend"] for r in result["rows"]] == ["diffusers", "torch"]
    dtypes = ["float32", "bfloat16"] if interleave else ["float32", "float32"]
    assert [r["dtype"] for r in result["rows"]] == dtypes
    assert f"| torch | 1 | 1 | 32x32 | {dtypes[1]} |" in (tmp_path / "turns.md").read_text()
    kinds = {r["peak_memory_kind"] for r in result["rows"]}
    assert kinds == {"process_peak_rss_all_backends" if interleave else "process_peak_rss"}


def test_the_baseline_runs_first_and_cli_exits_zero_past_a_failing_backend(tmp_path):
    code = main(["bench", "--model", "preset:tiny-sd", "--backends", "cuda-graph,torch", "--batch-sizes", "1",
                 "--steps", "1", "--resolutions", "32x32", "--warmup", "0", "--iters", "1", "--device", "cpu",
                 "--out", str(tmp_path), "--name", "cut", "-q"])
    assert code == 0
    result = json.loads((tmp_path / "cut.json").read_text())
    assert [r["backend"] for r in result["rows"]] == ["diffusers", "torch"]
    assert [(e["backend"], e["stage"]) for e in result["errors"]] == [("cuda-graph", "setup")]
    assert "cuda-graph failed" in (tmp_path / "cut.md").read_text()


def test_cli_exits_one_when_no_backend_measured_anything(tmp_path, capsys):
    code = main(["bench", "--model", "preset:tiny-sd", "--backends", "cuda-graph", "--no-baseline", "--batch-sizes",
                 "1", "--steps", "1", "--resolutions", "32x32", "--warmup", "0", "--iters", "1", "--device", "cpu",
                 "--out", str(tmp_path), "--name", "none", "-q"])
    assert code == 1
    assert "no backend produced a measurement" in capsys.readouterr().err
    assert json.loads((tmp_path / "none.json").read_text())["rows"] == []


def test_small_head_attention_reaches_the_torch_rows_only(bench_run, tmp_path):
    """--attention small-head: torch rows run our kernel; diffusers' baseline and the ONNX graphs keep SDPA."""
    code = main(["bench", "--model", "preset:tiny-sd", "--backends", "torch,onnx", "--batch-sizes", "1",
                 "--steps", "1", "--resolutions", "32x32", "--warmup", "0", "--iters", "1", "--device", "cpu",
                 "--cache-dir", str(bench_run / "cache"), "--exporter", "legacy", "--attention", "small-head",
                 "--out", str(tmp_path), "--name", "heads", "-q"])
    assert code == 0
    result = json.loads((tmp_path / "heads.json").read_text())
    assert {r["backend"]: r["attention"] for r in result["rows"]} == {
        "diffusers": "sdpa", "torch": "small-head", "onnx": "sdpa"}
    assert result["config"]["attention"] == "small-head" and not result["errors"]
    assert "| torch (small-head) | 1 | 1 | 32x32 |" in (tmp_path / "heads.md").read_text()


def test_bench_of_a_base_model_with_an_lcm_lora(tmp_path, base_sd_dir, lora_sd_dir):
    """--lora: ours and diffusers' StableDiffusionPipeline run the same fused weights, at the LoRA's default w."""
    code = main(["bench", "--model", str(base_sd_dir), "--lora", str(lora_sd_dir), "--backends", "torch",
                 "--batch-sizes", "1", "--steps", "1", "--warmup", "0", "--iters", "1", "--device", "cpu",
                 "--out", str(tmp_path), "--name", "lora", "-q"])
    assert code == 0
    result = json.loads((tmp_path / "lora.json").read_text())
    assert result["config"]["lora"] == str(lora_sd_dir) and result["config"]["guidance"] == 1.0
    assert {r["backend"] for r in result["rows"]} == {"torch", "diffusers"}
    assert (tmp_path / "lora.md").read_text().startswith(f"# lcmserve bench: {base_sd_dir} + LoRA {lora_sd_dir}")
