"""The small-head attention kernel: parity with SDPA (float64 reference), its processor and backends, its cache."""

import dataclasses
import logging
import shutil

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from lcmserve.engine import LCMSampler, Row
from lcmserve.engine.backends import BucketSet, create_backend
from lcmserve.engine.kernels import attention as kernel
from lcmserve.engine.kernels import build
from lcmserve.errors import InvalidInputError
from lcmserve.models import load_model

if shutil.which("cc") is None or shutil.which("c++") is None:
    pytest.skip("no C and C++ compiler to build the kernel with", allow_module_level=True)

ROWS = [Row("a red circle", 1, 8.0), Row("a cat", 2, 1.0), Row("blue square", 3, 3.5)]
TOL = {torch.float32: {"rtol": 1e-5, "atol": 2e-6}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2}}


@pytest.fixture(scope="module", autouse=True)
def loaded(tmp_path_factory):
    return kernel.load_kernel(tmp_path_factory.mktemp("kernel-cache"))


def heads_view(batch, tokens, heads, head_dim, dtype, gen, scale=1.0):
    """[B, H, N, D] as diffusers hands it over: a transposed view of a [B, N, H*D] projection."""
    x = torch.randn(batch, tokens, heads * head_dim, generator=gen) * scale
    return x.to(dtype).view(batch, tokens, heads, head_dim).transpose(1, 2)


def reference(q, k, v):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double()).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 37, 21, 5), (1, 8, 256, 256, 4), (3, 2, 16, 1, 16), (2, 4, 64, 33, 8),
                                   (1, 1, 1, 17, 1), (1, 2, 20, 19, 32), (2, 3, 19, 16, 24)])
def test_kernel_matches_float64_attention(shape, dtype):
    batch, heads, n_query, n_key, head_dim = shape
    gen = torch.Generator().manual_seed(sum(shape))
    q = heads_view(batch, n_query, heads, head_dim, dtype, gen)
    k, v = (heads_view(batch, n_key, heads, head_dim, dtype, gen) for _ in range(2))
    out = kernel.small_head_attention(q, k, v)
    assert out.shape == (batch, n_query, heads, head_dim) and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.double(), reference(q, k, v), **TOL[dtype])


def test_kernel_is_stable_for_large_scores_and_takes_contiguous_inputs():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 40, 8, generator=gen) * s for s in (30.0, 30.0, 1.0))  # scores in the thousands
    expected = reference(q, k, v)
    error = (kernel.small_head_attention(q, k, v).double() - expected).abs().max().item()
    # Scores this large carry float32 rounding of ~1e-4 into the exp, in torch's own float32 attention too.
    sdpa_error = (F.scaled_dot_product_attention(q, k, v).transpose(1, 2).double() - expected).abs().max().item()
    assert error <= max(2 * sdpa_error, 1e-5), (error, sdpa_error)


def test_all_negative_scores_keep_their_weights():
    """Every score about -400: the row's max is one of them (not a zero from an empty lane), so no weight underflows."""
    gen = torch.Generator().manual_seed(4)
    q = torch.full((1, 2, 3, 4), 10.0)
    k = -10.0 + torch.randn(1, 2, 5, 4, generator=gen)  # every score about -400
    v = torch.randn(1, 2, 5, 4, generator=gen)
    torch.testing.assert_close(kernel.small_head_attention(q, k, v).double(), reference(q, k, v), **TOL[torch.float32])


def test_non_finite_scores_follow_the_math():
    """A -inf score is a key of weight 0; a NaN or +inf score (or all keys at -inf) makes the row NaN."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 3, 5, 4, generator=gen).abs() + 0.1  # positive, so an infinite key gives a known sign
    k, v = (torch.randn(1, 3, 9, 4, generator=gen) for _ in range(2))
    k[0, 0, 2] = -float("inf")  # head 0: key 2 drops out
    k[0, 1, 4] = float("inf")  # head 1: every row NaN
    q[0, 2, 3, 0] = float("nan")  # head 2: row 3 NaN
    out = kernel.small_head_attention(q, k, v).transpose(1, 2).double()
    scores = q.double() @ k.double().transpose(-1, -2) * 0.5
    expected = torch.softmax(scores, dim=-1) @ v.double()
    assert torch.equal(out.isnan(), expected.isnan())
    assert out[0, 0].isfinite().all() and out[0, 1].isnan().all() and out[0, 2, 3].isnan().all()
    torch.testing.assert_close(out[~out.isnan()], expected[~expected.isnan()], rtol=1e-5, atol=2e-6)


def test_op_compiles_without_a_graph_break():
    from torch._dynamo.utils import counters

    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 20, 4, generator=gen) for _ in range(3))
    counters.clear()
    compiled = torch.compile(lambda a, b, c: kernel.small_head_attention(a, b, c) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), kernel.small_head_attention(q, k, v) * 2)


@pytest.fixture(scope="module")
def tiny():
    return load_model("preset:tiny-sd", device="cpu", dtype="float32")


def test_processor_matches_diffusers_unet_and_leaves_the_rest_alone(tiny):
    unet = tiny.unet
    gen = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    text = torch.randn(2, 7, unet.config.cross_attention_dim, generator=gen)
    cond = torch.randn(2, unet.config.time_cond_proj_dim, generator=gen)
    with torch.inference_mode():
        expected = unet(sample, 500, encoder_hidden_states=text, timestep_cond=cond).sample
    try:
        taking = kernel.use_small_head_attention(tiny)
        assert taking > 0  # the tiny UNet's 8-channel heads take the kernel, so the comparison means something
        with torch.inference_mode(), torch.profiler.profile() as prof:
            got = unet(sample, 500, encoder_hidden_states=text, timestep_cond=cond).sample
        calls = {e.key: e.count for e in prof.key_averages()}
        assert calls.get("lcmserve::small_head_attention", 0) == taking
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        twin = kernel.with_standard_attention(unet)  # what diffusers' pipeline and the ONNX exporter get
        assert twin is not unet and all(type(p) is AttnProcessor2_0 for p in twin.attn_processors.values())
        assert twin.conv_in.weight is unet.conv_in.weight  # weights shared, not copied
        assert all(isinstance(p, kernel.SmallHeadAttnProcessor) for p in unet.attn_processors.values())
    finally:
        unet.set_attn_processor(AttnProcessor2_0())
    assert kernel.with_standard_attention(unet) is unet


def test_fallbacks_cover_what_the_kernel_does_not(tiny):
    attn = next(m for m in tiny.unet.modules() if hasattr(m, "processor"))
    x = torch.randn(1, 4, attn.query_dim)
    with torch.no_grad():
        assert kernel.kernel_takes(attn, x)
        assert not kernel.kernel_takes(attn, x.half())  # no float16 on a CPU
        assert not kernel.kernel_takes(attn, x[None])  # 4-D (a VAE's spatial attention)
    with torch.enable_grad():
        assert not kernel.kernel_takes(attn, x.clone().requires_grad_())  # autograd needs SDPA
        assert kernel.kernel_takes(attn, x)  # frozen weights and an input without grad: nothing to record
    wide = torch.nn.Module()
    wide.__dict__.update(attn.__dict__)
    wide.heads = 3  # heads of 64 // 3 = 21 channels: the kernel only over a few keys
    few, many = torch.randn(1, kernel.FEW_KEYS, 7), torch.randn(1, kernel.FEW_KEYS + 1, 7)
    big = torch.nn.Module()
    big.__dict__.update(attn.__dict__)
    big.heads = 1  # one head of all the channels
    with torch.no_grad():
        assert kernel.MAX_HEAD_DIM < attn.inner_dim // 3 <= kernel.FEW_KEYS_MAX_HEAD_DIM < attn.inner_dim
        assert kernel.kernel_takes(wide, x, few) and not kernel.kernel_takes(wide, x, many)
        assert kernel.kernel_takes(wide, x) == (x.shape[1] <= kernel.FEW_KEYS)
        assert not kernel.kernel_takes(big, x) and not kernel.kernel_takes(big, x, few)


def test_torch_backend_with_the_kernel_matches_sdpa_and_onnx_export_still_traces_sdpa(tiny):
    from lcmserve.engine.bench import diffusers_pipeline
    from lcmserve.engine.export import _graph_module

    expected = LCMSampler(tiny).run_rows(ROWS, 2, 32, 32).images
    try:
        backend = create_backend("torch", tiny, attention="small-head")
        got = LCMSampler(tiny, backend=backend).run_rows(ROWS, 2, 32, 32).images
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        for unet in (_graph_module(tiny, "unet").unet, diffusers_pipeline(tiny).unet):  # the exporter, the baseline
            assert unet is not tiny.unet and all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    finally:
        tiny.unet.set_attn_processor(AttnProcessor2_0())


def test_compiled_backend_with_the_kernel_matches_eager(tiny):
    """torch.compile keeps the op opaque: compiled once at warm-up, equal to eager, no retrace."""
    from torch._dynamo.utils import counters

    expected = LCMSampler(tiny).run_rows(ROWS, 2, 32, 32).images
    try:
        backend = create_backend("compiled", tiny, buckets=BucketSet((4,), (2,), ((32, 32),)), attention="small-head")
        frames = counters["frames"]["ok"]
        sampler = LCMSampler(tiny, backend=backend)
        with torch.profiler.profile() as prof:
            got = sampler.run_rows(ROWS, 2, 32, 32).images
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        assert counters["frames"]["ok"] == frames
        ops = {e.key for e in prof.key_averages()}
        assert "lcmserve::small_head_attention" in ops
        assert "lcmserve::group_norm_stats" in ops  # the compiled backend's group norms (the VAE's 32x32 maps)
    finally:
        tiny.unet.set_attn_processor(AttnProcessor2_0())
        torch._dynamo.reset()


def test_bad_attention_settings_are_clear_errors(tiny, monkeypatch):
    from lcmserve.engine.bench import BenchConfig
    from lcmserve.server.config import ServerConfig

    with pytest.raises(InvalidInputError, match="attention must be one of auto, sdpa, small-head; got 'flash'"):
        create_backend("torch", tiny, attention="flash")
    with pytest.raises(InvalidInputError, match="attention: small-head .* onnx runs its own graph"):
        create_backend("onnx", tiny, attention="small-head")
    with pytest.raises(InvalidInputError, match="attention: small-head needs backend"):
        ServerConfig(backend="tensorrt", attention="small-head")
    with pytest.raises(InvalidInputError, match="attention must be one of"):
        BenchConfig(attention="fast")
    from lcmserve.engine.bench_attention import AttentionBenchConfig

    with pytest.raises(InvalidInputError, match="dtypes must be each one of float32, bfloat16; got 'float16'"):
        AttentionBenchConfig(dtypes=("float16",))
    monkeypatch.setattr(build, "_loaded", {})  # as in a fresh process
    monkeypatch.setenv("CC", "")
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(InvalidInputError, match=r"C and a C\+\+ compiler and a C compiler .* not found.*--attention sdpa") as err:
        kernel.load_kernel()
    assert err.value.param == "attention"
    monkeypatch.setenv("CC", "gcc")
    monkeypatch.setenv("CXX", "")
    with pytest.raises(InvalidInputError, match=r"a C\+\+ compiler \(\$CXX, or g\+\+\) was not found.*--attention sdpa"):
        kernel.load_kernel()
    monkeypatch.setattr(build, "MIN_TORCH", "99.0")
    with pytest.raises(InvalidInputError, match=r"attention: .* needs torch >= 99.0; this is torch .*--attention sdpa"):
        kernel.build_kernel()


def test_the_op_checks_its_inputs():
    q = torch.randn(2, 3, 7, 4)
    with pytest.raises(RuntimeError, match=r"key and value must be \[2, 3, tokens, 4\] like the query"):
        kernel.small_head_attention(q, torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4))
    with pytest.raises(RuntimeError, match="dtype must be float32 or bfloat16"):
        kernel.small_head_attention(q.double(), q.double(), q.double())
    with pytest.raises(RuntimeError, match="head dim must be 1 to 64; got 65"):
        big = torch.randn(1, 1, 3, 65)
        kernel.small_head_attention(big, big, big)
    with pytest.raises(RuntimeError, match="must be \\[batch, heads, tokens, head dim\\]"):
        kernel.small_head_attention(q[0], q[0], q[0])


def test_kernel_cache_rebuilds_on_damage_and_on_a_new_source(tmp_path, caplog):
    path = kernel.build_kernel(tmp_path)
    assert path.is_file() and kernel.build_kernel(tmp_path) == path  # a hit: same entry
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING):
        rebuilt = kernel.build_kernel(tmp_path)
    assert "damaged" in caplog.text and rebuilt == path and path.stat().st_size > 100
    source = tmp_path / "edited.c"
    source.write_text(kernel.SOURCE.read_text() + "\n/* edited */\n")
    edited = dataclasses.replace(kernel.KERNEL, source=source)
    assert build.build_library(edited, tmp_path).parent != path.parent  # another source, another entry
    source.write_text("this is not C")
    with pytest.raises(InvalidInputError, match="attention: compiling the small-head kernel .* failed"):
        build.build_library(edited, tmp_path)
    op_source = tmp_path / "edited_op.cpp"
    op_source.write_text("this is not C++")
    with pytest.raises(InvalidInputError, match="attention: compiling the small-head kernel with .* failed"):
        build.build_library(dataclasses.replace(kernel.KERNEL, op_source=op_source), tmp_path)


def test_kernel_cache_key_follows_both_sources_and_torch(tmp_path, monkeypatch):
    from lcmserve.engine.cache import ArtifactCache

    cache = ArtifactCache(tmp_path)
    cc, cxx = build.compilers(kernel.KERNEL)
    entry = cache.entry_dir(kernel.KERNEL.name, build.kernel_spec(kernel.KERNEL, cc, cxx))
    op_source = tmp_path / "op.cpp"
    op_source.write_text(kernel.OP_SOURCE.read_text() + "\n// edited\n")
    edited = dataclasses.replace(kernel.KERNEL, op_source=op_source)
    assert cache.entry_dir(edited.name, build.kernel_spec(edited, cc, cxx)) != entry
    monkeypatch.setattr(build.torch, "__version__", "2.99.0")  # another torch: the library links against it
    assert cache.entry_dir(kernel.KERNEL.name, build.kernel_spec(kernel.KERNEL, cc, cxx)) != entry


def test_bench_attention_records_the_unets_shapes_and_the_sweep(tmp_path):
    import json

    from lcmserve.cli import main

    code = main(["bench", "attention", "--model", "preset:tiny-sd", "--batch-sizes", "1", "--dtypes", "float32,bfloat16",
                 "--iters", "2", "--out", str(tmp_path), "--name", "att"])
    assert code == 0
    result = json.loads((tmp_path / "att.json").read_text())
    model_rows = [r for r in result["rows"] if r["set"] == "model"]
    # the tiny UNet: 8 heads of 8 channels over 16x16 latents' 256 tokens, self- and cross-attention
    assert {(r["query_tokens"], r["heads"], r["head_dim"]) for r in model_rows} >= {(256, 8, 8)}
    assert all(r["calls_per_unet"] > 0 and r["sdpa_ms"] > 0 and r["kernel_ms"] > 0 for r in model_rows)
    sweep = [r for r in result["rows"] if r["set"] == "sweep"]
    assert {(r["key_tokens"], r["head_dim"]) for r in sweep} == {(k, d) for k in (256, 77) for d in (4, 8, 12, 16, 24, 32)}
    assert {(r["key_tokens"], r["head_dim"]) for r in sweep if r["takes_kernel"]} == {
        (k, d) for k in (256, 77) for d in (4, 8, 12, 16)} | {(77, 24)}
    for r in result["rows"]:
        assert r["kernel_max_error"] <= 2 * r["sdpa_max_error"] + (1e-5 if r["dtype"] == "float32" else 1e-2)
    assert "| 256 x 256 | 8 x 8 |" in (tmp_path / "att.md").read_text()
    assert (tmp_path / "att.png").read_bytes()[:4] == b"\x89PNG"


def test_the_server_setting_reaches_the_engine():
    from lcmserve.engine.backends import TorchBackend
    from lcmserve.server.app import build_client
    from lcmserve.server.config import ServerConfig
    from lcmserve.server.metrics import ServerMetrics

    config = ServerConfig(model="preset:tiny-sd", device="cpu", backend="torch", attention="small-head", warmup_steps=())
    sampler = build_client(config, ServerMetrics()).sampler
    assert isinstance(sampler.backend, TorchBackend)
    assert all(isinstance(p, kernel.SmallHeadAttnProcessor) for p in sampler.model.unet.attn_processors.values())


NARROW_CHECK = """
import sys, torch
from lcmserve.engine.kernels import attention as kernel, build
build.FLAGS = tuple("-march=" + sys.argv[1] if f == "-march=native" else f for f in build.FLAGS)
kernel.load_kernel(sys.argv[2])
gen = torch.Generator().manual_seed(5)
for batch, heads, n_query, n_key, head_dim in [(2, 3, 37, 21, 5), (1, 4, 9, 3, 8), (2, 2, 5, 33, 16)]:
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=gen) for n in (n_query, n_key, n_key))
    expected = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double()).transpose(1, 2)
    torch.testing.assert_close(kernel.small_head_attention(q, k, v).double(), expected, rtol=1e-5, atol=2e-6)
print("ok")
"""


@pytest.mark.skipif(__import__("platform").machine() != "x86_64", reason="x86 instruction-set levels")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])  # 8 lanes (AVX2) and 4 lanes (SSE2)
def test_narrower_vector_builds_match_too(march, tmp_path):
    """-march=native picks the lane count; the AVX2 and SSE builds must compute the same attention.

    In a process of its own: the operator keeps the first CPU kernel a process loads."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", NARROW_CHECK, march, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    built = list((tmp_path / "kernels").glob("small-head-attention-*/small_head_attention.so"))
    assert len(built) == 1 and f"-march={march}" in (built[0].parent / "manifest.json").read_text()
